"""The batch job end to end on generated data: logs, outputs, model store, publish gate, explicit mode."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from batch_training.generate import write
from batch_training.job import PublishRefused, run
from batch_training.publish import gate_decision
from models.store import ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SMALL = {"batch.als.rank": 16, "batch.als.max_iter": 6, "batch.cv_folds": 2,
         "batch.grid": {"reg_param": [0.01, 0.1]}}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    write(folder, factor=0.05, seed=7, fmt="csv")
    return folder / "transactions.csv"


def _job_cfg(cfg, tmp_path, sample, **extra):
    return cfg.with_overrides({"data.path": str(sample), "batch.output_dir": str(tmp_path / "out"),
                               "model_store.uri": str(tmp_path / "models"), **SMALL, **extra})


def test_the_job_logs_like_the_original_and_publishes_a_usable_model(spark, cfg, tmp_path, sample, caplog):
    caplog.set_level(logging.INFO)
    job_cfg = _job_cfg(cfg, tmp_path, sample)
    result = run(job_cfg, spark=spark)
    log_text = caplog.text
    for expected in ("raw rows: ", "clean rows: ", "dropped missing_customer_id", "customer-product pairs",
                     "purchase counts per pair: mean", "holdout (time): train", "CV fold 2/2",
                     "map@10", "popularity", "recommendations written for", "example: customer"):
        assert expected in log_text, f"log lacks {expected!r}"
    raw_rows = len(pd.read_csv(sample, dtype=str))
    assert f"raw rows: {raw_rows:,}" in log_text

    store = ModelStore.from_config(job_cfg)
    assert result.published and store.current_version() == result.version
    artifact = store.load()
    assert artifact.item_factors.shape[1] == 16 and artifact.cutoff_time is not None
    excluded = result.metrics["exclude_purchased"]
    assert excluded["model"]["map"] > excluded["popularity"]["map"]
    assert {"precision", "recall", "map", "ndcg", "coverage", "novelty", "diversity"} <= set(excluded["model"])
    assert "include_purchased" in result.metrics
    # When CV moved away from the configured parameters, ALS at those is reported beside the model.
    from batch_training.job_settings import als_params_from_config
    assert ("plain_als" in excluded) == (result.params != als_params_from_config(job_cfg))
    # Its lineage names the very file it read (size and time) and the rows, the code and the config.
    source = artifact.lineage["source"]
    assert source["path"] == str(sample) and source["bytes"] == sample.stat().st_size and source["files"] == 1
    assert source["raw_rows"] == raw_rows and source["clean_rows"] == result.stats["clean_rows"]
    assert artifact.lineage["params"]["rank"] == 16 and len(artifact.lineage["config_sha256"]) == 64

    recs = pd.read_parquet(tmp_path / "out" / "recommendations.parquet")
    assert len(recs) == artifact.n_users == result.recommendations_written
    assert recs["recommendations"].map(len).eq(10).all()
    raw = pd.read_csv(sample, dtype=str).dropna(subset=["customer_id", "product_id"])
    valid = (pd.to_numeric(raw["quantity"], errors="coerce") > 0) & \
        pd.to_datetime(raw["event_time"], errors="coerce", utc=True, format="ISO8601").notna()
    bought = raw[valid]  # the purchases the job keeps after cleaning
    bought_by = bought.groupby("customer_id")["product_id"].agg(set)
    overlap = sum(len(set(r) & bought_by.get(c, set())) for c, r in zip(recs["customer_id"], recs["recommendations"]))
    assert overlap == 0  # purchased products are excluded by default
    csv = pd.read_csv(tmp_path / "out" / "recommendations.csv", dtype=str)
    assert list(csv.columns) == ["customer_id", "recommendations", "scores"] and len(csv) == len(recs)


def test_the_publish_gate_refuses_a_deliberately_bad_model_and_keeps_the_current(spark, cfg, tmp_path, sample):
    good = _job_cfg(cfg, tmp_path, sample, **{"batch.grid": {}, "batch.topk_engine": "spark"})
    first = run(good, spark=spark)
    # Plain ALS only: with the whole scorer family the job would rightly publish item-kNN instead.
    bad = _job_cfg(cfg, tmp_path, sample, **{"batch.grid": {}, "batch.als.rank": 2, "batch.scorers.candidates": ["als"],
                                              "batch.als.reg_param": 1.0e6, "batch.als.max_iter": 1})
    with pytest.raises(PublishRefused, match="does not beat popularity"):
        run(bad, spark=spark)
    store = ModelStore.from_config(good)
    assert store.current_version() == first.version
    assert len(store.list_versions()) == 2  # the refused model is kept for inspection, not made current
    # The top-level output stays the published model's; the refused run's lists are in its own folder.
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["version"] == first.version and summary["published"] is True
    assert len(list((tmp_path / "out" / "versions").iterdir())) == 2
    # The distributed top-k engine wrote a full list for everyone.
    recs = pd.read_parquet(tmp_path / "out" / "recommendations.parquet")
    assert len(recs) == first.recommendations_written and recs["recommendations"].map(len).eq(10).all()


def _cleaned_events(sample) -> pd.DataFrame:
    """The purchases the job keeps, by the cleaning rules of the generated data (ids present, a
    positive numeric quantity, a parseable time), read with pandas."""
    raw = pd.read_csv(sample, dtype=str).dropna(subset=["customer_id", "product_id"])
    quantity = pd.to_numeric(raw["quantity"], errors="coerce")
    time = pd.to_datetime(raw["event_time"], errors="coerce", utc=True, format="ISO8601")
    kept = (quantity > 0) & time.notna()
    return raw[kept].assign(micros=time[kept].astype("int64") // 1_000)


def _time_holdout(events: pd.DataFrame, test_fraction: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The documented time split, recomputed: a customer's purchases after the (1 - fraction)
    percentile of their purchase times are held out; each part counted per (customer, product)."""
    cutoff = events.groupby("customer_id")["micros"].transform(lambda t: t.quantile(1 - test_fraction))
    held_out = events["micros"] > cutoff

    def counts(part):
        return part.groupby(["customer_id", "product_id"]).size().rename("count").reset_index()
    return counts(events[~held_out]), counts(events[held_out])


