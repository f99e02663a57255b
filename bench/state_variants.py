"""Candidate implementations of the scoring query's per-customer state stage, for bench/state_bench.py.

Each holds the rules of ``streaming.state.PurchaseStateProcessor`` with its pure functions
(``held_from_state``, ``advance``, ``state_value``, ``output_row``): dedup by
``event_id`` across batches, purchases at or before the served model's cutoff dropped (the cutoff
read from the task's local property, ``streaming.served``), per-purchase expiry ``ttl_ms`` after
arrival (the batch's processing time), and one ``OUTPUT_SCHEMA`` row per customer with input.
Only the Spark API around them differs:

- ``apply_in_pandas_with_state``: ``applyInPandasWithState`` with a processing-time timeout as
  the whole value's TTL. Its state is one JSON string: on pyspark 4.2.0 a state schema with array
  columns (``STATE_SCHEMA``) fails in the worker with ``KeyError: 'elementType'`` while it parses
  the state schema the JVM sends (checked again for this bench).
- ``PandasPurchaseStateProcessor``: ``transformWithStateInPandas``, the same ValueState of
  arrays with the state API's TTL as the shipped processor; one pandas frame in and out per
  customer (4.2 batches only the rows of one key, never several keys, into a frame).
- ``BlobPurchaseStateProcessor``: the shipped Row-based processor with its state stored as ONE
  packed binary value (``BLOB_STATE_SCHEMA``, ``pack_state`` / ``unpack_state``) instead of five
  arrays of ~100 cells, which the state client normalizes and pickles cell by cell and the JVM
  turns into an UnsafeRow of arrays; the same TTL, cutoff and output.
- ``jvm_native``: ``dropDuplicatesWithinWatermark`` + a streaming aggregation, no Python; it
  cannot hold most of the rules (see its docstring).

Not imported by the project; bench/state_bench.py ships this module to the Python workers by
value.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from itertools import accumulate

import pandas as pd
from pyspark.sql.streaming import StatefulProcessor

from streaming.state import (
    OUTPUT_COLUMNS,
    OUTPUT_SCHEMA,
    STATE_SCHEMA,
    STATE_VARIABLE,
    advance,
    held_from_state,
    output_row,
    state_value,
)

JSON_STATE_SCHEMA = "purchases string"      # json of the five STATE_SCHEMA arrays


def _served_cutoff_cached(cache: dict):
    """The served cutoff of this task (streaming.served), read once per task attempt like the
    shipped processor does (once per partition and batch)."""
    from pyspark import TaskContext

    from streaming.served import served_cutoff_ms

    context = TaskContext.get()
    attempt = context.taskAttemptId() if context is not None else None
    if cache.get("attempt", object()) != attempt:
        cache["attempt"], cache["cutoff"] = attempt, served_cutoff_ms()
    return cache["cutoff"]


def _one_frame(frames) -> pd.DataFrame:
    """A customer's input, which the pandas APIs may hand over in several frames, as one."""
    frames = list(frames)
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _frame(row) -> pd.DataFrame:
    """One OUTPUT_SCHEMA row (a Row / tuple) as a one-row pandas frame."""
    return pd.DataFrame({name: [value] for name, value in zip(OUTPUT_COLUMNS, row)})


# --- (b) applyInPandasWithState ----------------------------------------------------------------

def apply_in_pandas_with_state(ttl_ms: int):
    """The function for ``groupBy("customer_id").applyInPandasWithState(f, OUTPUT_SCHEMA,
    JSON_STATE_SCHEMA, "Update", GroupStateTimeout.ProcessingTimeTimeout)``."""
    cache: dict = {}

    def update(key, frames: Iterator[pd.DataFrame], state) -> Iterator[pd.DataFrame]:
        if state.hasTimedOut:           # no purchase of this customer updated for ttl_ms: all expired
            state.remove()
            return
        now_ms = state.getCurrentProcessingTimeMs()      # the batch's time (the same on a replay)
        stored = state.get if state.exists else None
        held, arrived = held_from_state(json.loads(stored[0]) if stored is not None else None)
        cutoff_ms = _served_cutoff_cached(cache)
        merge = advance(held, arrived, _one_frame(frames), now_ms, ttl_ms, cutoff_ms)
        if merge.held:
            state.update((json.dumps(state_value(merge.held, arrived), separators=(",", ":")),))
            state.setTimeoutDuration(ttl_ms)
        elif stored is not None:
            state.remove()
        yield _frame(output_row(str(key[0]), merge, cutoff_ms))

    return update


