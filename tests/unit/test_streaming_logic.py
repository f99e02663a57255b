"""The streaming scorer's logic without Spark or services: state merge, counts, model hot swap,
and what it hands on (the processor's row, the documented output record).

A unit test: pure functions and a model store in a temporary folder, no Spark session.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from models.artifact import ModelArtifact
from models.config import REPO_ROOT
from models.recency import decay_weights
from models.store import ModelStore
from streaming.refresh import purchase_counts, records_for, score_customers
from streaming.serving import ModelHolder, ModelNotServable, ServingModel
from streaming.state import OUTPUT_SCHEMA, expire, held_from_state, iso_to_ms, merge_purchases, output_row, state_value

CUTOFF = "2025-01-01T00:00:00.000Z"
CUTOFF_MS = iso_to_ms(CUTOFF)


def rows(*events) -> pd.DataFrame:
    """Processor input rows: (event_id, product_id, quantity, event_time_ms, partition, offset)."""
    frame = pd.DataFrame(events, columns=["event_id", "product_id", "quantity", "event_time_ms",
                                          "source_partition", "source_offset"])
    return frame.assign(customer_id="C1", kafka_ts_ms=frame["source_offset"] * 10)


# -- the state merge ---------------------------------------------------------------------------
def test_new_purchases_are_added_and_replays_are_not():
    held = {"e1": ("P1", 1, CUTOFF_MS + 10)}
    merge = merge_purchases(held, rows(("e1", "P1", 1, CUTOFF_MS + 10, "tx-0", 7),      # replay
                                       ("e2", "P2", 3, CUTOFF_MS + 20, "tx-0", 8),
                                       ("e2", "P2", 3, CUTOFF_MS + 20, "tx-1", 2),      # twice in the batch
                                       ("e3", "P3", 1, CUTOFF_MS + 30, "tx-1", 4)), CUTOFF_MS)
    assert set(merge.added) == {"e2", "e3"} and merge.duplicates == 2
    assert merge.held == {"e1": ("P1", 1, CUTOFF_MS + 10), "e2": ("P2", 3, CUTOFF_MS + 20),
                          "e3": ("P3", 1, CUTOFF_MS + 30)}
    assert merge.source_offsets == {"tx-0": 8, "tx-1": 4}
    assert sorted(merge.new_kafka_ts_ms) == [40, 80]
    assert merge.removed == []


def test_a_newer_cutoff_drops_held_purchases_and_refuses_old_ones():
    held = {"old": ("P1", 1, CUTOFF_MS - 5), "new": ("P2", 1, CUTOFF_MS + 5)}
    merge = merge_purchases(held, rows(("late", "P3", 1, CUTOFF_MS, "tx-0", 1)), CUTOFF_MS)
    assert merge.removed == ["old"] and merge.before_cutoff == 1
    assert merge.added == {} and set(merge.held) == {"new"}


def test_without_a_model_everything_is_kept():
    merge = merge_purchases({}, rows(("e1", "P1", 1, 0, "tx-0", 1)), None)
    assert set(merge.added) == {"e1"}


# The processor's output row, which the scoring stage reads by name (streaming.job declares it to
# Spark as OUTPUT_SCHEMA): written out here, not derived from the product's own constant.
PROCESSOR_COLUMNS = ["customer_id", "product_ids", "quantities", "event_times_ms", "new_events",
                     "duplicate_events", "before_cutoff_events", "new_kafka_ts_ms", "source_offsets",
                     "cutoff_ms", "segment"]


def _top_level_names(ddl: str) -> list[str]:
    """Column names of a Spark DDL struct string (commas inside <...> do not separate columns)."""
    names, depth, start = [], 0, 0
    for at, char in enumerate(ddl + ","):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(ddl[start:at].split()[0])
            start = at + 1
    return names


def test_the_output_row_has_the_declared_columns_in_order():
    merge = merge_purchases({}, rows(("e2", "P2", 1, 20, "tx-0", 1), ("e1", "P1", 2, 10, "tx-0", 2),
                                     ("e2", "P2", 1, 20, "tx-1", 5)), None)
    row = output_row("C1", merge, 7)
    assert row.asDict() == {"customer_id": "C1", "product_ids": ["P1", "P2"], "quantities": [2, 1],   # oldest first
                            "event_times_ms": [10, 20], "new_events": 2, "duplicate_events": 1,
                            "before_cutoff_events": 0, "new_kafka_ts_ms": [10, 20], "source_offsets": {"tx-0": 2},
                            "cutoff_ms": 7, "segment": None}
    assert list(row.asDict()) == PROCESSOR_COLUMNS
    assert _top_level_names(OUTPUT_SCHEMA) == PROCESSOR_COLUMNS      # what Spark is told the row holds


def test_the_newest_segment_of_the_batch_is_carried_to_the_output():
    frame = rows(("e1", "P1", 1, 10, "tx-0", 1), ("e2", "P2", 1, 20, "tx-0", 3), ("e3", "P3", 1, 30, "tx-0", 2))
    merge = merge_purchases({}, frame.assign(segment=["FR", None, "UK"]), None)
    assert merge.segment == "UK"              # offset 2 is the newest event that names a segment
    assert output_row("C1", merge, None).segment == "UK"
    assert merge_purchases({}, frame, None).segment is None     # events without the field


def test_spark_rows_merge_like_a_frame():
    """The processor gets Rows, the tests mostly frames: the same merge either way."""
    from pyspark.sql import Row

    frame = rows(("e2", "P2", 3, CUTOFF_MS + 20, "tx-0", 8), ("e1", "P1", 1, CUTOFF_MS + 10, "tx-0", 7),
                 ("e2", "P2", 3, CUTOFF_MS + 20, "tx-1", 2), ("old", "P9", 1, CUTOFF_MS, "tx-0", 9))
    as_rows = [Row(**record) for record in frame.to_dict("records")]
    held = {"e1": ("P1", 1, CUTOFF_MS + 10)}
    assert merge_purchases(dict(held), as_rows, CUTOFF_MS) == merge_purchases(dict(held), frame, CUTOFF_MS)


# -- the stored state: one value of arrays per customer, per-purchase expiry ---------------------
def test_the_state_value_round_trips_oldest_first():
    held = {"b": ("P2", 3, 20), "a": ("P1", 1, 10), "c": ("P3", 2, 30)}
    arrived = {"a": 100, "b": 200, "c": 300}
    value = state_value(held, arrived)
    assert value == (["a", "b", "c"], ["P1", "P2", "P3"], [1, 3, 2], [10, 20, 30], [100, 200, 300])
    assert held_from_state(value) == (held, arrived)
    assert held_from_state(None) == ({}, {})


def test_purchases_expire_ttl_after_they_arrived():
    held = {"a": ("P1", 1, 10), "b": ("P2", 1, 20), "c": ("P3", 1, 5)}
    arrived = {"a": 1_000, "b": 2_000, "c": 2_500}
    assert expire(held, arrived, now_ms=2_000, ttl_ms=1_000) == ["a"]      # arrived + ttl <= now: gone
    assert held == {"b": ("P2", 1, 20), "c": ("P3", 1, 5)} and arrived == {"b": 2_000, "c": 2_500}
    assert expire(held, arrived, now_ms=3_000, ttl_ms=1_000) == ["b"]      # by arrival, not event time
    assert expire(held, arrived, now_ms=3_499, ttl_ms=1_000) == []
    assert set(held) == {"c"}


def test_an_expired_purchase_is_counted_again_when_replayed():
    """Dedup lasts as long as the purchase is held: after its TTL a replay is a new purchase."""
    held, arrived = held_from_state((["e1"], ["P1"], [1], [CUTOFF_MS + 10], [1_000]))
    expire(held, arrived, now_ms=5_000, ttl_ms=3_000)
    merge = merge_purchases(held, rows(("e1", "P1", 1, CUTOFF_MS + 10, "tx-0", 7)), CUTOFF_MS)
    assert set(merge.added) == {"e1"} and merge.duplicates == 0


# -- counts and scoring ------------------------------------------------------------------------
def tiny_model(model_type: str = "als", **params) -> ModelArtifact:
    rng = np.random.default_rng(1)
    return ModelArtifact(
        version="v1", model_type=model_type, item_ids=[f"P{i}" for i in range(6)],
        item_factors=rng.normal(size=(6, 3)).astype(np.float32), user_ids=["K1", "K2"],
        user_factors=rng.normal(size=(2, 3)).astype(np.float32), popularity=[5, 9, 1, 7, 3, 2],
        user_items_indptr=[0, 2, 3], user_items_indices=[0, 2, 5], user_items_counts=[2, 1, 4],
        params={"rank": 3, "reg_param": 0.1, "alpha": 1.0, "implicit_prefs": True, "scaling": "none", **params},
        cutoff_time=CUTOFF).validate()


def customers(*entries) -> pd.DataFrame:
    """(customer, [(product, quantity, event_time_ms), ...]) -> the processor's output columns."""
    return pd.DataFrame({
        "customer_id": [c for c, _ in entries],
        "product_ids": [[p for p, _, _ in purchases] for _, purchases in entries],
        "quantities": [[q for _, q, _ in purchases] for _, purchases in entries],
        "event_times_ms": [[t for _, _, t in purchases] for _, purchases in entries],
        "source_offsets": [{"tx-0": 1} for _ in entries]})


