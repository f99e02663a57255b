"""Per-customer purchase state: the purchases since the current model's data cutoff.

The state lives in Spark's state store (``transformWithStateInPandas``, RocksDB provider,
checkpointed with the query), one MapState per customer keyed by ``event_id``:

- keyed by event id, a replayed event (same ``event_id``) finds itself already there and is not
  counted twice, including after a crash and restart from the checkpoint;
- each purchase keeps its event time, so when a new model is published the purchases at or
  before its cutoff (already in the model's training data) are dropped;
- each entry expires ``state_ttl`` after it was written (the state API's TTL), which bounds the
  state of customers who stop buying.

For every customer with input in a micro-batch the processor emits one row: all the purchases
held (since the cutoff), how many of the input rows were new, duplicates or older than the
cutoff, the Kafka timestamps of the new ones (for latency) and their newest offsets. The driver
scores the customers whose row has new purchases (streaming/refresh.py).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

import pandas as pd

log = logging.getLogger(__name__)

# The columns the processor receives (the valid events; see streaming.job).
INPUT_COLUMNS = ("customer_id", "event_id", "product_id", "quantity", "event_time_ms", "kafka_ts_ms",
                 "source_partition", "source_offset")
STATE_KEY_SCHEMA = "event_id string"
STATE_VALUE_SCHEMA = "product_id string, quantity int, event_time_ms long"
OUTPUT_SCHEMA = ("customer_id string, product_ids array<string>, quantities array<int>, "
                 "event_times_ms array<long>, new_events int, duplicate_events int, before_cutoff_events int, "
                 "new_kafka_ts_ms array<long>, source_offsets map<string,long>, cutoff_ms long")


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


def merge_purchases(held: dict[str, tuple[str, int, int]], batch: pd.DataFrame,
                    cutoff_ms: int | None) -> Merge:
    """Fold a customer's new input rows into the purchases held for them.

    Rows whose ``event_id`` is held already, or appears earlier in the batch (by offset), are
    duplicates; rows at or before ``cutoff_ms`` are in the model already and are not kept, and
    held purchases now at or before it are removed. Pure (no Spark), for the unit tests. Plain
    Python over the rows: a customer has a handful per batch, where pandas' per-call overhead
    would dominate the state stage.
    """
    floor = -math.inf if cutoff_ms is None else cutoff_ms
    kept = {eid: value for eid, value in held.items() if value[2] > floor}
    merge = Merge(held=kept, removed=[eid for eid in held if eid not in kept])
    columns = [batch[name].tolist() for name in ("source_partition", "source_offset", "event_id", "product_id",
                                                  "quantity", "event_time_ms", "kafka_ts_ms")]
    seen = set(held)
    for partition, offset, event_id, product_id, quantity, event_time_ms, kafka_ts_ms in sorted(zip(*columns)):
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


def output_row(customer_id: str, merge: Merge, cutoff_ms: int | None) -> pd.DataFrame:
    """The processor's one output row for a customer (columns of ``OUTPUT_SCHEMA``)."""
    purchases = sorted(merge.held.values(), key=lambda p: p[2])
    return pd.DataFrame({
        "customer_id": [customer_id],
        "product_ids": [[p[0] for p in purchases]],
        "quantities": [[p[1] for p in purchases]],
        "event_times_ms": [[p[2] for p in purchases]],
        "new_events": [len(merge.added)],
        "duplicate_events": [merge.duplicates],
        "before_cutoff_events": [merge.before_cutoff],
        "new_kafka_ts_ms": [merge.new_kafka_ts_ms],
        "source_offsets": [merge.source_offsets],
        "cutoff_ms": [cutoff_ms],
    })


def iso_to_ms(text: str | None) -> int | None:
    if not text:
        return None
    return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1000)


class CutoffSource:
    """The current model's data cutoff (epoch ms), read from the model store's CURRENT pointer.

    Runs in the Spark Python workers: it holds only the (picklable) config and re-reads the
    pointer at most every ``poll_ms``, caching per worker process. A store that cannot be read
    keeps the last known cutoff (purchases are then kept a little longer, never lost).
    """

    _cache: dict[str, tuple[float, int | None]] = {}

    def __init__(self, cfg: dict, poll_ms: int):
        self.cfg = cfg
        self.poll_ms = poll_ms

    def cutoff_ms(self) -> int | None:
        from models.config import Config

        key = str(Config(self.cfg).text("model_store.uri"))
        checked_at, cutoff = self._cache.get(key, (0.0, None))
        if (time.monotonic() - checked_at) * 1000 < self.poll_ms and checked_at:
            return cutoff
        try:
            cutoff = self._read()
        except Exception as err:  # noqa: BLE001 - the store being away must not fail the batch
            log.warning("cannot read the current model's cutoff from the store (%s); keeping %s", err, cutoff)
        self._cache[key] = (time.monotonic(), cutoff)
        return cutoff

    def _read(self) -> int | None:
        from models.config import Config
        from models.store import ModelStore

        store = ModelStore.from_config(Config(self.cfg))
        version = store.current_version()
        if version is None:
            return None
        return iso_to_ms(store.load_metadata(version).get("cutoff_time"))


def _processor_base():
    from pyspark.sql.streaming import StatefulProcessor

    return StatefulProcessor


class PurchaseStateProcessor(_processor_base()):
    """The StatefulProcessor of the scoring query (one instance per partition and batch)."""

    def __init__(self, ttl_ms: int, cutoff_source: CutoffSource):
        self.ttl_ms = ttl_ms
        self.cutoff_source = cutoff_source

    def init(self, handle) -> None:
        self.purchases = handle.getMapState("purchases", STATE_KEY_SCHEMA, STATE_VALUE_SCHEMA, self.ttl_ms)

    def handleInputRows(self, key, rows, timerValues) -> Iterator[pd.DataFrame]:
        frames = list(rows)
        batch = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        cutoff_ms = self.cutoff_source.cutoff_ms()
        held = {k[0]: tuple(v) for k, v in self.purchases.iterator()}
        merge = merge_purchases(held, batch, cutoff_ms)
        for event_id in merge.removed:
            self.purchases.removeKey((event_id,))
        for event_id, value in merge.added.items():
            self.purchases.updateValue((event_id,), value)
        yield output_row(str(key[0]), merge, cutoff_ms)

    def close(self) -> None:
        pass
