"""The online quality monitor's judging (streaming/quality.py) on a known sequence: exact counts."""
from __future__ import annotations

import time
from types import SimpleNamespace

from models.config import load_config
from streaming.quality import LIST, PURCHASE, Monitor, Tally, baseline_list, judge_customer
from streaming.quality_job import QualityMonitor
from streaming.settings import StreamingSettings

TX = "tx-0"
POPULAR = ["p1", "p2", "p3", "p4"]


def buy(event_id: str, product: str, offset: int):
    return SimpleNamespace(kind=PURCHASE, event_id=event_id, product_id=product, source_partition=TX,
                           source_offset=offset)


def shown(products: list[str], reflects: int | None, computed_ms: int, version: str = "v1",
          strategy: str = "personalized", offset: int = 0):
    return SimpleNamespace(kind=LIST, source_partition="recs-0", source_offset=offset, list_products=products,
                           list_version=version, list_strategy=strategy, list_computed_ms=computed_ms,
                           list_offsets={} if reflects is None else {TX: reflects})


def test_a_known_sequence_gives_exact_counts_per_version_and_strategy():
    monitor = Monitor()
    # b1 has no list before it: not judged. Its list L1 = [a, b] (popularity strategy).
    assert judge_customer(monitor, [buy("e1", "x", 10), shown(["a", "b"], 10, 100, "v1", "popularity", 0)],
                          POPULAR, k=2).rows() == []
    # e2 buys "a": in L1 (hit); baseline: p1, p2 -> miss. Its own list L2 (v1 personalized) is read in
    # the same batch and must not judge it.
    tally = judge_customer(monitor, [shown(["c", "p1"], 11, 200, "v1", "personalized", 1), buy("e2", "a", 11)],
                           POPULAR, k=2)
    assert tally.rows() == [("v1", "popularity", 1, 1, 0)]
    # e3 buys p1 (in L2 and in the baseline), e4 buys p2 (baseline only); one list (v2) reflects both.
    # A replay of e3 is not judged twice.
    tally = judge_customer(monitor, [buy("e3", "p1", 12), buy("e4", "p2", 13), buy("e3", "p1", 14),
                                     shown(["z"], 14, 300, "v2", "personalized", 2)], POPULAR, k=2)
    assert tally.rows() == [("v1", "personalized", 2, 1, 2)]
    # After p1 was bought the baseline skips it: p2, p3. e5 buys p3 -> baseline hit, list miss.
    # The list that reflects e5 arrives in a later batch than e5.
    assert judge_customer(monitor, [buy("e5", "p3", 15)], POPULAR, k=2).rows() == []
    assert [p.event_id for p in monitor.pending] == ["e5"]
    tally = judge_customer(monitor, [shown(["q"], 15, 400, "v2", "segment_popularity", 3)], POPULAR, k=2)
    assert tally.rows() == [("v2", "personalized", 1, 0, 1)]
    assert monitor.shown.strategy == "segment_popularity" and monitor.pending == []


def test_a_list_that_does_not_reflect_a_purchase_leaves_it_waiting_and_late_old_lists_are_ignored():
    monitor = Monitor()
    judge_customer(monitor, [shown(["a"], None, 100)], POPULAR, k=10)
    tally = judge_customer(monitor, [buy("e1", "a", 5), shown(["b"], 4, 200, offset=1)], POPULAR, k=10)
    assert tally.rows() == [] and [p.event_id for p in monitor.pending] == ["e1"]
    # e1 is judged against ["b"], the list held when its reflecting list comes, not the old one.
    tally = judge_customer(monitor, [shown(["old"], 5, 50, offset=2), shown(["c"], 5, 300, offset=3)], POPULAR, k=10)
    assert tally.rows() == [("v1", "personalized", 1, 0, 0)]


def test_the_state_value_round_trips():
    monitor = Monitor()
    judge_customer(monitor, [buy("e1", "a", 1), shown(["a", "b"], 1, 10), buy("e2", "b", 2)], POPULAR, k=10)
    again = Monitor.from_value(monitor.to_value())
    assert again == monitor and Monitor.from_value(None) == Monitor()