def dense(indptr, indices, counts, n_items=6) -> np.ndarray:
    matrix = np.zeros((len(indptr) - 1, n_items))
    for row in range(len(indptr) - 1):
        matrix[row, indices[indptr[row]:indptr[row + 1]]] = counts[indptr[row]:indptr[row + 1]]
    return matrix


def test_counts_add_stream_purchases_to_the_trained_ones():
    model = ServingModel.prepare(tiny_model())
    frame = customers(("K1", [("P0", 3, CUTOFF_MS + 1), ("P4", 1, CUTOFF_MS + 2), ("UNKNOWN", 1, CUTOFF_MS + 3),
                              ("P4", 1, CUTOFF_MS - 1)]),          # before the cutoff: in the model
                      ("NEW", [("P1", 1, CUTOFF_MS + 1)]), ("NEW2", [("UNKNOWN", 1, CUTOFF_MS + 1)]))
    counts = dense(*purchase_counts(model, frame))
    np.testing.assert_array_equal(counts, [[3, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0] * 6])


def test_counts_follow_the_models_count_mode_and_recency():
    by_units = ServingModel.prepare(tiny_model(count_mode="quantity"))
    frame = customers(("NEW", [("P1", 3, CUTOFF_MS + 1)]))
    assert dense(*purchase_counts(by_units, frame))[0, 1] == 3
    decayed = ServingModel.prepare(tiny_model(recency_half_life_days=10.0, recency_reference_ms=CUTOFF_MS))
    later = CUTOFF_MS + 5 * 86_400_000
    frame = customers(("NEW", [("P1", 1, later)]))
    assert dense(*purchase_counts(decayed, frame))[0, 1] == pytest.approx(decay_weights([later], CUTOFF_MS, 10.0)[0])


