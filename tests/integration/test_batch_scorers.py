"""The batch job's scorer family end to end on generated data: every candidate in the report, the
published model type, and the buy-again list beside the discover list."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from batch_training.generate import write
from batch_training.job import run
from models.scorers import recommend_from_counts
from models.store import ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scorer-sample")
    write(folder, factor=0.03, seed=11, fmt="csv")
    return folder / "transactions.csv"


def test_the_job_reports_every_candidate_and_serves_buy_again_beside_discover(spark, cfg, tmp_path, sample):
    job_cfg = cfg.with_overrides({"data.path": str(sample), "batch.output_dir": str(tmp_path / "out"),
                                  "model_store.uri": str(tmp_path / "models"), "batch.grid": {},
                                  "batch.als.rank": 8, "batch.als.max_iter": 5, "batch.holdout.method": "time",
                                  "batch.scorers.blend_weights": [0.5], "batch.recency.half_life_days": 60})
    result = run(job_cfg, spark=spark)
    table = result.metrics["exclude_purchased"]
    assert {"model", "als", "blend(w=0.5)", "popularity", "item_knn(bm25)"} <= set(table)
    selected = result.metrics["selection"]["selected"]
    assert table["model"] == table[selected]
    # Cross-validation ranked every (ALS parameters, scorer) pair; the selection is its best one
    # (or popularity, when no personalised model beats it by the publish margin).
    ranking = result.metrics["cross_validation"]
    assert {row["model"] for row in ranking} == {"als", "blend(w=0.5)", "popularity", "item_knn(bm25)"}
    assert [row["mean_map"] for row in ranking] == sorted((row["mean_map"] for row in ranking), reverse=True)
    assert selected in (ranking[0]["model"], "popularity")
    assert result.metrics["buy_again"], "the time split holds out repurchases"

    artifact = ModelStore.from_config(job_cfg).load()
    assert artifact.model_type == result.model_type == result.metrics["selection"]["model_type"]
    assert artifact.params["recency_half_life_days"] == 60 and artifact.params["recency_reference_ms"] > 0
    # Decayed counts: fractional, and no larger than the raw purchase counts plus the newest ones.
    assert np.any(artifact.user_items_counts % 1 != 0) and artifact.user_items_counts.min() > 0
    recs = pd.read_parquet(tmp_path / "out" / "recommendations.parquet")
    indptr, indices, _ = artifact.user_items
    for row, (discover, again) in enumerate(zip(recs["recommendations"], recs["buy_again"])):
        bought = set(artifact.item_ids[indices[indptr[row]:indptr[row + 1]]])
        assert set(again) <= bought and not set(discover) & bought and not set(again) & set(discover)
    assert_written_lists_are_the_artifacts(recs, artifact)


def test_a_published_als_model_writes_what_its_artifact_scores(spark, cfg, tmp_path, sample):
    """ALS is the model type whose batch lists come from another path (the fit's own user factors,
    not the fold-in the stream uses): with ALS as the only candidate, its lists are checked too."""
    job_cfg = cfg.with_overrides({"data.path": str(sample), "batch.output_dir": str(tmp_path / "out"),
                                  "model_store.uri": str(tmp_path / "models"), "batch.cv_folds": 0,
                                  "batch.scorers.candidates": ["als"], "batch.als.rank": 8, "batch.als.max_iter": 5,
                                  "batch.holdout.method": "time", "batch.recency.half_life_days": 60})
    result = run(job_cfg, spark=spark)
    artifact = ModelStore.from_config(job_cfg).load()
    assert result.published and artifact.model_type == "als" and artifact.version == result.version
    assert_written_lists_are_the_artifacts(pd.read_parquet(tmp_path / "out" / "recommendations.parquet"), artifact)


def test_a_parameter_free_winner_costs_no_final_als_fit(spark, cfg, tmp_path, sample, caplog):
    """Popularity (or item-kNN) scores without the ALS factors: the job fits ALS once, for the
    holdout evaluation, and the model keeps that fit's item factors with every customer folded in."""
    import logging

    caplog.set_level(logging.INFO)
    job_cfg = cfg.with_overrides({"data.path": str(sample), "batch.output_dir": str(tmp_path / "out"),
                                  "model_store.uri": str(tmp_path / "models"), "batch.cv_folds": 0,
                                  "batch.scorers.candidates": ["popularity"], "batch.als.rank": 8,
                                  "batch.als.max_iter": 5})
    result = run(job_cfg, spark=spark)
    assert result.model_type == "popularity"
    assert caplog.text.count("fitted in") == 1 and "final fit skipped" in caplog.text
    assert "== final fit on all data" not in caplog.text
    artifact = ModelStore.from_config(job_cfg).load(result.version)
    assert artifact.user_factors.shape == (artifact.n_users, 8) and np.abs(artifact.user_factors).sum() > 0
    assert_written_lists_are_the_artifacts(pd.read_parquet(tmp_path / "out" / "versions" / result.version /
                                                           "recommendations.parquet"), artifact)