# --- (c) transformWithStateInPandas -------------------------------------------------------------

class PandasPurchaseStateProcessor(StatefulProcessor):
    """``PurchaseStateProcessor`` for ``transformWithStateInPandas``: the same ValueState of
    arrays with the state API's TTL; a pandas frame per customer in and out."""

    def __init__(self, ttl_ms: int):
        self.ttl_ms = ttl_ms

    def init(self, handle) -> None:
        self.purchases = handle.getValueState(STATE_VARIABLE, STATE_SCHEMA, self.ttl_ms)
        self._cutoff_ms: tuple | None = None

    def handleInputRows(self, key, rows, timerValues) -> Iterator[pd.DataFrame]:
        now_ms = timerValues.getCurrentProcessingTimeInMs()
        stored = self.purchases.get()
        held, arrived = held_from_state(stored)
        if self._cutoff_ms is None:
            from streaming.served import served_cutoff_ms

            self._cutoff_ms = (served_cutoff_ms(),)
        cutoff_ms = self._cutoff_ms[0]
        merge = advance(held, arrived, _one_frame(rows), now_ms, self.ttl_ms, cutoff_ms)
        if merge.held:
            self.purchases.update(state_value(merge.held, arrived))
        elif stored is not None:
            self.purchases.clear()
        yield _frame(output_row(str(key[0]), merge, cutoff_ms))

    def close(self) -> None:
        pass


# --- (c2) transformWithState, Row-based, state as one packed binary value ----------------------

BLOB_STATE_SCHEMA = "value binary"      # pack_state of the five STATE_SCHEMA arrays
_BLOB_VERSION = 1
# format strings, not struct.Struct objects: this module is pickled by value, and a Struct does not pickle
_BLOB_HEADER = "<BI"                   # format version, number of purchases n
_BLOB_HEADER_SIZE = struct.calcsize(_BLOB_HEADER)


def pack_state(value: tuple[list, ...]) -> bytes:
    """The five ``STATE_SCHEMA`` arrays (``state_value``'s tuple) -> one bytes value.

    Layout (little-endian): u8 version (1), u32 n; n int32 quantities, n int64 event times, n int64
    arrival times, n u32 event-id lengths, n u32 product-id lengths (in characters); then the event
    ids and product ids concatenated, UTF-8. One ``struct.pack`` and one ``encode``."""
    event_ids, product_ids, quantities, times, arrived = value
    n = len(event_ids)
    numbers = struct.pack(f"<{n}i{n}q{n}q{n}I{n}I", *quantities, *times, *arrived,
                          *map(len, event_ids), *map(len, product_ids))
    return struct.pack(_BLOB_HEADER, _BLOB_VERSION, n) + numbers + "".join(event_ids + product_ids).encode("utf-8")


def unpack_state(blob: bytes) -> tuple[list, ...]:
    """``pack_state``'s bytes -> the five ``STATE_SCHEMA`` arrays (as lists), for ``held_from_state``."""
    version, n = struct.unpack_from(_BLOB_HEADER, blob, 0)
    if version != _BLOB_VERSION:
        raise ValueError(f"unknown purchase-state blob version {version}")
    layout = struct.Struct(f"<{n}i{n}q{n}q{n}I{n}I")
    numbers = layout.unpack_from(blob, _BLOB_HEADER_SIZE)
    text = bytes(blob[_BLOB_HEADER_SIZE + layout.size:]).decode("utf-8")
    ends = list(accumulate(numbers[3 * n:5 * n]))
    starts = [0, *ends[:-1]]
    strings = [text[a:b] for a, b in zip(starts, ends)]
    return (strings[:n], strings[n:], list(numbers[:n]), list(numbers[n:2 * n]), list(numbers[2 * n:3 * n]))


