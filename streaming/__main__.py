"""python -m streaming: the streaming scorer (Kafka transactions in, refreshed top-k out).

Also runs under spark-submit (the session then comes with the submitter's master and settings):
    spark-submit --master spark://host:7077 --jars <connector jars> streaming/__main__.py

Runs until SIGTERM or Ctrl-C, then stops after the running micro-batch. Every setting comes from
the YAML config (``streaming``, ``kafka``, ``dynamodb`` and ``model_store`` sections) and
RECO__... environment overrides. Exit codes: 0 stopped on request (or --available-now done);
2 bad configuration; 1 a query failed.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by spark-submit: import the package, not its folder
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from models.spark import single_threaded_blas  # noqa: E402

# The driver scores each micro-batch with many small solves and one matrix product: on a few cores
# shared with the Spark tasks, OpenBLAS' own threads fight them and run 2-4x slower (measured).
# Set before numpy is imported.
single_threaded_blas()

from models.config import ConfigError, config_text, load_config  # noqa: E402
from models.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("streaming")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="extra YAML config layered over config/default.yaml (repeatable)")
    parser.add_argument("--available-now", action="store_true",
                        help="process what the topic holds now, then stop (catch-up runs, tests)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (secrets redacted) and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    from models.clients import ensure_table, ensure_topics, kafka_options

    try:
        cfg = load_config(files=args.config or None)
        from models.business_rules import RulesConfig, load_rules
        from streaming.settings import StreamingSettings

        StreamingSettings.from_config(cfg)
        kafka_options(cfg)          # client options checked before any client is made
        load_rules(RulesConfig.from_config(cfg))     # a bad attributes file fails at start-up
    except ConfigError as err:
        log.error("%s", err)
        return 2
    if args.print_config:
        print(config_text(cfg), end="")
        return 0
    from models.spark import build_spark
    from streaming.job import StreamingJob

    ensure_topics(cfg)
    ensure_table(cfg)
    spark = build_spark(cfg, "reco-streaming")
    job = StreamingJob(cfg, spark)

    def on_signal(signum, _frame) -> None:
        log.info("received %s: stopping after the running micro-batch", signal.Signals(signum).name)
        job.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        job.start(available_now=args.available_now)
        if args.available_now:
            job.await_available_now(timeout_s=24 * 3600)
        else:
            job.run_until_stopped()
    except Exception as err:  # noqa: BLE001 - logged with its cause; the exit code tells the supervisor
        log.error("streaming scorer failed: %s", err)
        return 1
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