def assert_written_lists_are_the_artifacts(recs: pd.DataFrame, artifact) -> None:
    """Every customer's written list is what the one scoring function (the stream's) gives from the
    published artifact and its purchase counts: the same products in the same order, the same scores
    (written rounded to 6 places), whatever the model type."""
    items, scores, _ = recommend_from_counts(artifact, *artifact.user_items, 10, True)
    assert list(recs["customer_id"]) == list(artifact.user_ids)
    for row, (written, written_scores) in enumerate(zip(recs["recommendations"], recs["scores"])):
        kept = items[row] >= 0
        assert list(written) == list(artifact.item_ids[items[row][kept]]), f"customer {artifact.user_ids[row]}"
        np.testing.assert_allclose(written_scores, scores[row][kept], rtol=1e-6, atol=1e-6)


def test_segment_popularity_comes_from_the_segment_column(spark, cfg, tmp_path):
    from batch_training.data import aggregate, index_ids
    from batch_training.datasets import load_events
    from batch_training.outputs import segment_popularity_params
    from batch_training.train import PairArrays
    from models.scorers import segment_popularity

    rows = [("c1", "apple", "FR"), ("c2", "apple", "FR"), ("c2", "pear", "FR"), ("c3", "kiwi", "UK"),
            ("c4", "kiwi", "UK"), ("c4", "apple", "UK"), ("c5", "pear", "UK"), ("c5", "pear", "FR"),
            ("c5", "plum", "UK")]
    path = tmp_path / "rows.csv"
    pd.DataFrame(rows, columns=["customer", "product", "country"]).assign(
        qty=1, time="2025-01-01T00:00:00Z").to_csv(path, index=False)
    data = {"kind": "files", "path": str(path), "format": "csv", "count_mode": "rows",
            "columns": {"customer_id": "customer", "product_id": "product", "quantity": "qty",
                        "event_time": "time", "segment": "country"}}
    job_cfg = cfg.with_overrides({"data": data})
    events, _ = load_events(spark, data)
    indexed, maps = index_ids(aggregate(events))
    params = segment_popularity_params(spark, job_cfg, maps, indexed)
    products = maps.products.toPandas().set_index("item")["product_id"]
    named = {seg: [products[i] for i in table["items"]] for seg, table in params["segment_popularity"].items()}
    # c5 is in UK (two UK rows to one FR); buyers per segment, ties by item index.
    assert named["FR"] == ["apple", "pear"] and params["segment_popularity"]["FR"]["buyers"] == [2.0, 1.0]
    assert named["UK"][0] == "kiwi" and set(named["UK"]) == {"kiwi", "apple", "pear", "plum"}
    assert params["segment_column"] == "country"
    # Spark's aggregation gives the table the scorers' own function gives from the gathered counts.
    pairs = PairArrays.collect(indexed, maps.n_users)
    by_user = maps.customers.toPandas().set_index("user")["customer_id"]
    home = {"c1": "FR", "c2": "FR", "c3": "UK", "c4": "UK", "c5": "UK"}
    assert params["segment_popularity"] == segment_popularity([home[by_user[u]] for u in range(maps.n_users)],
                                                              pairs.indptr, pairs.indices, maps.n_items)
