"""The batch job's per-customer work on the executors gives what the driver path gives: the same
lists for every model type, the same user side of the model in the store, and the same job
outputs (files, table, topic) end to end."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from batch_training.candidates import Candidate
from batch_training.data import aggregate, index_ids
from batch_training.datasets import load_events
from batch_training.evaluation import item_popularity
from batch_training.generate import write
from batch_training.job import run
from batch_training.outputs import build_artifact, buy_again_all, item_side_of, ordered_ids, recommend_all
from batch_training.per_customer import partitions_for, run_on_executors, seed_item_neighbours, use_executors
from batch_training.train import AlsParams, PairArrays, fit_als
from models.neighbours import KnnParams
from models.popularity_bias import multipliers, scaled_factors
from models.scoring import top_k
from models.store import ModelStore

pytestmark = [pytest.mark.integration]

K = 10


@pytest.fixture(scope="module")
def prepared(spark, cfg, tmp_path_factory):
    """A small generated sample, indexed, with one ALS fit whose user factors are both gathered
    (for the driver path) and distributed (for the executors)."""
    folder = tmp_path_factory.mktemp("per_customer")
    write(folder, factor=0.05, seed=11, fmt="csv")
    data = {**cfg.get_path("data"), "path": str(folder / "transactions.csv")}
    events, _ = load_events(spark, data)
    indexed, maps = index_ids(aggregate(events).cache())
    indexed = indexed.cache()
    params = AlsParams(rank=8, max_iter=4, reg_param=0.1, alpha=1.0, seed=3, blocks=2)
    factors = fit_als(indexed, params, maps.n_users, maps.n_items)
    all_pairs = PairArrays.collect(indexed, maps.n_users)
    return {"indexed": indexed, "maps": maps, "factors": factors, "pairs": all_pairs, "params": params,
            "buyers": item_popularity(indexed, maps.n_items).buyers,
            "customer_ids": ordered_ids(maps.customers, "customer_id", "user", maps.n_users),
            "product_ids": ordered_ids(maps.products, "product_id", "item", maps.n_items)}


def _driver_lists(p, candidate: Candidate, exclude: bool, factors, rules=None) -> tuple[pd.DataFrame, object]:
    artifact = build_artifact(p["params"], factors, p["customer_ids"], p["product_ids"], p["buyers"], p["pairs"],
                              None, {}, {}, candidate, {})
    item_idx, scores, strategies = recommend_all(artifact, p["pairs"], exclude, K, factors, rules)
    again_idx, again_scores = buy_again_all(artifact, p["pairs"], K, rules)
    ids = p["product_ids"]
    frame = pd.DataFrame({
        "customer_id": p["customer_ids"],
        "recommendations": [[ids[i] for i in row if i >= 0] for row in item_idx],
        "scores": [[float(s) for s, i in zip(srow, row) if i >= 0] for srow, row in zip(scores, item_idx)],
        "buy_again": [[ids[i] for i in row if i >= 0] for row in again_idx],
        "buy_again_scores": [[float(s) for s, i in zip(srow, row) if i >= 0]
                             for srow, row in zip(again_scores, again_idx)],
        "strategy": strategies})
    return frame.set_index("customer_id").sort_index(), artifact


def _executor_run(spark, cfg, tmp_path, p, candidate: Candidate, exclude: bool, factors, user_factors_df,
                  rules=None):
    job_cfg = cfg.with_overrides({"model_store.uri": str(tmp_path / "models"), "batch.customers_per_partition": 60})
    item_side = build_artifact(p["params"], item_side_of(factors), np.zeros(0, dtype=str), p["product_ids"],
                               p["buyers"], PairArrays.empty(), None, {}, {}, candidate, {})
    if candidate.model_type == "item_knn":
        seed_item_neighbours(item_side, p["indexed"], p["maps"].n_users)
    outputs = run_on_executors(spark, job_cfg, p["indexed"], p["maps"], item_side, user_factors_df, K, exclude,
                               tmp_path, rules=rules)
    scored = outputs.scored.toPandas().set_index("customer_id").sort_index()
    return scored, outputs, item_side, job_cfg


def _assert_same_lists(driver: pd.DataFrame, executors: pd.DataFrame) -> None:
    assert list(executors.index) == list(driver.index)
    for column in ("recommendations", "buy_again"):
        assert [list(v) for v in executors[column]] == [list(v) for v in driver[column]], column
    for column in ("scores", "buy_again_scores"):
        for got, want in zip(executors[column], driver[column]):
            np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-5,
                                       atol=1e-6)
    assert list(executors["strategy"]) == list(driver["strategy"])


@pytest.mark.parametrize("candidate, exclude", [(Candidate("als"), True), (Candidate("als"), False),
                                                (Candidate("blend", 0.5), True), (Candidate("popularity"), True),
                                                (Candidate("item_knn"), True),
                                                (Candidate("item_knn", knn=KnnParams(neighbours=5)), True),
                                                (Candidate("als", penalty=0.5), True),
                                                (Candidate("item_knn", knn=KnnParams(), penalty=0.5), True)],
                         ids=["als", "als-include-purchased", "blend", "popularity", "item_knn", "item_knn-top5",
                              "als-penalised", "item_knn-penalised"])
def test_the_executors_give_the_driver_paths_lists(spark, cfg, tmp_path, prepared, candidate, exclude):
    p = prepared
    driver, _ = _driver_lists(p, candidate, exclude, p["factors"])
    executors, outputs, _, _ = _executor_run(spark, cfg, tmp_path, p, candidate, exclude, p["factors"],
                                             p["factors"].user_factors_df)
    _assert_same_lists(driver, executors)
    if candidate.model_type == "als" and candidate.penalty:
        # The published lists rank by the penalised scores, as the evaluation and the stream do.
        penalised = scaled_factors(p["factors"].item_factors, multipliers(p["buyers"], candidate.penalty))
        users = np.arange(p["maps"].n_users)
        want, _ = top_k(p["factors"].user_factors, penalised, K, exclude=p["pairs"].rows(users))
        ids = p["product_ids"]
        want_lists = {c: [ids[i] for i in row if i >= 0] for c, row in zip(p["customer_ids"], want)}
        assert [list(v) for v in driver["recommendations"]] == [want_lists[c] for c in driver.index]
    assert outputs.written == p["maps"].n_users
    # Several tasks did the work: the sample's customers in partitions of at most 60.
    assert len(outputs.user_parts) == partitions_for(p["maps"].n_users, 60, spark) > 1
    outputs.scored.unpersist()


def test_fold_in_on_the_executors_is_the_drivers_fold_in(spark, cfg, tmp_path, prepared):
    from batch_training.holdout import folded_final

    p = prepared
    folded = folded_final(p["factors"], p["pairs"], p["buyers"])
    driver, _ = _driver_lists(p, Candidate("als"), True, folded)
    executors, outputs, _, _ = _executor_run(spark, cfg, tmp_path, p, Candidate("als"), True, p["factors"], None)
    _assert_same_lists(driver, executors)
    outputs.scored.unpersist()


def test_the_stored_user_side_is_the_drivers_and_the_files_are_readable(spark, cfg, tmp_path, prepared):
    p = prepared
    driver_lists, driver_artifact = _driver_lists(p, Candidate("als"), True, p["factors"])
    _, outputs, item_side, job_cfg = _executor_run(spark, cfg, tmp_path, p, Candidate("als"), True, p["factors"],
                                                   p["factors"].user_factors_df)
    store = ModelStore.from_config(job_cfg)
    store.write(item_side, user_parts=outputs.user_parts)
    store.set_current(item_side.version)
    loaded = store.load()
    assert sorted(loaded.user_ids) == sorted(driver_artifact.user_ids)
    order = driver_artifact.user_index(loaded.user_ids)
    indptr, indices, counts = loaded.user_items
    want_indptr, want_indices, want_counts = driver_artifact.user_items_of(order)
    np.testing.assert_array_equal(indptr, want_indptr)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(loaded.user_factors, driver_artifact.user_factors[order], rtol=1e-6)
    np.testing.assert_array_equal(loaded.item_factors, driver_artifact.item_factors)
    # The stream scores a customer without new purchases from the loaded parts: the batch's list.
    from models.scorers import recommend_from_counts

    stream_idx, _, _ = recommend_from_counts(loaded, *loaded.user_items, K, True)
    written = outputs.scored.toPandas().set_index("customer_id")
    for row, customer in enumerate(loaded.user_ids[:50]):
        assert list(loaded.item_ids[stream_idx[row][stream_idx[row] >= 0]]) == list(written.loc[customer,
                                                                                                "recommendations"])
    # The files: folders of part files that pandas reads as one table each, with the driver's columns.
    parquet = pd.read_parquet(tmp_path / "recommendations.parquet").set_index("customer_id").sort_index()
    assert [list(v) for v in parquet["recommendations"]] == [list(v) for v in driver_lists["recommendations"]]
    csv = pd.concat(pd.read_csv(f, dtype=str) for f in sorted((tmp_path / "recommendations.csv").glob("*.csv")))
    assert list(csv.columns) == ["customer_id", "recommendations", "scores"] and len(csv) == len(driver_lists)
    first = csv.set_index("customer_id").loc[driver_lists.index[0]]
    assert first["recommendations"].split(" ") == list(driver_lists["recommendations"].iloc[0])
    assert [float(s) for s in first["scores"].split(" ")] == pytest.approx(driver_lists["scores"].iloc[0], abs=1e-6)
    outputs.scored.unpersist()


def test_a_small_base_still_gets_two_partitions_per_core(spark):
    cores = spark.sparkContext.defaultParallelism
    assert partitions_for(10, 20_000, spark) == 2 * cores
    assert partitions_for(10 * 20_000 * cores, 20_000, spark) == 10 * cores     # the size rules above that
    assert partitions_for(10, 20_000) == 1


def test_auto_takes_the_executors_from_the_configured_size(cfg):
    auto = cfg.with_overrides({"batch.topk_engine": "auto", "batch.executor_min_customers": 1000})
    assert not use_executors(auto, 999) and use_executors(auto, 1000)
    assert use_executors(cfg.with_overrides({"batch.topk_engine": "spark"}), 1)
    assert not use_executors(cfg.with_overrides({"batch.topk_engine": "driver"}), 10 ** 9)


def test_the_holdout_is_evaluated_on_a_fixed_sample_of_a_large_customer_base(spark):
    from batch_training.holdout import evaluation_sample

    test = spark.createDataFrame([(u, u % 7, 1.0) for u in range(20_000)], "user int, item int, count double")
    assert evaluation_sample(test, 20_000, 20_000) is test and evaluation_sample(test, 20_000, None) is test
    sampled = evaluation_sample(test, 20_000, 2_000)
    users = {row.user for row in sampled.select("user").collect()}
    assert 1_700 <= len(users) <= 2_300       # about the asked number, by hash
    assert users == {row.user for row in evaluation_sample(test, 20_000, 2_000).select("user").collect()}


def test_cross_validation_and_holdout_on_the_executors_give_the_driver_paths_tables(spark, cfg, tmp_path):
    """The CV's folds are scored where the holdout is: with batch.topk_engine=spark on the
    executors (fits without gathering the user factors), with the same table as the driver's."""
    write(tmp_path / "data", factor=0.05, seed=5, fmt="csv")
    results = {}
    for engine in ("driver", "spark"):
        results[engine] = run(cfg.with_overrides({
            "data.path": str(tmp_path / "data" / "transactions.csv"), "batch.topk_engine": engine,
            "batch.output_dir": str(tmp_path / engine / "out"), "model_store.uri": str(tmp_path / engine / "models"),
            "batch.cv_folds": 2, "batch.grid": {"rank": [4, 8]}, "batch.catalogue_grids": [],
            "batch.als.max_iter": 3, "batch.als.blocks": 2,
            "batch.scorers.candidates": ["als", "blend", "popularity", "item_knn"],
            "batch.scorers.blend_weights": [0.5], "batch.final_fit": "fold_in",
            "batch.customers_per_partition": 40, "batch.write_table": False, "batch.write_topic": False}),
            spark=spark)
    driver, executors = (results[e].metrics for e in ("driver", "spark"))
    assert len(driver["cross_validation"]) == 6        # 2 ALS fits x (als, blend) + popularity + item-kNN
    assert [row["model"] for row in executors["cross_validation"]] == \
        [row["model"] for row in driver["cross_validation"]]
    for got, want in zip(executors["cross_validation"], driver["cross_validation"]):
        assert got["params"] == want["params"]
        assert got["mean_map"] == pytest.approx(want["mean_map"], rel=1e-6, abs=1e-12)
        assert got["sd_map"] == pytest.approx(want["sd_map"], rel=1e-6, abs=1e-12)
    for name, row in driver["exclude_purchased"].items():
        for metric in ("map", "ndcg", "recall", "users", "coverage"):
            assert executors["exclude_purchased"][name][metric] == pytest.approx(row[metric], rel=1e-6), (name, metric)
    assert results["spark"].model_type == results["driver"].model_type


