"""Online quality: was a customer's next purchase in the last top-k the stream emitted for them?

The scoring query computes a customer's list after its state stage (streaming/executor.py), so
its own state can never learn the list it emitted. The quality query (streaming/quality_job.py)
therefore reads the job's output back: it subscribes to the transactions AND the
recommendations topic, and keeps its own per-customer state (``transformWithState``, one
ValueState ``monitor``, ``MONITOR_SCHEMA``) with:

- the last list the stream emitted (product ids, model version, strategy, when computed);
- the purchases not judged yet (event id, product, topic-partition, offset);
- the recent event ids judged (a replayed event is judged once) and products bought (the
  baseline leaves them out).

"Next purchase" is exact: a purchase P is judged when the first stream list that reflects it
arrives (its ``source_offsets`` reach P's offset), against the list held just before that one,
i.e. the newest list computed without P. The list P itself produced never judges P, whatever
order the two topics are read in. Each judgment counts under the judged list's model version
and strategy; the same purchase is also judged against the served model's popularity top-k
minus the products the customer was seen buying before (the live baseline). A purchase judged
before the customer had any stream list is not counted (nothing was shown to judge).

This module is the pure logic (``judge_customer``, unit-tested) and the StatefulProcessor.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from streaming.state import processor_base

STATE_VARIABLE = "monitor"
MONITOR_SCHEMA = ("list_products array<string>, list_version string, list_strategy string, list_computed_ms bigint, "
                  "pending_event_ids array<string>, pending_products array<string>, "
                  "pending_partitions array<string>, pending_offsets array<bigint>, "
                  "judged_event_ids array<string>, bought array<string>")
INPUT_SCHEMA = ("customer_id string, kind string, event_id string, product_id string, source_partition string, "
                "source_offset bigint, list_products array<string>, list_version string, list_strategy string, "
                "list_offsets map<string,bigint>, list_computed_ms bigint")
INPUT_COLUMNS = tuple(column.split()[0] for column in INPUT_SCHEMA.split(", "))
OUTPUT_SCHEMA = "model_version string, strategy string, judged bigint, hits bigint, baseline_hits bigint"
PURCHASE = "purchase"
LIST = "list"
# Bounds per customer: a purchase never reflected (e.g. before the model's cutoff) waits at most
# among the newest MAX_PENDING; the dedup and exclusion memories keep the newest MAX_REMEMBERED.
MAX_PENDING = 50
MAX_REMEMBERED = 200


@dataclass
class ShownList:
    products: list[str]
    version: str
    strategy: str
    computed_ms: int


@dataclass
class Pending:
    event_id: str
    product: str
    partition: str
    offset: int


@dataclass
class Monitor:
    """One customer's quality state (the ``MONITOR_SCHEMA`` value, unpacked)."""

    shown: ShownList | None = None
    pending: list[Pending] = field(default_factory=list)
    judged_ids: list[str] = field(default_factory=list)
    bought: list[str] = field(default_factory=list)

    @classmethod
    def from_value(cls, value) -> Monitor:
        if value is None:
            return cls()
        products, version, strategy, computed, p_ids, p_products, p_parts, p_offsets, judged, bought = value
        shown = None if version is None else ShownList(list(products or []), version, strategy, int(computed or 0))
        pending = [Pending(e, p, q, int(o)) for e, p, q, o in zip(p_ids or [], p_products or [], p_parts or [],
                                                                 p_offsets or [])]
        return cls(shown, pending, list(judged or []), list(bought or []))

    def to_value(self) -> tuple:
        shown = self.shown
        return (shown.products if shown else None, shown.version if shown else None,
                shown.strategy if shown else None, shown.computed_ms if shown else None,
                [p.event_id for p in self.pending], [p.product for p in self.pending],
                [p.partition for p in self.pending], [p.offset for p in self.pending],
                self.judged_ids, self.bought)


@dataclass
class Tally:
    """Counts per (model version, strategy): purchases judged, hits, baseline hits."""

    counts: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, version: str, strategy: str, judged: int, hits: int, baseline_hits: int) -> None:
        row = self.counts.setdefault((version, strategy), [0, 0, 0])
        row[0] += judged
        row[1] += hits
        row[2] += baseline_hits

    def merge(self, other: Tally) -> None:
        for (version, strategy), (judged, hits, baseline) in other.counts.items():
            self.add(version, strategy, judged, hits, baseline)

    def rows(self) -> list[tuple[str, str, int, int, int]]:
        return [(v, s, *counts) for (v, s), counts in sorted(self.counts.items())]