def test_baseline_excludes_what_was_bought_and_tally_merges():
    assert baseline_list(POPULAR, ["p2"], 2) == ["p1", "p3"]
    total = Tally()
    total.add("v", "popularity", 1, 1, 0)
    other = Tally()
    other.add("v", "popularity", 2, 0, 1)
    total.merge(other)
    assert total.rows() == [("v", "popularity", 3, 1, 1)]


def test_the_tool_sums_windows_per_group_and_prints_them_beside_the_baseline():
    from tools.quality import format_table, hit_rates

    records = [{"groups": [{"model_version": "v1", "strategy": "personalized", "judged": 4, "hits": 1,
                            "baseline_hits": 0}]},
               {"groups": [{"model_version": "v1", "strategy": "personalized", "judged": 6, "hits": 2,
                            "baseline_hits": 1},
                           {"model_version": "v1", "strategy": "popularity", "judged": 0, "hits": 0,
                            "baseline_hits": 0}]}]
    rows = hit_rates(records)
    assert [(r["strategy"], r["judged"], r["hits"], r["baseline_hits"]) for r in rows] == \
        [("personalized", 10, 3, 1), ("popularity", 0, 0, 0)]
    table = format_table(rows, 10).splitlines()
    assert "30.0%" in table[1] and "10.0%" in table[1] and table[2].split()[-2:] == ["-", "-"]
    assert table[-1].split()[:3] == ["all", "all", "10"]


def test_parse_rows_keeps_valid_purchases_and_stream_lists_only():
    import json

    import pandas as pd

    from models.config import load_config
    from streaming.events import ValidationRules
    from streaming.quality_job import parse_rows

    now = 1_767_607_200_000
    good = {"event_id": "e1", "customer_id": "c1", "product_id": "p1", "quantity": 1,
            "event_time": "2026-01-05T10:00:00Z"}
    stream_list = {"customer_id": "c1", "source": "stream", "model_version": "v1", "strategy": "personalized",
                   "recommendations": [{"rank": 1, "product_id": "a", "score": 1.0}], "source_offsets": {"tx-0": 4},
                   "computed_at_ms": now}
    values = [json.dumps(good).encode(), b"not json", json.dumps(stream_list).encode(),
              json.dumps({**stream_list, "source": "batch"}).encode(), b"{"]
    raw = pd.DataFrame({"topic": ["tx", "tx", "recs", "recs", "recs"], "partition": [0, 0, 1, 1, 1],
                        "offset": [4, 5, 7, 8, 9], "value": values, "kafka_ts_ms": [now] * 5})
    rows = parse_rows(raw, ValidationRules.from_config(load_config()), "tx")
    assert rows[["customer_id", "kind", "source_partition", "source_offset"]].values.tolist() == \
        [["c1", PURCHASE, "tx-0", 4], ["c1", LIST, "recs-1", 7]]
    assert rows["event_id"].iloc[0] == "e1" and rows["list_products"].iloc[1] == ["a"]
    assert rows["list_offsets"].iloc[1] == {"tx-0": 4} and rows["list_computed_ms"].iloc[1] == now


class _Recorded(QualityMonitor):
    """The monitor with its Kafka write replaced by a list (the write itself: test_quality_monitor)."""

    def __init__(self, *args, **kwargs):
        self.sent: list[dict] = []
        super().__init__(*args, **kwargs)

    def _send(self, record: dict) -> None:
        self.sent.append(record)


def test_a_due_window_is_published_without_new_input_and_the_last_one_at_close():
    """Spark runs no micro-batch while no input comes: the timer publishes a due window anyway."""
    cfg = load_config().with_overrides({"streaming.quality.summary_interval": "1 second"})
    monitor = _Recorded(None, cfg, StreamingSettings.from_config(cfg), holder=None)
    try:
        with monitor._lock:
            monitor._window.add("v1", "personalized", 4, 1, 0)
        deadline = time.monotonic() + 10
        while not monitor.sent and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(g["judged"], g["hits"]) for r in monitor.sent for g in r["groups"]] == [(4, 1)]
        with monitor._lock:
            monitor._window.add("v1", "personalized", 2, 2, 1)
    finally:
        monitor.close()
    assert [(g["judged"], g["hits"], g["baseline_hits"]) for r in monitor.sent for g in r["groups"]] == \
        [(4, 1, 0), (2, 2, 1)]
    assert not monitor._timer.is_alive()