def test_explicit_mode_reports_the_holdout_rmse_and_the_gate_compares_it_with_the_current_model(
        spark, cfg, tmp_path, sample):
    """The reported RMSE is recomputed independently: the split from the raw file with pandas, the
    holdout fit's user vectors as ALS's last half-step (a fold-in of the training counts into its
    item factors, which batch.final_fit=fold_in publishes), the predictions as dot products; beside
    it the global-mean predictor. The explicit model overfits on purchase counts: it fits the
    training pairs far better than the mean, and the held-out ones worse (a lower held-out RMSE
    than the training one would mean the held-out purchases leaked into the fit)."""
    from models.scoring import fold_in

    explicit = _job_cfg(cfg, tmp_path, sample, **{"batch.grid": {}, "batch.als.implicit_prefs": False,
                                                   "batch.selection_metric": "rmse", "batch.publish.metric": "rmse",
                                                   "batch.final_fit": "fold_in"})
    result = run(explicit, spark=spark)
    reported = result.metrics["rmse"]
    assert set(reported) == {"train", "test"}
    assert np.isfinite(result.metrics["exclude_purchased"]["model"]["map"])

    events = _cleaned_events(sample)
    assert len(events) == result.stats["clean_rows"], "the recomputation must start from the job's rows"
    train, test = _time_holdout(events)
    assert len(train) + len(test) > len(train) > 0.6 * (len(train) + len(test))

    artifact = ModelStore.from_config(explicit).load(result.version)
    assert artifact.params["implicit_prefs"] is False
    users, items = artifact.user_index(train["customer_id"]), artifact.item_index(train["product_id"])
    assert (users >= 0).all() and (items >= 0).all()
    order = np.argsort(users, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=artifact.n_users))])
    vectors = fold_in(artifact.item_factors, indptr, items[order], train["count"].to_numpy(float)[order],
                      artifact.params["reg_param"], artifact.params["alpha"], implicit=False)

    def rmse_of(pairs: pd.DataFrame) -> float:
        u, i = artifact.user_index(pairs["customer_id"]), artifact.item_index(pairs["product_id"])
        predicted = np.einsum("ij,ij->i", vectors[u].astype(float), artifact.item_factors[i].astype(float))
        return float(np.sqrt(np.mean((predicted - pairs["count"].to_numpy(float)) ** 2)))

    assert reported["train"] == pytest.approx(rmse_of(train), rel=1e-5)
    assert reported["test"] == pytest.approx(rmse_of(test), rel=1e-5)
    mean = train["count"].mean()
    mean_train_rmse = float(np.sqrt(np.mean((train["count"] - mean) ** 2)))
    mean_test_rmse = float(np.sqrt(np.mean((test["count"] - mean) ** 2)))
    assert reported["train"] < 0.5 * mean_train_rmse, (reported, mean_train_rmse)
    assert reported["test"] > max(reported["train"], mean_test_rmse), (reported, mean_test_rmse)

    # The gate in explicit mode: the first model is published (no current model to compare with);
    # one whose held-out RMSE is higher than the current model's by more than the allowed rise is not.
    assert result.published and "no current model" in result.gate_reason
    worse = _job_cfg(cfg, tmp_path, sample, **{"batch.grid": {}, "batch.als.implicit_prefs": False,
                                                "batch.selection_metric": "rmse", "batch.publish.metric": "rmse",
                                                "batch.final_fit": "fold_in", "batch.als.reg_param": 0.001,
                                                "batch.publish.max_rmse_rise_vs_current": 0.0})
    with pytest.raises(PublishRefused, match="max_rmse_rise_vs_current"):
        run(worse, spark=spark)
    assert ModelStore.from_config(explicit).current_version() == result.version


