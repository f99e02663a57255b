"""python -m tools.replay: send purchases from a file (or generated ones) to the transactions topic.

One JSON event per message, key = customer_id (a customer's events stay in order on one
partition). Paced by a token bucket (``--rate``) or as fast as the broker takes them; can inject
malformed events and duplicates so the streaming job's dead-letter and de-duplication paths can
be watched working. ``replay()`` is the same thing as a function, for the tests and the demo.

Exit codes: 0 done, 2 bad arguments or input file, 3 the broker cannot be reached,
130 interrupted (Ctrl-C; the summary of what was sent is still printed).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.config import Config, ConfigError, load_config
from tools import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    ServiceUnreachable,
    bootstrap_options,
    exit_for,
    kafka_unreachable,
    quiet_client_logs,
)

log = logging.getLogger(__name__)

RAW_COLUMNS = ("transaction_id", "customer_id", "product_id", "quantity", "event_time")
REQUIRED_COLUMNS = ("customer_id", "product_id")
# Fixed, so the same row always gets the same event_id and a re-run is recognised as a replay.
EVENT_ID_NAMESPACE = uuid.UUID("6f1f3c2e-9b0a-5d4e-8c61-2a7e0b9d4f11")
MALFORMED_KINDS = ("not_json", "missing_field", "wrong_type", "negative_quantity", "overlong_id", "bad_time")
_CHUNK_ROWS = 10_000


class InputError(ValueError):
    """An input file or argument the replay cannot use; the message says which and why."""


@dataclass
class ReplaySummary:
    topic: str
    rows_read: int = 0                 # input rows looked at (after --skip)
    sent: int = 0                      # messages written: valid + malformed + invalid rows + duplicates
    valid: int = 0                     # rows sent as well-formed events
    duplicates: int = 0                # valid events sent a second time with the same event_id
    invalid_rows_sent: int = 0         # rows with missing/bad values sent as they are (skip_invalid_rows=False)
    filtered_out: int = 0              # rows of customers not in the --customers filter
    failed: int = 0                    # messages the broker did not acknowledge
    malformed: Counter = field(default_factory=Counter)   # injected malformed events by kind
    skipped: Counter = field(default_factory=Counter)     # input rows not sent, by reason
    elapsed_s: float = 0.0
    interrupted: bool = False          # stopped by Ctrl-C; what was sent is still counted

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        lines = [f"replayed to topic {self.topic!r} in {self.elapsed_s:.1f} s: {self.sent:,} messages sent "
                 f"({self.valid:,} valid, {self.malformed_total:,} malformed, {self.duplicates:,} duplicates"
                 + (f", {self.invalid_rows_sent:,} invalid rows as they are" if self.invalid_rows_sent else "")
                 + f"), {self.achieved_rate:,.1f} messages/s",
                 f"input rows read: {self.rows_read:,}; skipped: {self.skipped_total:,}"
                 + "".join(f"\n  {reason}: {count:,}" for reason, count in sorted(self.skipped.items()))]
        if self.filtered_out:
            lines.append(f"rows of other customers (--customers): {self.filtered_out:,}")
        if self.malformed:
            lines.append("malformed injected: " + ", ".join(f"{kind} {count:,}"
                                                             for kind, count in sorted(self.malformed.items())))
        if self.failed:
            lines.append(f"NOT ACKNOWLEDGED by the broker: {self.failed:,} messages")
        if self.interrupted:
            lines.append("interrupted before the end of the input")
        return "\n".join(lines)


class TokenBucket:
    """Pacing at ``rate`` messages/s on average, with bursts of at most ``burst`` messages."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if not rate > 0:
            raise InputError(f"rate {rate!r} must be a positive number of events per second")
        self.rate = float(rate)
        self.capacity = max(1.0, burst if burst is not None else self.rate / 10)
        self.tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def take(self) -> None:
        """Block until one message may be sent."""
        while True:
            now = self._clock()
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            self._sleep((1 - self.tokens) / self.rate)