class BlobPurchaseStateProcessor(StatefulProcessor):
    """``streaming.state.PurchaseStateProcessor`` line for line (Row-based ``transformWithState``,
    the state API's TTL, the cutoff once per partition and batch), with the ValueState holding
    one ``pack_state`` value (``BLOB_STATE_SCHEMA``) instead of the five arrays."""

    def __init__(self, ttl_ms: int):
        self.ttl_ms = ttl_ms

    def init(self, handle) -> None:
        self.purchases = handle.getValueState(STATE_VARIABLE, BLOB_STATE_SCHEMA, self.ttl_ms)
        self._cutoff_ms: tuple | None = None

    def handleInputRows(self, key, rows, timerValues) -> Iterator:
        now_ms = timerValues.getCurrentProcessingTimeInMs()
        stored = self.purchases.get()
        held, arrived = held_from_state(unpack_state(stored[0]) if stored is not None else None)
        if self._cutoff_ms is None:
            from streaming.served import served_cutoff_ms

            self._cutoff_ms = (served_cutoff_ms(),)
        cutoff_ms = self._cutoff_ms[0]
        merge = advance(held, arrived, rows, now_ms, self.ttl_ms, cutoff_ms)
        if merge.held:
            self.purchases.update((pack_state(state_value(merge.held, arrived)),))
        elif stored is not None:
            self.purchases.clear()
        yield output_row(str(key[0]), merge, cutoff_ms)

    def close(self) -> None:
        pass


# --- (d) JVM-native -----------------------------------------------------------------------------

JVM_OUTPUT_COLUMNS = ("customer_id", "held", "purchases", "source_offset")


def jvm_native(events, ttl_ms: int, cutoff_ms: int | None):
    """``dropDuplicatesWithinWatermark`` by (customer, event id) on an event-time watermark of
    ``ttl_ms``, the cutoff as a filter fixed when the query is defined, then a streaming
    aggregation (collect_list of the purchases) per customer in update mode.

    What it cannot hold: duplicates and before-cutoff rows are dropped silently (no per-customer
    counts; a customer whose batch holds only those gets no row); the dedup window is event time,
    not arrival (a replay whose event time is behind the watermark is dropped as late, and so is
    any late purchase); the cutoff is a literal of the plan, so a hot-swapped model neither
    applies to the next batch nor purges purchases already held; the aggregation's state has no
    TTL (no time column in the key: it grows forever); it emits the customer's whole history, not
    the batch's new purchases, Kafka timestamps and offsets.
    """
    from pyspark.sql import functions as F

    stamped = events.withColumn("event_ts", F.timestamp_millis("event_time_ms")).withWatermark(
        "event_ts", f"{ttl_ms} milliseconds")
    kept = stamped.dropDuplicatesWithinWatermark(["customer_id", "event_id"])
    if cutoff_ms is not None:
        kept = kept.where(F.col("event_time_ms") > F.lit(cutoff_ms))
    return kept.groupBy("customer_id").agg(
        F.count(F.lit(1)).alias("held"),
        F.collect_list(F.struct("event_id", "product_id", "quantity", "event_time_ms")).alias("purchases"),
        F.max("source_offset").alias("source_offset"))


__all__ = ["BLOB_STATE_SCHEMA", "BlobPurchaseStateProcessor", "JSON_STATE_SCHEMA", "OUTPUT_SCHEMA",
           "PandasPurchaseStateProcessor", "apply_in_pandas_with_state", "jvm_native", "pack_state", "unpack_state"]
