"""The recommendation record: one format, one writer, for the batch and the streaming job.

A record is a customer's ranked top-k at a point in time. It goes to the recommendations topic
(JSON value, key = customer_id) and to the DynamoDB table (one item per customer_id). Both sinks
order records by (last_event_ms, computed_at_ms): the table refuses, by a conditional write, any
record older than the one it holds, so a late or replayed write never hides a newer result, and
writing the same record twice is harmless. The schemas are documented in docs/schemas.md, with
JSON Schemas for the message (docs/recommendation-record.schema.json) and the table item
(docs/recommendation-item.schema.json); the item holds the message's fields with the same types.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np

from models.config import Config

log = logging.getLogger(__name__)

# The record's major version (docs/schemas.md, "Versions"): additive changes keep it, anything else
# bumps it. 2: the table item took the message's types (source_offsets a map, not JSON text; an
# unknown last_event_ms absent, not 0); the topic message is the same as version 1's.
SCHEMA_VERSION = 2


def iso_utc(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds and a Z."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RecommendationRecord:
    customer_id: str
    product_ids: list[str]
    scores: list[float]
    model_version: str
    strategy: str                      # "personalized", "popularity" or "segment_popularity"
    last_event_ms: int | None          # newest purchase the record reflects
    computed_at_ms: int
    source: str                        # "batch" or "stream"
    source_offsets: dict[str, int] | None = None   # "topic-partition" -> newest offset reflected
    extra: dict = field(default_factory=dict)

    @property
    def order_key(self) -> tuple[int, int]:
        return (self.last_event_ms or 0, self.computed_at_ms)

    def to_message(self) -> dict:
        """The JSON document published on the recommendations topic."""
        return {
            "schema_version": SCHEMA_VERSION,
            "customer_id": self.customer_id,
            "recommendations": [{"rank": rank, "product_id": pid, "score": round(float(score), 6)}
                                for rank, (pid, score) in enumerate(zip(self.product_ids, self.scores), 1)],
            "strategy": self.strategy,
            "model_version": self.model_version,
            "last_event_time": iso_utc(self.last_event_ms),
            "last_event_ms": self.last_event_ms,
            "computed_at": iso_utc(self.computed_at_ms),
            "computed_at_ms": self.computed_at_ms,
            "source": self.source,
            "source_offsets": self.source_offsets,
            **self.extra,
        }

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_message(), separators=(",", ":")).encode()

    def to_item(self) -> dict:
        """The DynamoDB item: the message's fields with the same types, as boto3's resource API takes
        them (numbers as int or Decimal, never float; source_offsets a map). A field that is null in
        the message is absent from the item (DynamoDB's way to say unknown)."""
        return {key: _to_dynamo_value(value) for key, value in self.to_message().items() if value is not None}


def _to_dynamo_value(value):
    if isinstance(value, float):
        return Decimal(str(round(value, 6)))
    if isinstance(value, list):
        return [_to_dynamo_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_dynamo_value(v) for k, v in value.items()}
    return value


def build_records(customer_ids: Sequence[str], item_idx: np.ndarray, scores: np.ndarray,
                  item_ids: np.ndarray, model_version: str, strategies: Sequence[str],
                  last_event_ms: Sequence[int | None], source: str,
                  source_offsets: Sequence[dict | None] | None = None,
                  computed_at_ms: int | None = None) -> list[RecommendationRecord]:
    """Records from the scoring output (rows aligned with ``customer_ids``; -1 pads short lists)."""
    computed = computed_at_ms or now_ms()
    records = []
    for row, customer_id in enumerate(customer_ids):
        valid = item_idx[row] >= 0
        records.append(RecommendationRecord(
            customer_id=str(customer_id),
            product_ids=[str(p) for p in item_ids[item_idx[row][valid]]],
            scores=[float(s) for s in scores[row][valid]],
            model_version=model_version, strategy=strategies[row],
            last_event_ms=None if last_event_ms[row] is None else int(last_event_ms[row]),
            computed_at_ms=computed, source=source,
            source_offsets=None if source_offsets is None else source_offsets[row]))
    return records


class SinkError(RuntimeError):
    """A sink stayed unreachable longer than the outage tolerance (the message says which and why)."""


@dataclass
class WriteSummary:
    topic_records: int = 0
    table_written: int = 0
    table_skipped_stale: int = 0
    attempts: int = 1

    def __str__(self) -> str:
        return (f"{self.topic_records:,} records to the topic, {self.table_written:,} table items written, "
                f"{self.table_skipped_stale:,} skipped as older than the stored one"
                + (f" ({self.attempts} attempts)" if self.attempts > 1 else ""))


# Backoff between write attempts during an outage: doubling from the first, capped.
RETRY_FIRST_S = 0.5
RETRY_CAP_S = 30.0


class RecordWriter:
    """Publishes records to the recommendations topic and/or the DynamoDB table."""

    def __init__(self, cfg: Config, to_topic: bool = True, to_table: bool = True, threads: int = 8):
        self.cfg = cfg
        self.topic = str(cfg.get_path("kafka.topics.recommendations"))
        self.table_name = str(cfg.get_path("dynamodb.table"))
        self.threads = threads
        self._producer = self._make_producer() if to_topic else None
        self._table = self._make_table() if to_table else None

    def _make_producer(self):
        from kafka import KafkaProducer

        from models.clients import kafka_options

        # Records come in bursts of a micro-batch (thousands at once): 1 MB batches send them
        # 25 % faster than the 16 kB default (6,210 records of 1.3 kB: 0.93 s against 1.23 s).
        # After a broker outage, reconnect within 2 s of its return (the client's default backoff
        # grows to 30 s, which held a batch's write 25 s after the broker was back).
        return KafkaProducer(**kafka_options(self.cfg), acks="all", linger_ms=20, batch_size=1 << 20,
                             retries=5, max_block_ms=30000, reconnect_backoff_max_ms=2000)

    def _make_table(self):
        import boto3
        from botocore.config import Config as BotoConfig

        from models.clients import _BOTO_TIMEOUTS

        endpoint = self.cfg.get_path("dynamodb.endpoint_url", None)
        kwargs = {"region_name": self.cfg.get_path("dynamodb.region", "us-east-1"),
                  "config": BotoConfig(max_pool_connections=max(10, self.threads * 2), **_BOTO_TIMEOUTS)}
        if endpoint:
            kwargs.update(endpoint_url=endpoint, aws_access_key_id=self.cfg.get_path("aws.access_key_id", "local"),
                          aws_secret_access_key=self.cfg.get_path("aws.secret_access_key", "local"))
        return boto3.resource("dynamodb", **kwargs).Table(self.table_name)

    def write(self, records: Iterable[RecommendationRecord], outage_tolerance_s: float = 0.0,
              label: str = "records", tolerance_setting: str | None = None) -> WriteSummary:
        """Write every record to each sink. What fails is re-sent alone (never the records already
        written), after a capped exponential backoff with a WARNING per attempt, for as long as the
        failures last less than ``outage_tolerance_s``; past it, SinkError (naming
        ``tolerance_setting``, the caller's setting of that tolerance)."""
        records = list(records)
        summary = WriteSummary(attempts=0)
        pending_topic = records if self._producer is not None else []
        pending_table = records if self._table is not None else []
        first_failure: float | None = None
        while True:
            summary.attempts += 1
            topic_failed, topic_error = self._send_to_topic(pending_topic)
            summary.topic_records += len(pending_topic) - len(topic_failed)
            table_failed, table_error = self._put_in_table(pending_table, summary)
            if not topic_failed and not table_failed:
                return summary
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            failing = now - first_failure
            problems = "; ".join(f"{sink}: {len(failed):,} failed ({describe_error(error)})" for sink, failed, error in
                                 (("topic", topic_failed, topic_error), ("table", table_failed, table_error))
                                 if failed)
            if failing >= outage_tolerance_s:
                setting = f" ({tolerance_setting})" if tolerance_setting else ""
                raise SinkError(f"{label}: writing failed for {failing:.0f} s, past the outage tolerance of "
                                f"{outage_tolerance_s:.0f} s{setting}: {problems}")
            delay = min(RETRY_CAP_S, RETRY_FIRST_S * 2 ** (summary.attempts - 1), outage_tolerance_s - failing)
            log.warning("%s: %s; attempt %d failed, retrying only those in %.1f s (failing for %.0f s of the "
                        "%.0f s tolerated)", label, problems, summary.attempts, delay, failing, outage_tolerance_s)
            time.sleep(delay)
            pending_topic, pending_table = topic_failed, table_failed

    def _send_to_topic(self, records: list[RecommendationRecord]) -> tuple[list, Exception | None]:
        """Send and flush; returns the records not acknowledged and the first error seen."""
        if not records:
            return [], None
        sent, failed, error = [], [], None
        for position, record in enumerate(records):
            try:
                sent.append((record, self._producer.send(self.topic, key=record.customer_id.encode(),
                                                         value=record.to_json_bytes())))
            except Exception as err:  # noqa: BLE001 - metadata or buffer timeout: the broker is away
                failed, error = records[position:], err
                break
        try:
            self._producer.flush(timeout=60)
        except Exception as err:  # noqa: BLE001 - the unacknowledged ones are found below
            error = error or err
        for record, future in sent:
            if not (future.is_done and future.succeeded()):
                failed.append(record)
                error = error or (future.exception if future.is_done else TimeoutError("not acknowledged"))
        return failed, error

    def _put_in_table(self, records: list[RecommendationRecord],
                      summary: WriteSummary) -> tuple[list, Exception | None]:
        """Conditional puts in parallel; returns the records that failed and the first error."""
        if not records:
            return [], None
        with ThreadPoolExecutor(self.threads) as pool:
            outcomes = list(pool.map(self._put_safely, records))
        failed = [record for record, outcome in zip(records, outcomes) if isinstance(outcome, Exception)]
        summary.table_written += sum(outcome is True for outcome in outcomes)
        summary.table_skipped_stale += sum(outcome is False for outcome in outcomes)
        return failed, next((o for o in outcomes if isinstance(o, Exception)), None)

    def _put_safely(self, record: RecommendationRecord) -> bool | Exception:
        try:
            return self._put_if_newer(record)
        except Exception as err:  # noqa: BLE001 - collected and retried by write()
            return err

    def _put_if_newer(self, record: RecommendationRecord) -> bool:
        """Conditional put: only if the table holds nothing for the customer or something older."""
        from botocore.exceptions import ClientError

        try:
            self._table.put_item(Item=record.to_item(), **newer_than_stored(record))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=30)