def test_lists_popularity_before_a_known_purchase_and_purchases_excluded():
    model = ServingModel.prepare(tiny_model())
    frame = customers(("NEW", [("UNKNOWN", 1, CUTOFF_MS + 1)]), ("NEW2", [("P1", 1, CUTOFF_MS + 1)]),
                      ("K1", [("UNKNOWN", 1, CUTOFF_MS + 1)]))
    scored = score_customers(model, frame, k=3, exclude_purchased=True)
    assert scored.strategies == ["popularity", "personalized", "personalized"]
    assert list(scored.item_idx[0]) == [1, 3, 0]                   # the best sellers
    assert 1 not in scored.item_idx[1] and not {0, 2} & set(scored.item_idx[2])
    records = records_for(model, frame, scored, computed_at_ms=5)
    assert records[1].product_ids[0] != "P1" and records[1].extra["purchases_since_cutoff"] == 1
    assert [r["product_id"] for r in records[1].extra["buy_again"]] == ["P1"]
    assert records[2].last_event_ms == CUTOFF_MS + 1 and records[2].source_offsets == {"tx-0": 1}


def test_a_new_customer_in_a_known_segment_gets_that_segments_list():
    table = {"FR": {"items": [4, 2], "buyers": [3.0, 1.0]}}
    model = ServingModel.prepare(tiny_model(segment_column="country", segment_popularity=table))
    frame = customers(("NEW", [("UNKNOWN", 1, CUTOFF_MS + 1)]), ("NEW2", [("UNKNOWN", 1, CUTOFF_MS + 1)]),
                      ("NEW3", [("UNKNOWN", 1, CUTOFF_MS + 1)]), ("K1", [("P1", 1, CUTOFF_MS + 1)]))
    scored = score_customers(model, frame, k=3, exclude_purchased=True,
                             segments=np.array(["FR", "XX", None, "FR"], dtype=object))
    assert scored.strategies == ["segment_popularity", "popularity", "popularity", "personalized"]
    assert list(scored.item_idx[0][:2]) == [4, 2]                  # FR's best sellers
    assert list(scored.item_idx[1]) == list(scored.item_idx[2]) == [1, 3, 0]   # unknown segment: everyone's