# ---------------------------------------------------------------------------------------------
# Rows -> events


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _as_id(value: Any) -> str:
    """An id as text: 12345.0 (an int column with gaps, read as float) becomes "12345"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def iso_utc_text(value: Any) -> str | None:
    """An event time (ISO-8601 text, datetime, numpy/pandas time, epoch s or ms) as ISO-8601 UTC with Z."""
    if _missing(value):
        return None
    moment = _parse_time(value)
    if moment is None:
        return None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond // 1000:03d}"
    return text + "Z"


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, np.datetime64):
        return pd.Timestamp(value).to_pydatetime()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        seconds = float(value) / 1000 if abs(float(value)) > 1e11 else float(value)
        return datetime.fromtimestamp(seconds, tz=UTC)
    # Text must be ISO-8601, as the streaming job requires: "03/04/2025" is ambiguous, not repaired.
    try:
        return datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return None


def _quantity(value: Any) -> int | None:
    """A positive whole quantity, 1 when absent; None when present but unusable."""
    if _missing(value):
        return 1
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or not number.is_integer() or number <= 0:
        return None
    return int(number)


def row_event_id(row: Mapping[str, Any], position: int) -> str:
    """The file's transaction_id, or a uuid5 of the row's values and its position in the input.

    The values are normalised first, so the same data read from CSV or Parquet gets the same id;
    the position keeps two identical purchases in one file apart.
    """
    if not _missing(row.get("transaction_id")):
        return _as_id(row["transaction_id"])
    basis = [position] + [None if _missing(row.get(n)) else _as_id(row[n]) for n in ("customer_id", "product_id")]
    basis += [_quantity(row.get("quantity")), iso_utc_text(row.get("event_time"))]
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, "|".join(map(str, basis))))


def event_from_row(row: Mapping[str, Any], position: int, time_from_clock: bool = False
                   ) -> tuple[dict, str | None]:
    """The event of one input row and the reason it is invalid (None when it is a valid event).

    An invalid row's event keeps what it has, so it can still be sent as it is. With
    ``time_from_clock`` the row's time is not needed (the caller stamps the send time).
    """
    event: dict[str, Any] = {"event_id": row_event_id(row, position)}
    problems = []
    for name in ("customer_id", "product_id"):
        if _missing(row.get(name)):
            problems.append(f"missing {name}")
        else:
            event[name] = _as_id(row[name])
    raw_quantity = row.get("quantity")
    event["quantity"] = _quantity(raw_quantity)
    if event["quantity"] is None:
        problems.append("quantity not a positive whole number")
        event["quantity"] = raw_quantity if isinstance(raw_quantity, (int, float, str)) else None
    event["event_time"] = iso_utc_text(row.get("event_time"))
    if event["event_time"] is None and not time_from_clock:
        raw_time = row.get("event_time")
        problems.append("missing event_time" if _missing(raw_time) else "unparseable event_time")
        event["event_time"] = None if _missing(raw_time) else str(raw_time)
    return event, (problems[0] if problems else None)


def malformed_value(event: dict, kind: str, rng: random.Random, max_id_length: int = 64) -> bytes:
    """A broken version of a valid event, of one of ``MALFORMED_KINDS``."""
    broken = dict(event)
    if kind == "not_json":
        text = json.dumps(event)
        return text[: max(1, len(text) // 2)].encode()      # a truncated message
    if kind == "missing_field":
        del broken[rng.choice(["customer_id", "product_id", "event_time"])]
    elif kind == "wrong_type":
        name = rng.choice(["quantity", "customer_id", "event_time"])
        broken[name] = {"quantity": str(event["quantity"]), "customer_id": rng.randint(1, 99_999),
                        "event_time": int(time.time())}[name]
    elif kind == "negative_quantity":
        broken["quantity"] = -abs(int(event.get("quantity") or 1))
    elif kind == "overlong_id":
        name = rng.choice(["customer_id", "product_id", "event_id"])
        broken[name] = (str(event[name]) + "X" * (4 * max_id_length))[: max(4 * max_id_length, 256)]
    elif kind == "bad_time":
        broken["event_time"] = rng.choice(["yesterday", "2025-13-45T25:61:00Z", "03/04/2025 10:21"])
    else:
        raise InputError(f"unknown malformed kind {kind!r}; one of {', '.join(MALFORMED_KINDS)}")
    return json.dumps(broken, separators=(",", ":")).encode()


def _now_iso() -> str:
    return iso_utc_text(datetime.now(UTC)) or ""


# ---------------------------------------------------------------------------------------------
# Input


def read_rows(path: str | Path) -> tuple[Iterator[dict], int | None]:
    """Rows of a CSV (optionally compressed) or Parquet file or folder, and their count if known."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    name = path.name.lower()
    if path.is_dir() or name.endswith((".parquet", ".pq")):
        return _parquet_rows(path)
    if ".csv" in name:
        return _csv_rows(path), None
    raise InputError(f"input file {path}: unknown format; expected .csv, .csv.gz, .parquet or a Parquet folder")


