"""One log format for every entry point; the chatty client libraries kept at WARNING."""
from __future__ import annotations

import logging

QUIET = ("kafka", "botocore", "boto3", "urllib3", "py4j", "s3transfer")


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