# -- the output record against its documentation (docs/schemas.md) -----------------------------
DOC_TYPES = {"integer": (int,), "string": (str,), "array": (list,), "object": (dict,), "null": (type(None),),
             "number": (int, float)}


def _documented(section: str) -> dict[str, str]:
    """{field: documented type} from the table under ``### <section>`` in docs/schemas.md."""
    text = (REPO_ROOT / "docs" / "schemas.md").read_text()
    lines = text.split(f"### {section}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start:end]
    fields = {}
    for line in table[2:]:                       # after the header and the |---| line
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[0]):
            fields[name] = cells[1]
    assert fields, f"no table under ### {section} in docs/schemas.md"
    return fields


def _stream_records():
    model = ServingModel.prepare(tiny_model())
    frame = customers(("K1", [("P1", 2, CUTOFF_MS + 5), ("P3", 1, CUTOFF_MS - 5)]),
                      ("NEW", [("UNKNOWN", 1, CUTOFF_MS + 1)]))
    scored = score_customers(model, frame, k=3, exclude_purchased=True)
    return records_for(model, frame, scored, computed_at_ms=CUTOFF_MS + 99)


def test_stream_records_carry_exactly_the_documented_message_fields():
    documented = _documented("Topic message")
    assert {"customer_id", "recommendations", "strategy", "model_version", "last_event_ms",
            "computed_at_ms", "source", "source_offsets", "schema_version"} <= set(documented)
    for record in _stream_records():
        message = json.loads(record.to_json_bytes())
        assert set(message) == set(documented), record.customer_id
        for field, kind in documented.items():
            allowed = tuple(t for word in kind.split(" or ") for t in DOC_TYPES[word])
            value = message[field]
            assert isinstance(value, allowed) and not isinstance(value, bool), (field, kind, value)
        for name in ("recommendations", "buy_again"):
            entries = message[name]
            assert [e["rank"] for e in entries] == list(range(1, len(entries) + 1))
            assert all(set(e) == {"rank", "product_id", "score"} for e in entries)
        assert message["schema_version"] == 2 and message["source"] == "stream"
        assert message["strategy"] in ("personalized", "popularity", "segment_popularity")
        assert message["computed_at"] == "2025-01-01T00:00:00.099Z" and message["computed_at_ms"] == CUTOFF_MS + 99
        assert message["source_offsets"] == {"tx-0": 1}
    k1, new = (json.loads(record.to_json_bytes()) for record in _stream_records())
    assert (k1["last_event_time"], k1["last_event_ms"]) == ("2025-01-01T00:00:00.005Z", CUTOFF_MS + 5)
    assert k1["purchases_since_cutoff"] == 1 and k1["strategy"] == "personalized"
    assert (new["strategy"], new["purchases_since_cutoff"]) == ("popularity", 1)


