"""python -m tools.tail {recommendations|dead-letter|transactions}: one readable line per record.

recommendations: customer, model version, strategy, top products with scores, newest event
time, latency (the record's Kafka timestamp minus that event time). dead-letter: reason, where
the event came from (topic, partition, offset), the original bytes abbreviated. transactions:
the purchase, or the raw bytes when it is not valid JSON. ``--json`` prints each value as it is
(for the dead letter: the reason and source from the headers, with the original value as text).

Exit codes: 0 records printed (or none, with --allow-empty, when --timeout ran out),
1 no record matched, 2 bad arguments, 3 the broker cannot be reached.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import time
from collections.abc import Collection
from typing import Any, TextIO

from models.config import Config, ConfigError, load_config
from models.records import iso_utc
from tools import (
    EXIT_NOTHING,
    EXIT_OK,
    ServiceUnreachable,
    bootstrap_options,
    exit_for,
    kafka_unreachable,
    quiet_client_logs,
)

TOPIC_KEYS = {"recommendations": "kafka.topics.recommendations",
              "dead-letter": "kafka.topics.dead_letter",
              "transactions": "kafka.topics.transactions"}
ABBREVIATE_AT = 80


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def abbreviate(text: str, width: int = ABBREVIATE_AT) -> str:
    """One printable line: control characters escaped, long text cut with its full length noted."""
    flat = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return flat if len(flat) <= width else f"{flat[:width]}... ({len(text)} chars)"


def human_duration(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172_800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds / 86_400:.1f} d"


def parse_value(raw: bytes | None) -> Any:
    """The JSON document of a message value, or None when it is not JSON."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _where(message) -> str:
    return f"[p{message.partition}@{message.offset}]"


def format_recommendation(doc: dict, message, top: int = 5) -> str:
    recs = doc.get("recommendations") or []
    shown = ", ".join(f"{r.get('product_id')} {float(r.get('score') or 0):.3f}" for r in recs[:top])
    more = f" (+{len(recs) - top} more)" if len(recs) > top else ""
    parts = [_where(message), str(doc.get("customer_id") or _text(message.key)),
             f"model {doc.get('model_version', '?')}", str(doc.get("strategy", "?")),
             f"top: {shown or '(none)'}{more}",
             f"newest event {doc.get('last_event_time') or iso_utc(doc.get('last_event_ms')) or '-'}"]
    last_event_ms, written_ms = doc.get("last_event_ms"), getattr(message, "timestamp", None)
    if isinstance(last_event_ms, (int, float)) and isinstance(written_ms, int) and written_ms >= last_event_ms > 0:
        parts.append(f"latency {human_duration(written_ms - last_event_ms)}")
    if doc.get("source"):
        parts.append(f"({doc['source']})")
    return "  ".join(parts)


DEAD_LETTER_HEADER_PREFIX = "dlq."


def dead_letter(message) -> dict:
    """A dead-letter message as one flat document, whichever way the reason travels.

    The streaming job keeps the original key and value bytes untouched and puts the reason and
    the source (topic, partition, offset, timestamp) in ``dlq.*`` headers; a JSON envelope with
    ``reason`` and ``value`` (or ``value_base64``) is read too.
    """
    headers = {name[len(DEAD_LETTER_HEADER_PREFIX):].replace(".", "_"): _text(value)
               for name, value in (getattr(message, "headers", None) or [])
               if name.startswith(DEAD_LETTER_HEADER_PREFIX)}
    if headers:
        return {**headers, "key": _text(message.key) or None, "value": _text(message.value)}
    envelope = parse_value(message.value)
    if isinstance(envelope, dict) and "reason" in envelope:
        original = envelope.get("value")
        if isinstance(envelope.get("value_base64"), str):
            try:
                original = base64.b64decode(envelope["value_base64"]).decode("utf-8", errors="replace")
            except (binascii.Error, ValueError):
                original = envelope["value_base64"]
        return {**envelope, "key": envelope.get("key") or _text(message.key) or None,
                "value": original if isinstance(original, str) or original is None else json.dumps(original)}
    return {"reason": None, "key": _text(message.key) or None, "value": _text(message.value)}


def format_dead_letter(doc: dict, message) -> str:
    source = (f"from {doc.get('source_topic', '?')}[{doc.get('source_partition', '?')}]"
              f"@{doc.get('source_offset', '?')}")
    return "  ".join([_where(message), f"reason {doc.get('reason') or '? (no dlq.reason header)'}", source,
                      f"key {doc.get('key') or '-'}", f"original: {abbreviate(doc.get('value') or '')}"])


def format_transaction(doc: Any, message) -> str:
    if not isinstance(doc, dict):
        return f"{_where(message)} key {_text(message.key) or '-'}  NOT AN EVENT: {abbreviate(_text(message.value))}"
    return "  ".join([_where(message), str(doc.get("customer_id", "?")),
                      f"bought {doc.get('product_id', '?')} x{doc.get('quantity', 1)}",
                      f"at {doc.get('event_time', '?')}", f"event {doc.get('event_id', '?')}"])