@pytest.mark.parametrize("scaling", ["none", "bm25"])
def test_fold_in_final_fits_once_and_serves_what_the_stream_would(spark, cfg, tmp_path, sample, caplog, scaling):
    """batch.final_fit=fold_in skips the second ALS fit; the written lists are then exactly the
    fold-in + top-k the streaming job computes from the same counts (and, with bm25, the same
    transform from the model's popularity). --no-publish still succeeds."""
    from models.scorers import recommend_from_counts

    caplog.set_level(logging.INFO)
    job_cfg = _job_cfg(cfg, tmp_path, sample, **{"batch.cv_folds": 0, "batch.final_fit": "fold_in",
                                                  "batch.publish.enabled": False, "batch.als.scaling": scaling})
    result = run(job_cfg, spark=spark)      # no PublishRefused: publishing was switched off
    assert not result.published and "publishing disabled" in result.gate_reason
    ok, verdict = gate_decision(job_cfg, result.metrics, "map", True, None)   # the verdict all the same
    assert result.gate_reason.endswith(f"the gate {'would publish' if ok else 'would REFUSE'} it: {verdict}")
    assert result.gate_reason in caplog.text
    assert caplog.text.count(" fitted in ") == 1
    store = ModelStore.from_config(job_cfg)
    assert store.current_version() is None
    artifact = store.load(result.version)
    assert artifact.model_type == "als" and artifact.params["count_mode"] == "rows"
    assert artifact.params["scaling"] == scaling
    items, _, _ = recommend_from_counts(artifact, *artifact.user_items, 10, True)
    written = pd.read_parquet(tmp_path / "out" / "versions" / result.version / "recommendations.parquet")
    expected = [list(artifact.item_ids[row[row >= 0]]) for row in items]
    assert [list(r) for r in written["recommendations"]] == expected


def test_the_cv_race_stops_a_hopeless_candidate_after_one_fold(spark, cfg, tmp_path, sample, caplog):
    caplog.set_level(logging.INFO)
    # reg_param 1000 shrinks every factor to nothing: far more than 2 % behind after the first fold.
    job_cfg = _job_cfg(cfg, tmp_path, sample, **{"batch.cv_folds": 3, "batch.cv_race_tolerance": 0.02,
                                                 "batch.grid": {"reg_param": [1000.0, 0.1]},
                                                 "batch.scorers.candidates": ["als", "popularity"]})
    result = run(job_cfg, spark=spark)
    assert "CV race after fold 1: rank=16 reg=1000" in caplog.text
    folds = {(row["model"], (row["params"] or {}).get("reg_param")): row["folds"]
             for row in result.metrics["cross_validation"]}
    assert folds == {("als", 0.1): 3, ("popularity", None): 3, ("als", 1000.0): 1}
    assert result.params.reg_param == 0.1
    assert sum("CV fold" in r.message and "candidate rank=16 reg=1000" in r.message for r in caplog.records) == 1


def test_products_with_too_few_buyers_are_left_out_of_the_als_fit(spark):
    from batch_training.train import AlsParams, fit_als

    # item 0: 4 buyers, item 1: 3, item 2: 1 (a tail product)
    rows = [(u, 0, 2.0) for u in range(4)] + [(u, 1, 1.0) for u in range(3)] + [(0, 2, 5.0)]
    pairs = spark.createDataFrame(rows, "user int, item int, count double")
    params = AlsParams(rank=4, max_iter=3, reg_param=0.1, min_item_customers=3)
    factors = fit_als(pairs, params, n_users=4, n_items=3)
    assert np.abs(factors.item_factors[[0, 1]]).sum(axis=1).min() > 0
    assert not factors.item_factors[2].any()
    everything = fit_als(pairs, AlsParams(rank=4, max_iter=3, reg_param=0.1), n_users=4, n_items=3)
    assert everything.item_factors[2].any()