def baseline_list(popular: Sequence[str], bought: Iterable[str], k: int) -> list[str]:
    """The popularity top-k without the products the customer was seen buying."""
    excluded = set(bought)
    return [p for p in popular if p not in excluded][:k]


def judge_customer(monitor: Monitor, rows: Iterable, popular: Sequence[str], k: int) -> Tally:
    """Fold one customer's micro-batch (purchase and list rows, ``INPUT_COLUMNS`` as attributes)
    into ``monitor`` (in place) and return the judgments it made.

    Purchases are taken first (in offset order), then lists in the order they were written: a
    list judges every waiting purchase it reflects against the list held before it, then becomes
    the held one. ``popular``: the served model's products by popularity, best first (at least
    k + MAX_REMEMBERED of them, or all). Pure (no Spark), for the unit tests.
    """
    tally = Tally()
    rows = list(rows)
    purchases = sorted((r for r in rows if r.kind == PURCHASE), key=lambda r: (r.source_partition, r.source_offset))
    lists = sorted((r for r in rows if r.kind == LIST), key=lambda r: (r.source_partition, r.source_offset))
    known = set(monitor.judged_ids) | {p.event_id for p in monitor.pending}
    for row in purchases:
        if row.event_id in known:
            continue                      # a replayed event: judged (or waiting) once
        known.add(row.event_id)
        monitor.pending.append(Pending(row.event_id, row.product_id, row.source_partition, int(row.source_offset)))
    del monitor.pending[:-MAX_PENDING]
    for row in lists:
        if monitor.shown is not None and int(row.list_computed_ms) < monitor.shown.computed_ms:
            continue                      # an older list re-sent late: the newer one stays shown
        offsets = dict(row.list_offsets or {})
        reflected = [p for p in monitor.pending if offsets.get(p.partition, -1) >= p.offset]
        for purchase in reflected:
            _judge(monitor, purchase, popular, k, tally)
        monitor.pending = [p for p in monitor.pending if p not in reflected]
        monitor.shown = ShownList(list(row.list_products or []), row.list_version, row.list_strategy,
                                  int(row.list_computed_ms))
    del monitor.judged_ids[:-MAX_REMEMBERED]
    del monitor.bought[:-MAX_REMEMBERED]
    return tally


def _judge(monitor: Monitor, purchase: Pending, popular: Sequence[str], k: int, tally: Tally) -> None:
    shown = monitor.shown
    if shown is not None:
        hit = purchase.product in shown.products[:k]
        baseline_hit = purchase.product in baseline_list(popular, monitor.bought, k)
        tally.add(shown.version, shown.strategy, 1, int(hit), int(baseline_hit))
    monitor.judged_ids.append(purchase.event_id)
    if purchase.product not in monitor.bought:
        monitor.bought.append(purchase.product)


class QualityProcessor(processor_base()):
    """The quality query's StatefulProcessor: ``judge_customer`` over the ``monitor`` state; one
    output row per (model version, strategy) judged for the customer in the batch."""

    def __init__(self, ttl_ms: int, k: int):
        self.ttl_ms = ttl_ms
        self.k = k

    def init(self, handle) -> None:
        self.monitor = handle.getValueState(STATE_VARIABLE, MONITOR_SCHEMA, self.ttl_ms)
        self._popular: list[str] | None = None

    def handleInputRows(self, key, rows, timerValues) -> Iterator:
        from pyspark.sql import Row

        if self._popular is None:
            from streaming.served import served_popular

            self._popular = served_popular()      # the driver's served model, once per task
        monitor = Monitor.from_value(self.monitor.get())
        tally = judge_customer(monitor, rows, self._popular, self.k)
        self.monitor.update(monitor.to_value())
        for version, strategy, judged, hits, baseline in tally.rows():
            yield Row(model_version=version, strategy=strategy, judged=judged, hits=hits, baseline_hits=baseline)

    def close(self) -> None:
        pass