def record_customer(kind: str, doc: Any, message) -> str | None:
    """The customer a record is about: its key, else the customer_id in it (or in the original)."""
    key = _text(message.key) or None
    if kind == "dead-letter":
        original = parse_value((doc.get("value") or "").encode())
        inner = original.get("customer_id") if isinstance(original, dict) else None
        return doc.get("key") or (str(inner) if inner is not None else None)
    if isinstance(doc, dict) and doc.get("customer_id") is not None:
        return str(doc["customer_id"])
    return key


def format_record(kind: str, doc: Any, message, top: int = 5) -> str:
    if kind == "recommendations":
        if isinstance(doc, dict):
            return format_recommendation(doc, message, top)
        return f"{_where(message)} NOT A RECORD: {abbreviate(_text(message.value))}"
    if kind == "dead-letter":
        return format_dead_letter(doc, message)
    return format_transaction(doc, message)


def json_line(doc: Any, message) -> str:
    if doc is not None:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return json.dumps({"_partition": message.partition, "_offset": message.offset,
                       "_key": _text(message.key) or None, "_raw": _text(message.value)}, ensure_ascii=False)


def make_consumer(cfg: Config, topic: str, from_beginning: bool, connect_timeout_s: float = 10.0):
    """A group-less consumer of every partition: tailing never moves anyone's committed offsets."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from models.clients import kafka_options

    options = bootstrap_options(KafkaConsumer, connect_timeout_s)
    if "allow_auto_create_topics" in KafkaConsumer.DEFAULT_CONFIG:
        options["allow_auto_create_topics"] = False   # a mistyped topic must not be created by looking
    try:
        return KafkaConsumer(topic, **kafka_options(cfg), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest" if from_beginning else "latest", **options)
    except KafkaError as err:
        raise kafka_unreachable(cfg, err) from None


def tail(cfg: Config, kind: str, *, customers: Collection[str] | None = None, from_beginning: bool = False,
         max_records: int | None = None, timeout_s: float | None = None, as_json: bool = False, top: int = 5,
         topic: str | None = None, out: TextIO = sys.stdout, connect_timeout_s: float = 10.0) -> int:
    """Print matching records of one topic until ``max_records`` or ``timeout_s``; returns how many."""
    from kafka.errors import KafkaError

    if kind not in TOPIC_KEYS:
        raise ValueError(f"unknown topic kind {kind!r}; one of {', '.join(TOPIC_KEYS)}")
    topic = topic or str(cfg.get_path(TOPIC_KEYS[kind]))
    wanted = {str(c) for c in customers} if customers else None
    consumer = make_consumer(cfg, topic, from_beginning, connect_timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printed = 0
    try:
        if topic not in consumer.topics():
            print(f"note: topic {topic!r} does not exist (yet); waiting for it", file=sys.stderr)
        while max_records is None or printed < max_records:
            remaining_ms = 1000 if deadline is None else int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            batches = consumer.poll(timeout_ms=min(1000, remaining_ms))
            for message in (m for batch in batches.values() for m in batch):  # in order per partition
                doc = dead_letter(message) if kind == "dead-letter" else parse_value(message.value)
                if wanted is not None and record_customer(kind, doc, message) not in wanted:
                    continue
                print(json_line(doc, message) if as_json else format_record(kind, doc, message, top),
                      file=out, flush=True)
                printed += 1
                if max_records is not None and printed >= max_records:
                    break
    except KafkaError as err:
        raise kafka_unreachable(cfg, err) from None
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return printed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=list(TOPIC_KEYS), help="which topic")
    parser.add_argument("--customer", action="append", metavar="ID",
                        help="only records of this customer (repeat, or C1,C2)")
    parser.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not the newest")
    parser.add_argument("--max", type=int, metavar="N", help="stop after N records")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--allow-empty", action="store_true",
                        help="exit 0, not 1, when --timeout runs out before any record matched")
    parser.add_argument("--json", action="store_true", help="print each value as raw JSON, one per line")
    parser.add_argument("--top", type=int, default=5, help="products shown per recommendation (default 5)")
    parser.add_argument("--topic", help="read this topic instead of the configured one")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the broker before giving up (exit 3)")
    args = parser.parse_args(argv)
    if args.max is not None and args.max < 1 or args.timeout is not None and args.timeout <= 0:
        parser.error("--max must be at least 1 and --timeout positive")
    customers = [c.strip() for value in args.customer or [] for c in value.split(",") if c.strip()]
    quiet_client_logs()
    try:
        printed = tail(load_config(), args.kind, customers=customers or None, from_beginning=args.from_beginning,
                       max_records=args.max, timeout_s=args.timeout, as_json=args.json, top=args.top,
                       topic=args.topic, connect_timeout_s=args.connect_timeout)
    except (ConfigError, ServiceUnreachable) as err:
        return exit_for(err)
    if printed:
        return EXIT_OK
    if args.allow_empty and args.timeout is not None:
        return EXIT_OK
    print("no record matched" + (f" within {args.timeout:g} s" if args.timeout else ""), file=sys.stderr)
    return EXIT_NOTHING


if __name__ == "__main__":
    sys.exit(main())
