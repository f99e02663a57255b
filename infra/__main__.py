"""python -m infra {start,stop,status,init} [kafka|dynamodb|spark]: the local services;
python -m infra pack [streaming|batch]: the archives spark-submit ships to executors.

start  starts the broker and the DynamoDB endpoint (harmless when already running), then
       creates the topics and the table; stop stops only what start started. spark: a standalone
       master and spark.local_cluster.workers workers.
pack   builds {run_dir}/dist/reco-env.tar.gz (the Python environment, venv-pack; rebuilt only
       when the installed dependencies change) and the job's project zip, and prints the
       spark-submit command that runs the job on the local cluster (docs/cluster.md).
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
    parser.add_argument("action", choices=["start", "stop", "status", "init", "pack"])
    parser.add_argument("services", nargs="*", choices=["kafka", "dynamodb", "spark", "streaming", "batch", []],
                        default=[], help="which services (default: kafka and dynamodb; spark = a standalone "
                                         "master and its workers for spark-submit); for pack, which job "
                                         "(streaming, the default, or batch)")
    parser.add_argument("--force", action="store_true", help="pack: pack the environment even if unchanged")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config()
        if args.action == "pack":
            return pack_command(cfg, args.services, args.force)
        if set(args.services) & {"streaming", "batch"}:
            print(f"error: {args.action} takes services (kafka, dynamodb, spark), not jobs", file=sys.stderr)
            return 2
        services = {**all_services(cfg), **optional_services(cfg)}
        chosen = args.services or list(all_services(cfg))
        if args.action == "start":
            for key in chosen:
                service = services[key]
                started = service.start()
                print(f"{service.name}: {'started' if started else 'already running'} "
                      f"on {service.proc.host}:{service.port} (log {service.proc.log_file})")
                if key == "spark":
                    for worker in service.workers:
                        print(f"  {worker.name} on {worker.host}:{worker.port} (log {worker.log_file})")
                    print(f"  submit with: spark-submit --master {service.master_url} ... "
                          "(python -m infra pack prints the whole command)")
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
                    for worker in getattr(service, "workers", []):
                        print(f"  {worker.name}: running (pid {worker.pid()}) on {worker.host}:{worker.port}")
                except ServiceError as err:
                    down += 1
                    print(f"{service.name}: DOWN: {str(err).splitlines()[0]}")
            return 1 if down else 0
    except (ServiceError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def pack_command(cfg, chosen: list[str], force: bool) -> int:
    """Pack for one job and print its spark-submit command (for the configured local master)."""
    from infra.pack import describe, pack
    from infra.services import SparkStandalone

    jobs = [c for c in chosen if c in ("streaming", "batch")]
    if len(jobs) != len(chosen) or len(jobs) > 1:
        print("error: pack takes one job: streaming (the default) or batch", file=sys.stderr)
        return 2
    packed = pack(cfg, jobs[0] if jobs else "streaming", force)
    print(describe(cfg, packed, SparkStandalone(cfg).master_url))
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
