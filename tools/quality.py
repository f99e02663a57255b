"""python -m tools quality: the live hit rates per model version and strategy, beside the
popularity baseline, from the summary records on ``kafka.topics.quality``.

The records are per window (docs/quality-summary.schema.json); this sums the windows that ended
in the last ``--minutes`` (all of the topic by default) and prints one line per group.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from models.config import Config, ConfigError, load_config
from tools import EXIT_NOTHING, EXIT_OK, ServiceUnreachable, exit_for, kafka_unreachable, quiet_client_logs


def read_summaries(cfg: Config, since_ms: int = 0, timeout_s: float = 10) -> list[dict]:
    """Every summary record on the quality topic whose window ended at or after ``since_ms``."""
    from kafka import KafkaConsumer, TopicPartition

    from models.clients import kafka_options
    from tools import bootstrap_options

    topic = str(cfg.get_path("kafka.topics.quality"))
    try:
        consumer = KafkaConsumer(**kafka_options(cfg), enable_auto_commit=False, group_id=None,
                                 **bootstrap_options(KafkaConsumer, timeout_s))
    except Exception as err:  # noqa: BLE001 - any bootstrap failure means the broker is unreachable
        raise kafka_unreachable(cfg, err) from err
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(p) < end[p] for p in partitions) and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=500).values():
                for message in messages:
                    try:
                        record = json.loads(message.value)
                    except (TypeError, ValueError):
                        continue
                    if isinstance(record, dict) and int(record.get("window_end_ms") or 0) >= since_ms:
                        records.append(record)
        return records
    finally:
        consumer.close()


def hit_rates(records: list[dict]) -> list[dict]:
    """The groups of ``records`` summed per (model version, strategy), with their rates."""
    sums: dict[tuple[str, str], list[int]] = {}
    for record in records:
        for group in record.get("groups") or []:
            row = sums.setdefault((group["model_version"], group["strategy"]), [0, 0, 0])
            row[0] += int(group["judged"])
            row[1] += int(group["hits"])
            row[2] += int(group["baseline_hits"])
    return [{"model_version": v, "strategy": s, "judged": j, "hits": h, "baseline_hits": b,
             "hit_rate": h / j if j else None, "baseline_hit_rate": b / j if j else None}
            for (v, s), (j, h, b) in sorted(sums.items())]


def format_table(rows: list[dict], k: int) -> str:
    """One line per group and a total: hit@k of the served lists beside the popularity baseline."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:6.1%}"

    total = hit_rates([{"groups": [{**r, "model_version": "all", "strategy": "all"} for r in rows]}])
    lines = [f"{'model version':<28} {'strategy':<20} {'judged':>8} {'hit@' + str(k):>9} {'popularity':>11}"]
    for row in rows + total:
        lines.append(f"{row['model_version']:<28} {row['strategy']:<20} {row['judged']:>8,} "
                     f"{pct(row['hit_rate']):>9} {pct(row['baseline_hit_rate']):>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools quality", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="only windows that ended this recently")
    args = parser.parse_args(argv)
    quiet_client_logs()
    since = 0 if args.minutes is None else int((time.time() - args.minutes * 60) * 1000)
    try:
        cfg = load_config()
        records = read_summaries(cfg, since)
    except (ConfigError, ServiceUnreachable) as err:
        return exit_for(err)
    rows = hit_rates(records)
    if not rows:
        print(f"no quality summary on {cfg.get_path('kafka.topics.quality')} yet (the streaming job publishes one "
              "every streaming.quality.summary_interval once purchases were judged)", file=sys.stderr)
        return EXIT_NOTHING
    print(format_table(rows, int(records[-1].get("k") or cfg.get_path("streaming.k"))))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