def _check_columns(path: Path, columns: Iterable[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in set(columns)]
    if missing:
        raise InputError(f"input file {path} lacks the column(s) {', '.join(missing)}; expected the raw "
                         f"transaction format: {', '.join(RAW_COLUMNS)}")


def _parquet_rows(path: Path) -> tuple[Iterator[dict], int]:
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(str(path), format="parquet")
        _check_columns(path, dataset.schema.names)
        total = dataset.count_rows()
    except InputError:
        raise
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise InputError(f"input file {path} is not readable Parquet: {err}") from None

    def rows() -> Iterator[dict]:
        for batch in dataset.to_batches(batch_size=_CHUNK_ROWS):
            yield from batch.to_pylist()

    return rows(), total


def _csv_rows(path: Path) -> Iterator[dict]:
    try:
        chunks = pd.read_csv(path, chunksize=_CHUNK_ROWS, dtype={"transaction_id": str, "customer_id": str,
                                                                 "product_id": str, "event_time": str})
        first = next(chunks, None)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"input file {path} is not readable CSV: {err}") from None
    if first is None:
        return iter(())
    _check_columns(path, first.columns)

    def rows() -> Iterator[dict]:
        yield from first.to_dict("records")
        for chunk in chunks:
            yield from chunk.to_dict("records")

    return rows()


def _frame_rows(frame: pd.DataFrame) -> Iterator[dict]:
    for start in range(0, len(frame), _CHUNK_ROWS):
        yield from frame.iloc[start:start + _CHUNK_ROWS].to_dict("records")


# ---------------------------------------------------------------------------------------------
# Sending