def newer_than_stored(record: RecommendationRecord) -> dict:
    """put_item's condition: the table holds nothing for the customer, or a record whose
    (last_event_ms, computed_at_ms) is at most the record's. An unknown last_event_ms (absent from
    the item; 0 in items written by schema version 1) orders as 0, the oldest, as in order_key."""
    event_ms, computed_ms = record.order_key
    condition = ("attribute_not_exists(customer_id) OR last_event_ms < :e "
                 "OR (last_event_ms = :e AND computed_at_ms <= :c)")
    if event_ms > 0:        # a stored item with an unknown event time is older
        condition += " OR attribute_not_exists(last_event_ms)"
    elif event_ms == 0:     # both unknown (or 0): the later computation wins
        condition += " OR (attribute_not_exists(last_event_ms) AND computed_at_ms <= :c)"
    return {"ConditionExpression": condition,
            "ExpressionAttributeValues": {":e": event_ms, ":c": computed_ms}}


def describe_error(error: BaseException | None) -> str:
    """An error in one line (the type and its first line: SDK messages name hosts, never secrets)."""
    if error is None:
        return "no error reported"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def read_table_item(cfg: Config, customer_id: str) -> dict | None:
    """The stored record of one customer (for the lookup tool and the tests)."""
    from models.clients import dynamodb_client

    response = dynamodb_client(cfg).get_item(TableName=str(cfg.get_path("dynamodb.table")),
                                             Key={"customer_id": {"S": str(customer_id)}}, ConsistentRead=True)
    item = response.get("Item")
    if item is None:
        return None
    from boto3.dynamodb.types import TypeDeserializer

    deserializer = TypeDeserializer()
    return {key: deserializer.deserialize(value) for key, value in item.items()}