def test_stream_records_become_the_documented_table_item():
    """The item holds the message's fields with the same values: numbers as Number (never a
    float), source_offsets a map, a field that is null in the message absent."""
    message_fields = set(_documented("Topic message"))
    documented = _documented("Table item")
    assert set(documented) == message_fields
    for record in _stream_records():
        item, message = record.to_item(), record.to_message()
        assert set(item) == {f for f in message_fields if message[f] is not None}, record.customer_id
        assert item["source_offsets"] == message["source_offsets"] == {"tx-0": 1}
        for name in ("recommendations", "buy_again"):
            assert [e["product_id"] for e in item[name]] == [e["product_id"] for e in message[name]]
            assert [Decimal(str(e["score"])) for e in message[name]] == [e["score"] for e in item[name]]
            assert all(isinstance(e["score"], Decimal) for e in item[name])
        for field, kind in documented.items():
            if kind == "Number":
                assert isinstance(item[field], (int, Decimal)) and not isinstance(item[field], bool), field
            elif kind == "String":
                assert isinstance(item[field], str), field

        def floats(value):
            if isinstance(value, dict):
                return [f for v in value.values() for f in floats(v)]
            if isinstance(value, list):
                return [f for v in value for f in floats(v)]
            return [value] if isinstance(value, float) else []
        assert floats(item) == [], "DynamoDB has no float"
    unknown = _stream_records()[0]
    unknown.last_event_ms = None
    assert not {"last_event_ms", "last_event_time"} & set(unknown.to_item())     # null: absent


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mystery"}, "model_type"),
    ({"params": {"rank": 3}}, "reg_param"),
])
def test_models_the_stream_cannot_serve_are_refused(change, message):
    artifact = tiny_model()
    for name, value in change.items():
        setattr(artifact, name, value)
    with pytest.raises(ModelNotServable, match=message):
        ServingModel.prepare(artifact)


# -- hot swap ----------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_holder_swaps_at_poll_time_and_refuses_a_broken_model(tmp_path, caplog):
    store = ModelStore(str(tmp_path))
    clock = Clock()
    holder = ModelHolder(store, poll_ms=10_000, clock=clock)
    assert holder.current() is None                                 # nothing published yet
    store.publish(tiny_model())
    assert holder.current().version == "v1"                         # no model: look at once
    second = tiny_model()
    second.version, second.cutoff_time = "v2", "2025-02-01T00:00:00Z"
    store.publish(second)
    assert holder.current().version == "v1"                         # not due yet
    clock.now += 11
    assert holder.current().version == "v2"                         # due: the new one is served
    third = tiny_model()
    third.version = "v3"
    store.write(third)
    (tmp_path / "versions" / "v3" / "item_factors.npy").write_bytes(b"garbage")
    (tmp_path / "CURRENT").write_text(json.dumps({"version": "v3"}))
    clock.now += 11
    assert holder.current().version == "v2"
    assert "v3" in holder.refused and any("REFUSED model v3" in r.getMessage() for r in caplog.records)
    clock.now += 11
    holder.current()
    assert sum("REFUSED" in r.getMessage() for r in caplog.records) == 1   # logged once, not every poll


def test_advance_expires_merges_and_stamps_the_added_purchases_with_the_batch_time():
    from streaming.state import advance

    held = {"old": ("P1", 1, 10), "kept": ("P2", 1, 20)}
    arrived = {"old": 0, "kept": 500}
    rows = pd.DataFrame({"source_partition": ["t-0"] * 2, "source_offset": [1, 2], "event_id": ["kept", "new"],
                         "product_id": ["P2", "P3"], "quantity": [1, 2], "event_time_ms": [20, 30],
                         "kafka_ts_ms": [900, 901]})
    merge = advance(held, arrived, rows, now_ms=1000, ttl_ms=1000, cutoff_ms=None)
    assert set(merge.held) == {"kept", "new"} and merge.duplicates == 1 and list(merge.added) == ["new"]
    assert arrived == {"kept": 500, "new": 1000}          # "old" arrived at 0: expired at 1000