def make_producer(cfg: Config, connect_timeout_s: float = 10.0):
    """An ordered, acknowledged producer (idempotent where kafka-python supports it)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from models.clients import kafka_options

    options: dict[str, Any] = {"acks": "all", "linger_ms": 5, "max_block_ms": int(max(connect_timeout_s, 5) * 1000),
                               **bootstrap_options(KafkaProducer, connect_timeout_s)}
    if "enable_idempotence" in KafkaProducer.DEFAULT_CONFIG:
        options["enable_idempotence"] = True      # retries cannot reorder or double a customer's events
    else:
        options["max_in_flight_requests_per_connection"] = 1
    try:
        return KafkaProducer(**kafka_options(cfg), **options)
    except KafkaError as err:
        raise kafka_unreachable(cfg, err) from None


def replay(cfg: Config, rows: Iterable[Mapping[str, Any]] | pd.DataFrame, rate: float | None = None, *,
           topic: str | None = None, limit: int | None = None, skip: int = 0,
           customers: Collection[str] | None = None, now: bool = False,
           malformed_share: float = 0.0, duplicate_share: float = 0.0, seed: int = 0,
           skip_invalid_rows: bool = True, progress: bool = False, total: int | None = None,
           producer: Any = None, connect_timeout_s: float = 10.0) -> ReplaySummary:
    """Send ``rows`` (raw transactions) as events to the transactions topic; returns what was sent.

    ``rate`` is in messages/s (None: as fast as possible). ``limit`` counts input rows sent,
    not duplicates. Malformed events replace the row's event; duplicates are sent right after
    the original. ``producer`` lets a caller reuse its own (it is flushed, not closed).
    """
    _check_share("malformed", malformed_share)
    _check_share("duplicates", duplicate_share)
    if limit is not None and limit < 0 or skip < 0:
        raise InputError(f"limit ({limit}) and skip ({skip}) must not be negative")
    topic = topic or str(cfg.get_path("kafka.topics.transactions"))
    if isinstance(rows, pd.DataFrame):
        total = len(rows) if total is None else total
        rows = _frame_rows(rows)
    wanted = {str(c) for c in customers} if customers else None
    max_id_length = int(cfg.get_path("streaming.max_id_length", 64))
    summary = ReplaySummary(topic=topic)
    rng = random.Random(seed)
    bucket = TokenBucket(rate) if rate else None
    own_producer = producer is None
    producer = producer or make_producer(cfg, connect_timeout_s)
    failures: list[Exception] = []
    bar_total = None if total is None else max(0, total - skip)
    if limit is not None and wanted is None:
        bar_total = limit if bar_total is None else min(bar_total, limit)
    from tqdm import tqdm

    bar = tqdm(total=bar_total, unit="row", file=sys.stderr, disable=not progress, mininterval=0.5,
               desc=f"replay -> {topic}")

    def send(key: str, value: bytes) -> None:
        if bucket is not None:
            bucket.take()
        future = producer.send(topic, key=key.encode() if key else None, value=value)  # no id, no key
        future.add_errback(failures.append)
        summary.sent += 1

    started = time.monotonic()
    try:
        for position, row in enumerate(rows):
            if position < skip:
                continue
            if limit is not None and summary.sent - summary.duplicates >= limit:
                break
            summary.rows_read += 1
            bar.update(1)
            event, reason = event_from_row(row, position, time_from_clock=now)
            customer = event.get("customer_id", "")
            if wanted is not None and customer not in wanted:
                summary.filtered_out += 1
                continue
            if reason is not None and skip_invalid_rows:
                summary.skipped[reason] += 1
                continue
            if now:
                event["event_time"] = _now_iso()
            if reason is not None:
                present = {name: value for name, value in event.items() if value is not None}
                send(customer, json.dumps(present, separators=(",", ":"), default=str).encode())
                summary.invalid_rows_sent += 1
                continue
            if malformed_share and rng.random() < malformed_share:
                kind = rng.choice(MALFORMED_KINDS)
                send(customer, malformed_value(event, kind, rng, max_id_length))
                summary.malformed[kind] += 1
                continue
            value = json.dumps(event, separators=(",", ":")).encode()
            send(customer, value)
            summary.valid += 1
            if duplicate_share and rng.random() < duplicate_share:
                send(customer, value)
                summary.duplicates += 1
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        _flush(cfg, producer, close=own_producer)
        summary.failed = len(failures)
        summary.elapsed_s = time.monotonic() - started
    if failures:
        log.error("%d messages were not acknowledged; first error: %s", len(failures), failures[0])
    return summary


def _flush(cfg: Config, producer: Any, close: bool) -> None:
    from kafka.errors import KafkaError

    try:
        producer.flush(timeout=60)
    except KafkaError as err:
        raise kafka_unreachable(cfg, err) from None
    finally:
        if close:
            producer.close(timeout=10)


def _check_share(name: str, share: float) -> None:
    if not 0 <= share <= 1:
        raise InputError(f"--{name} {share!r} must be a share between 0 and 1 (e.g. 0.02 for 2%)")


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path,
                        help="CSV (.csv, .csv.gz) or Parquet file/folder of raw transactions")
    source.add_argument("--generate", type=float, metavar="FACTOR",
                        help="generate the sample transactions in memory instead (batch_training.generate)")
    parser.add_argument("--seed", type=int, default=42, help="seed of --generate and of the injected faults")
    parser.add_argument("--rate", type=float, help="messages per second (default: as fast as possible)")
    parser.add_argument("--limit", type=int, help="stop after sending this many input rows")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N input rows")
    parser.add_argument("--customers", help="only these customers: C1,C2,...")
    parser.add_argument("--now", action="store_true", help="set event_time to the current time (live demos)")
    parser.add_argument("--malformed", type=float, default=0.0, metavar="SHARE",
                        help="share of events replaced by malformed ones, e.g. 0.02")
    parser.add_argument("--duplicates", type=float, default=0.0, metavar="SHARE",
                        help="share of events sent twice with the same event_id, e.g. 0.01")
    parser.add_argument("--send-invalid-rows", action="store_true",
                        help="send rows with missing ids or bad values as they are (default: skip and count)")
    parser.add_argument("--topic", help="topic to write to (default: config kafka.topics.transactions)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the broker before giving up (exit 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _input_rows(args: argparse.Namespace) -> tuple[Iterable[Mapping] | pd.DataFrame, int | None]:
    if args.generate is not None:
        if not args.generate > 0:
            raise InputError(f"--generate {args.generate!r} must be a positive scale factor")
        try:
            from batch_training.generate import generate
        except ImportError as err:
            raise InputError(f"--generate needs batch_training.generate, which cannot be imported ({err}); "
                             "pass a transactions file instead") from None
        generated = generate(args.generate, args.seed)
        frame = generated[0] if isinstance(generated, tuple) else generated   # (transactions, products)
        _check_columns(Path("<generated>"), frame.columns)
        return frame, len(frame)
    return read_rows(args.file)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_client_logs()
    try:
        cfg = load_config()
        rows, total = _input_rows(args)
        customers = [c.strip() for c in args.customers.split(",") if c.strip()] if args.customers else None
        summary = replay(cfg, rows, args.rate, topic=args.topic, limit=args.limit, skip=args.skip,
                         customers=customers, now=args.now, malformed_share=args.malformed,
                         duplicate_share=args.duplicates, seed=args.seed,
                         skip_invalid_rows=not args.send_invalid_rows, progress=not args.quiet, total=total,
                         connect_timeout_s=args.connect_timeout)
    except (InputError, ConfigError, ServiceUnreachable) as err:
        return exit_for(err)
    print(summary)
    if summary.failed:
        print(f"error: {summary.failed} messages were not acknowledged by the broker at "
              f"{cfg.get_path('kafka.bootstrap_servers')}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_INTERRUPTED if summary.interrupted else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