def _rules_for(p, boost: str = "linear"):
    """The three best sellers out of stock, every product boosted by a margin in [0, 1)."""
    from models.business_rules import RulesConfig, build_rules

    ids = p["product_ids"]
    best = set(ids[np.argsort(-p["buyers"], kind="stable")[:3]])
    frame = pd.DataFrame({"product_id": ids, "margin": np.random.default_rng(3).uniform(0, 1, len(ids)),
                          "in_stock": [i not in best for i in ids], "category": "any"})
    config = RulesConfig(attributes="attributes.csv", out_of_stock=True, categories=(), boost=boost, strength=1.0)
    return build_rules(config, frame, sha256="test"), best


@pytest.mark.parametrize("candidate", [Candidate("als"), Candidate("blend", 0.5), Candidate("item_knn"),
                                       Candidate("als", penalty=0.5)],
                         ids=["als", "blend", "item_knn", "als-penalised"])
def test_the_executors_apply_the_business_rules_as_the_driver_does(spark, cfg, tmp_path, prepared, candidate):
    """The rules reach the tasks (broadcast with the model's item side): the same lists as the
    driver path, none holding an out-of-stock product, and boosted (not today's lists)."""
    p = prepared
    rules, banned = _rules_for(p)
    plain, _ = _driver_lists(p, candidate, True, p["factors"])
    driver, _ = _driver_lists(p, candidate, True, p["factors"], rules)
    executors, outputs, _, _ = _executor_run(spark, cfg, tmp_path, p, candidate, True, p["factors"],
                                             p["factors"].user_factors_df, rules)
    _assert_same_lists(driver, executors)
    listed = {i for column in ("recommendations", "buy_again") for row in executors[column] for i in row}
    assert not listed & banned
    assert {i for column in ("recommendations", "buy_again") for row in plain[column] for i in row} & banned
    assert [list(v) for v in executors["recommendations"]] != [list(v) for v in plain["recommendations"]]
    assert all(len(row) == K for row in executors["recommendations"])
    outputs.scored.unpersist()
