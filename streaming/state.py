"""Per-customer purchase state: the purchases since the current model's data cutoff.

The state lives in Spark's state store (``transformWithState``, Row-based, RocksDB provider,
checkpointed with the query): one ValueState per customer, ``purchases``, a single row of
parallel arrays (``STATE_SCHEMA``: event ids, product ids, quantities, event times and the
processing time each purchase arrived). Read and written whole, once each per customer and
micro-batch: two state-server round trips per customer instead of one per purchase, and no pandas
frame per customer.

- Keyed by event id inside the arrays, a replayed event (same ``event_id``) finds itself already
  there and is not counted twice, including after a crash and restart from the checkpoint.
- Each purchase keeps its event time, so when a new model is served the purchases at or before
  its cutoff (already in the model's training data) are dropped. The cutoff is the one of the
  model the driver serves for the batch (streaming/served.py), never an unverified one.
- Each purchase expires ``state_ttl`` after it arrived: the expired ones are dropped whenever the
  customer is next seen (``expire``), and the whole value carries the state API's TTL of
  ``state_ttl`` from its last update, so the state of a customer who stops buying goes away
  without being read (every purchase in it arrived by that update).

For every customer with input in a micro-batch the processor emits one row: all the purchases
held (since the cutoff), how many of the input rows were new, duplicates or older than the
cutoff, the Kafka timestamps of the new ones (for latency) and their newest offsets. The driver
scores the customers whose row has new purchases (streaming/refresh.py).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
from pyspark.sql import Row

log = logging.getLogger(__name__)

# The columns the processor receives (the valid events; see streaming.job).
INPUT_COLUMNS = ("customer_id", "event_id", "product_id", "quantity", "event_time_ms", "kafka_ts_ms",
                 "source_partition", "source_offset", "segment")
STATE_VARIABLE = "purchases"
STATE_SCHEMA = ("event_ids array<string>, product_ids array<string>, quantities array<int>, "
                "event_times_ms array<bigint>, arrived_ms array<bigint>")
OUTPUT_SCHEMA = ("customer_id string, product_ids array<string>, quantities array<int>, "
                 "event_times_ms array<long>, new_events int, duplicate_events int, before_cutoff_events int, "
                 "new_kafka_ts_ms array<long>, source_offsets map<string,long>, cutoff_ms long, segment string")
OUTPUT_COLUMNS = tuple(column.split()[0] for column in OUTPUT_SCHEMA.split(", "))


@dataclass
class Merge:
    """What one micro-batch does to one customer's purchases (see ``merge_purchases``)."""

    held: dict[str, tuple[str, int, int]]            # event_id -> (product_id, quantity, event_time_ms)
    added: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # held before, now at or before the cutoff
    duplicates: int = 0
    before_cutoff: int = 0
    new_kafka_ts_ms: list[int] = field(default_factory=list)
    source_offsets: dict[str, int] = field(default_factory=dict)
    segment: str | None = None      # the newest event's segment in this batch (events without one skipped)


def merge_purchases(held: dict[str, tuple[str, int, int]], batch: pd.DataFrame | Iterable,
                    cutoff_ms: int | None) -> Merge:
    """Fold a customer's new input rows into the purchases held for them.

    Rows whose ``event_id`` is held already, or appears earlier in the batch (by offset), are
    duplicates; rows at or before ``cutoff_ms`` are in the model already and are not kept, and
    held purchases now at or before it are removed. ``batch`` is a frame or an iterable of rows
    (``pyspark.sql.Row`` or anything with the ``INPUT_COLUMNS`` as attributes). Pure (no Spark),
    for the unit tests. Plain Python over the rows: a customer has a handful per batch, where
    pandas' per-call overhead would dominate the state stage.
    """
    floor = -math.inf if cutoff_ms is None else cutoff_ms
    kept = {eid: value for eid, value in held.items() if value[2] > floor}
    merge = Merge(held=kept, removed=[eid for eid in held if eid not in kept])
    seen = set(held)
    for partition, offset, event_id, product_id, quantity, event_time_ms, kafka_ts_ms, segment in _input_tuples(batch):
        if segment is not None and segment == segment:     # not None / NaN
            merge.segment = str(segment)
        if event_id in seen:
            merge.duplicates += 1
            continue
        seen.add(event_id)
        if event_time_ms <= floor:
            merge.before_cutoff += 1
        else:
            merge.added[event_id] = (str(product_id), int(quantity), int(event_time_ms))
            merge.new_kafka_ts_ms.append(int(kafka_ts_ms))
            merge.source_offsets[partition] = max(int(offset), merge.source_offsets.get(partition, -1))
    merge.held.update(merge.added)
    return merge


_MERGE_ORDER = ("source_partition", "source_offset", "event_id", "product_id", "quantity", "event_time_ms",
                "kafka_ts_ms")


