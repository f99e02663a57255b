"""python -m infra {start,stop,status,init} [kafka|dynamodb]: the local services.

start  starts the broker and the DynamoDB endpoint (harmless when already running), then
       creates the topics and the table; stop stops only what start started.
"""
from __future__ import annotations

import argparse
import sys

from infra.process import ServiceError
from infra.services import all_services, optional_services
from models.clients import ensure_table, ensure_topics
from models.config import ConfigError, load_config
from models.logging_setup import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status", "init"])
    parser.add_argument("services", nargs="*", choices=["kafka", "dynamodb", "spark", []], default=[],
                        help="which services (default: kafka and dynamodb; spark = a standalone "
                             "master and worker for spark-submit)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config()
        services = {**all_services(cfg), **optional_services(cfg)}
        chosen = args.services or list(all_services(cfg))
        if args.action == "start":
            for key in chosen:
                service = services[key]
                started = service.start()
                print(f"{service.name}: {'started' if started else 'already running'} "
                      f"on {service.proc.host}:{service.port} (log {service.proc.log_file})")
                if key == "spark":
                    print(f"  submit with: spark-submit --master {service.master_url} ...")
        if args.action in ("start", "init"):
            init(cfg, chosen)
        elif args.action == "stop":
            for key in chosen:
                service = services[key]
                print(f"{service.name}: {'stopped' if service.stop() else 'was not running'}")
        elif args.action == "status":
            down = 0
            for key in chosen:
                service = services[key]
                try:
                    service.check()
                    print(f"{service.name}: running (pid {service.proc.pid()}) on "
                          f"{service.proc.host}:{service.port}")
                except ServiceError as err:
                    down += 1
                    print(f"{service.name}: DOWN: {str(err).splitlines()[0]}")
            return 1 if down else 0
    except (ServiceError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def init(cfg, chosen: list[str]) -> None:
    """Create the topics and the table on the chosen services (both are idempotent)."""
    if "kafka" in chosen:
        created = ensure_topics(cfg)
        print(f"Kafka topics: {', '.join(cfg.get_path('kafka.topics').values())} "
              f"({len(created)} created)")
    if "dynamodb" in chosen:
        created = ensure_table(cfg)
        print(f"DynamoDB table: {cfg.get_path('dynamodb.table')} ({'created' if created else 'exists'})")


if __name__ == "__main__":
    sys.exit(main())
