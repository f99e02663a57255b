"""The executors' side of a scoring micro-batch (streaming/executor.py) and the latency histogram
the driver rebuilds from their summaries (streaming/latency.py), without Spark."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from models.config import Config
from models.store import ModelStore
from streaming import executor, latency
from streaming.executor import ExecutorSettings, score_frame
from streaming.job import figures_from
from streaming.refresh import records_for, score_customers
from streaming.serving import ServingModel
from streaming.state import OUTPUT_COLUMNS
from tests.small_models import small_als

AFTER_MS = 1_750_000_000_000      # after small_als' cutoff
BATCH_START_MS = AFTER_MS + 10_000


@pytest.fixture
def store(tmp_path) -> ModelStore:
    store = ModelStore(str(tmp_path / "models"))
    for version in ("v1", "v2", "v3"):
        store.publish(small_als(version=version).validate())
    executor._models.clear()
    return store


def settings_for(store: ModelStore, write_table: bool = False) -> ExecutorSettings:
    return ExecutorSettings(k=3, exclude_purchased=True, write_table=write_table, outage_tolerance_ms=1000,
                            default_count_mode="rows", connections={"model_store": {"uri": store.uri}})


def state_rows() -> pd.DataFrame:
    """Three customers as the state emits them: K1 with two new purchases, K2 with only a
    replayed one (nothing new: no record), NEW with one new purchase."""
    rows = [("K1", ["P1", "P3"], [2, 1], [AFTER_MS, AFTER_MS + 5], 2, 0, 0, [AFTER_MS + 100, AFTER_MS + 200],
             {"tx-0": 7}, 1, None),
            ("K2", ["P4"], [1], [AFTER_MS], 0, 1, 0, [], {}, 1, None),
            ("NEW", ["P2"], [1], [AFTER_MS], 1, 0, 1, [AFTER_MS + 9_000], {"tx-1": 3}, 1, "FR")]
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    frame["cutoff_ms"] = ServingModel.prepare(small_als().validate()).cutoff_ms
    return frame


def test_the_executor_emits_the_records_the_driver_side_scoring_gives(store):
    frame = state_rows()
    records, summary = score_frame(frame, "v2", batch_id=7, batch_started_ms=BATCH_START_MS,
                                   settings=settings_for(store))

    assert list(records.columns) == ["key", "value"]
    assert [k.decode() for k in records["key"]] == ["K1", "NEW"]          # K2 had nothing new
    messages = [json.loads(v) for v in records["value"]]
    model = ServingModel.prepare(store.load("v2"))
    changed = frame[frame["new_events"] > 0].reset_index(drop=True)
    expected = records_for(model, changed, score_customers(model, changed, 3, True,
                                                           segments=changed["segment"].to_numpy(object)),
                           computed_at_ms=0)
    assert [m["recommendations"] for m in messages] == [r.to_message()["recommendations"] for r in expected]
    assert [m["buy_again"] for m in messages] == [r.extra["buy_again"] for r in expected]
    assert all(m["model_version"] == "v2" and m["source"] == "stream" for m in messages)

    assert (summary["customers"], summary["refreshed"], summary["new_events"], summary["duplicate_events"],
            summary["before_cutoff_events"]) == (3, 2, 3, 1, 1)
    assert summary["cutoffs"] == [model.cutoff_ms]
    ages = latency.from_sparse(summary["latency"])                   # age at the batch start, per new event
    assert ages.sum() == 3
    assert latency.percentiles(ages, (100,))["p100"] == pytest.approx(9_900, abs=250)   # buckets 250 ms wide there


def test_a_worker_loads_each_version_once_and_keeps_two(store):
    settings = settings_for(store)
    first = score_frame(state_rows(), "v1", 1, BATCH_START_MS, settings)[1]
    again = score_frame(state_rows(), "v1", 2, BATCH_START_MS, settings)[1]
    assert first["load_ms"] > 0 and again["load_ms"] == 0
    score_frame(state_rows(), "v2", 3, BATCH_START_MS, settings)
    score_frame(state_rows(), "v3", 4, BATCH_START_MS, settings)
    assert sorted(version for _, version in executor._models) == ["v2", "v3"]


def test_without_a_served_version_nothing_is_scored_but_everything_is_counted(store):
    records, summary = score_frame(state_rows(), None, 1, BATCH_START_MS, settings_for(store))
    assert len(records) == 0
    assert (summary["refreshed"], summary["new_events"], summary["latency"]) == (0, 3, {})


def test_a_version_the_executor_cannot_load_fails_the_task_naming_it(store):
    factors = store.backend.root / "versions" / "v3" / "item_factors.npy"
    factors.write_bytes(factors.read_bytes()[:-16])
    with pytest.raises(RuntimeError, match="cannot load model v3, which the driver verified"):
        score_frame(state_rows(), "v3", 1, BATCH_START_MS, settings_for(store))


def test_executors_get_only_the_connections_they_need():
    cfg = Config({"model_store": {"uri": "s3://bucket/models", "s3_endpoint_url": None},
                  "dynamodb": {"endpoint_url": None, "region": "eu-west-1", "table": "recs", "local": {"port": 1}},
                  "aws": {"access_key_id": None, "secret_access_key": None},
                  "kafka": {"topics": {"recommendations": "r"},
                            "client_options": {"sasl.jaas.config": "jaas-password-here"}},
                  "data": {"count_mode": "rows"}, "run_dir": ".run"})
    from streaming.settings import StreamingSettings

    settings = ExecutorSettings.from_config(cfg, StreamingSettings(
        k=10, trigger_interval_ms=1, dead_letter_trigger_interval_ms=1, checkpoint_dir="c", state_ttl_ms=1,
        state_partitions=1, exclude_purchased=True, starting_offsets="latest", max_offsets_per_trigger=None,
        model_poll_interval_ms=1, sink_outage_tolerance_ms=60_000, metrics_host="h", metrics_port=None,
        health_max_silence_ms=1, transactions_topic="t", dead_letter_topic="d",
        recommendations_topic="r", quality_enabled=False, quality_trigger_interval_ms=1, quality_summary_interval_ms=1,
        quality_topic="q"))
    assert set(settings.connections) == {"model_store", "dynamodb", "aws", "kafka"}
    assert settings.connections["kafka"] == {"topics": {"recommendations": "r"}}      # no client options
    assert "jaas-password-here" not in json.dumps(settings.connections)
    assert "local" not in settings.connections["dynamodb"]
    with_secret = ExecutorSettings(1, True, True, 1, "rows", {"aws": {"secret_access_key": "s3cr3t-value"}})
    assert "s3cr3t-value" not in repr(with_secret)               # a settings object in a log line


# -- the latency histogram -------------------------------------------------------------------
def test_percentiles_from_the_histogram_are_within_a_bucket_of_the_exact_ones():
    values = np.random.default_rng(3).gamma(2.0, 300.0, size=20_000)
    estimated = latency.percentiles(latency.counts_of(values))
    for point in (50, 95, 99):
        assert estimated[f"p{point}"] == pytest.approx(np.percentile(values, point), abs=25)
    assert estimated["events"] == 20_000 and latency.percentiles(np.zeros(latency.N_BUCKETS, int)) is None


def test_the_driver_shifts_the_ages_by_the_batch_duration():
    ages = [100, 250, 2_000]
    summaries = [({"customers": 2, "refreshed": 2, "new_events": 2, "duplicate_events": 0,
                             "before_cutoff_events": 0, "score_ms": 5.0, "write_ms": 7.0, "load_ms": 0.0,
                             "table_written": 2, "table_stale": 0, "table_retries": 1, "cutoffs": [5],
                             "latency": latency.to_sparse(latency.counts_of(ages[:2]))}),
                 ({"customers": 1, "refreshed": 1, "new_events": 1, "duplicate_events": 3,
                             "before_cutoff_events": 0, "score_ms": 1.0, "write_ms": 1.0, "load_ms": 0.0,
                             "table_written": 1, "table_stale": 0, "table_retries": 0, "cutoffs": [5],
                             "latency": latency.to_sparse(latency.counts_of(ages[2:]))})]
    figures = figures_from(summaries, batch_ms=600)
    assert (figures.customers_in_batch, figures.customers_refreshed, figures.duplicate_events,
            figures.table_retries, figures.applied_cutoffs) == (3, 3, 3, 1, {5})
    assert figures.score_ms == 6.0 and figures.write_ms == 8.0
    shifted = latency.percentiles(figures.latency, (0, 100))
    assert shifted["p0"] == pytest.approx(700, abs=25) and shifted["p100"] == pytest.approx(2_600, abs=25)
    assert latency.cumulative_at(figures.latency, [1_000, 3_000]) == [2, 3]


@pytest.mark.parametrize("weighting", ["cosine", "bm25"])
def test_an_item_knn_version_is_served_from_the_neighbour_table_stored_with_it(tmp_path, weighting):
    """The batch job stores item-kNN's table with the version; the stream's executors load it
    from the store and score new purchases with it, as the driver-side scoring does."""
    from models.neighbours import KnnParams
    from models.scorers import item_neighbours_of

    knn = small_als(version="knn1")
    knn.model_type = "item_knn"
    knn.params.update(KnnParams(neighbours=2, weighting=weighting).as_params())
    knn.item_neighbours = item_neighbours_of(knn)
    store = ModelStore(str(tmp_path / "models"))
    store.publish(knn.validate())
    executor._models.clear()
    loaded = store.load("knn1")
    assert (loaded.item_neighbours != knn.item_neighbours).nnz == 0 and loaded.item_neighbours.nnz > 0

    frame = state_rows()
    records, _ = score_frame(frame, "knn1", batch_id=1, batch_started_ms=BATCH_START_MS, settings=settings_for(store))
    model = ServingModel.prepare(loaded)
    changed = frame[frame["new_events"] > 0].reset_index(drop=True)
    expected = records_for(model, changed, score_customers(model, changed, 3, True,
                                                           segments=changed["segment"].to_numpy(object)),
                           computed_at_ms=0)
    messages = [json.loads(v) for v in records["value"]]
    assert [m["recommendations"] for m in messages] == [r.to_message()["recommendations"] for r in expected]
    assert all(m["strategy"] == "personalized" for m in messages)


@pytest.mark.parametrize("model_type, params", [
    ("als", {"scaling": "log"}), ("als", {"scaling": "bm25", "scaling_k1": 100.0, "scaling_b": 0.8}),
    ("als", {"popularity_penalty": 0.5}), ("blend", {"scaling": "log", "blend_weight": 0.5}),
    ("item_knn", {"knn_weighting": "bm25", "popularity_penalty": 0.25})],
    ids=["als-log", "als-bm25", "als-penalty", "blend-log", "item_knn-bm25-penalty"])
def test_the_stream_lists_what_the_batch_lists_under_each_transform_and_penalty(tmp_path, model_type, params):
    """Customers whose only purchase since the cutoff is of a product the model does not know: the
    stream scores their trained counts alone, through the model's own count scaling and popularity
    penalty, so each list is the batch's for that customer (``recommend_from_counts`` over the
    trained counts, which the batch job writes for these types; for ALS when the final model is
    folded in, and a refit's user factors are that fold-in, see test_scaling_spark)."""
    from models.scorers import item_neighbours_of, recommend_from_counts
    from tests.small_models import skewed_model

    model = skewed_model(model_type, **params)
    if model_type == "item_knn":
        model.item_neighbours = item_neighbours_of(model)         # stored with the version, as the batch does
    store = ModelStore(str(tmp_path / "models"))
    store.publish(model.validate())
    executor._models.clear()
    customers = list(model.user_ids[:20])
    cutoff_ms = ServingModel.prepare(model).cutoff_ms
    frame = pd.DataFrame([(c, ["UNKNOWN"], [1], [AFTER_MS], 1, 0, 0, [AFTER_MS + 100], {"tx-0": i}, cutoff_ms, None)
                          for i, c in enumerate(customers)], columns=list(OUTPUT_COLUMNS))
    records, _ = score_frame(frame, model.version, batch_id=1, batch_started_ms=BATCH_START_MS,
                             settings=settings_for(store))
    streamed = {json.loads(v)["customer_id"]: [r["product_id"] for r in json.loads(v)["recommendations"]]
                for v in records["value"]}

    def batch_lists(artifact) -> list[list[str]]:
        item_idx, _, _ = recommend_from_counts(artifact, *artifact.user_items_of(artifact.user_index(customers)), 3,
                                               True)
        return [[str(artifact.item_ids[i]) for i in row if i >= 0] for row in item_idx]

    assert [streamed[c] for c in customers] == batch_lists(model)
    # Not vacuous: the transform or penalty changes some of these lists.
    assert batch_lists(skewed_model(model_type, **{k: v for k, v in params.items()
                                                   if k in ("blend_weight", "knn_weighting")})) != batch_lists(model)