def _input_tuples(batch) -> list[tuple]:
    """The input rows as (partition, offset, event_id, product_id, quantity, event_time_ms,
    kafka_ts_ms, segment), in offset order (so the first of two copies in a batch is the one
    kept); ``segment`` is optional in the input (None without it)."""
    if isinstance(batch, pd.DataFrame):
        segments = batch["segment"].tolist() if "segment" in batch else [None] * len(batch)
        return sorted(zip(*(batch[name].tolist() for name in _MERGE_ORDER), segments), key=lambda t: t[:2])
    return sorted(((*(getattr(row, name) for name in _MERGE_ORDER), _optional(row, "segment")) for row in batch),
                  key=lambda t: t[:2])


def _optional(row, name: str):
    try:
        return getattr(row, name)
    except (AttributeError, KeyError):   # a Row without the field raises one or the other
        return None


_OUTPUT_ROW = Row(*OUTPUT_COLUMNS)


def output_row(customer_id: str, merge: Merge, cutoff_ms: int | None) -> Row:
    """The processor's one output row for a customer (a ``Row`` with the ``OUTPUT_SCHEMA``
    columns in order; purchases oldest first)."""
    purchases = sorted(merge.held.values(), key=lambda p: p[2])
    return _OUTPUT_ROW(customer_id, [p[0] for p in purchases], [p[1] for p in purchases],
                       [p[2] for p in purchases], len(merge.added), merge.duplicates, merge.before_cutoff,
                       merge.new_kafka_ts_ms, merge.source_offsets, cutoff_ms, merge.segment)


def held_from_state(value) -> tuple[dict[str, tuple[str, int, int]], dict[str, int]]:
    """A state value (the arrays of ``STATE_SCHEMA``, or None) -> (held purchases: event_id ->
    (product_id, quantity, event_time_ms), their arrival times: event_id -> processing-time ms)."""
    if value is None:
        return {}, {}
    event_ids, product_ids, quantities, times, arrived = value
    held = {e: (p, int(q), int(t)) for e, p, q, t in zip(event_ids, product_ids, quantities, times)}
    return held, {e: int(a) for e, a in zip(event_ids, arrived)}


def state_value(held: dict[str, tuple[str, int, int]], arrived: dict[str, int]) -> tuple[list, ...]:
    """(held purchases, arrival times) -> the state value (``STATE_SCHEMA``), oldest event first."""
    order = sorted(held, key=lambda e: held[e][2])
    return (order, [held[e][0] for e in order], [held[e][1] for e in order], [held[e][2] for e in order],
            [arrived[e] for e in order])


def expire(held: dict[str, tuple[str, int, int]], arrived: dict[str, int], now_ms: int,
           ttl_ms: int) -> list[str]:
    """Remove (in place) the purchases that arrived ``ttl_ms`` or more before ``now_ms``; returns
    their event ids."""
    gone = [event_id for event_id, at in arrived.items() if at + ttl_ms <= now_ms]
    for event_id in gone:
        held.pop(event_id, None)
        del arrived[event_id]
    return gone


def advance(held: dict[str, tuple[str, int, int]], arrived: dict[str, int], batch, now_ms: int, ttl_ms: int,
            cutoff_ms: int | None) -> Merge:
    """One customer's micro-batch: expire what outlived the TTL, fold in the new rows
    (``merge_purchases``) and stamp the added purchases with the batch's time (``arrived`` is
    updated in place). The processor flavours differ only in how they read and write the state
    around this."""
    expire(held, arrived, now_ms, ttl_ms)
    merge = merge_purchases(held, batch, cutoff_ms)
    for event_id in merge.added:
        arrived[event_id] = now_ms
    return merge


def iso_to_ms(text: str | None) -> int | None:
    if not text:
        return None
    return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1000)


def processor_base():
    """The base class of the stream's state processors (Spark's StatefulProcessor): the scoring
    query's here, the quality monitor's in streaming/quality.py."""
    from pyspark.sql.streaming import StatefulProcessor

    return StatefulProcessor


class PurchaseStateProcessor(processor_base()):
    """The StatefulProcessor of the scoring query (Row-based ``transformWithState``; one instance
    per partition and batch)."""

    def __init__(self, ttl_ms: int):
        self.ttl_ms = ttl_ms

    def init(self, handle) -> None:
        # Also called once on the driver to learn the state schema: the cutoff is read lazily,
        # from the first task's properties (streaming/served.py), once per partition and batch.
        self.purchases = handle.getValueState(STATE_VARIABLE, STATE_SCHEMA, self.ttl_ms)
        self._cutoff_ms: tuple[int | None] | None = None

    def handleInputRows(self, key, rows, timerValues) -> Iterator:
        now_ms = timerValues.getCurrentProcessingTimeInMs()    # the batch's time: the same on a replay
        stored = self.purchases.get()
        held, arrived = held_from_state(stored)
        if self._cutoff_ms is None:
            from streaming.served import served_cutoff_ms

            self._cutoff_ms = (served_cutoff_ms(),)     # the driver's verified model for this batch
        cutoff_ms = self._cutoff_ms[0]
        merge = advance(held, arrived, rows, now_ms, self.ttl_ms, cutoff_ms)
        if merge.held:
            self.purchases.update(state_value(merge.held, arrived))
        elif stored is not None:
            self.purchases.clear()
        yield output_row(str(key[0]), merge, cutoff_ms)

    def close(self) -> None:
        pass
