"""The holdout evaluation on the executors gives the driver path's metrics, key by key, whatever the
number of partitions (batch_training/executor_eval.py)."""
from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from batch_training.candidates import Candidate, scoring_artifact
from batch_training.evaluation import Csr, ItemPopularity, evaluate, holdout_split
from batch_training.executor_eval import (
    buy_again_table_on_executors,
    candidate_table_on_executors,
    item_neighbours_on_executors,
    metrics_from_sums,
    partition_sums,
)
from batch_training.holdout import Split, candidate_table, evaluate_buy_again
from batch_training.train import AlsParams, fit_als
from models.neighbours import KnnParams, item_neighbours

pytestmark = pytest.mark.integration

EPOCH = datetime(2024, 1, 1)
N_USERS, N_ITEMS, N_COLD, K = 300, 50, 4, 10
CANDIDATES = [Candidate("als"), Candidate("popularity"), Candidate("blend", 0.5), Candidate("item_knn"),
              Candidate("item_knn", knn=KnnParams(neighbours=5, weighting="bm25"))]


@pytest.fixture(scope="module")
def holdout(spark):
    """A time split of skewed purchases (repurchases held out too), a few customers known only from
    the test part (the popularity fallback), a real ALS fit at low rank, and the driver's split."""
    rng = np.random.default_rng(7)
    weights = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    rows = []
    for user in range(N_USERS):
        n = int(rng.integers(2, 16))
        days = rng.integers(0, 200, n) if user % 25 else np.full(n, 5)     # one time: stays in train
        for item, day in zip(rng.choice(N_ITEMS, n, p=weights / weights.sum()), days):
            rows.append((user, int(item), float(rng.integers(1, 4)), EPOCH + timedelta(days=int(day))))
    events = spark.createDataFrame(pd.DataFrame(rows, columns=["user", "item", "quantity", "event_time"]),
                                   schema="user int, item int, quantity double, event_time timestamp")
    train, test = holdout_split(events, "time", test_fraction=0.3)
    cold = spark.createDataFrame([(N_USERS + i, 3 * i, 1.0, None, False) for i in range(N_COLD)], test.schema)
    train, test = train.cache(), test.unionByName(cold).cache()
    n_users = N_USERS + N_COLD
    factors = fit_als(train, AlsParams(rank=6, max_iter=4, blocks=2, seed=3), n_users, N_ITEMS)
    split = Split(train, test, n_users, N_ITEMS)
    base = scoring_artifact(factors.item_factors, np.zeros(1, np.int64), np.zeros(0, np.int32),
                            np.zeros(0, np.float32), split.popularity.buyers.astype(np.float64),
                            factors.params.as_dict())
    yield factors, split, base
    train.unpersist()
    test.unpersist()


def assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, metrics in expected.items():
        assert list(got[name]) == list(metrics), name
        for key, value in metrics.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[name][key]), (name, key)
            else:
                assert got[name][key] == pytest.approx(value, rel=1e-9, abs=1e-15), (name, key, got[name][key])


def test_partition_sums_add_up_to_evaluate():
    """The per-partition arithmetic alone: lists cut into three parts, summed, equal evaluate's means
    (short and empty lists, padding, customers without relevant items, repeats across parts)."""
    rng = np.random.default_rng(1)
    n_rows, n_items = 200, 40
    recommended = np.array([rng.permutation(n_items)[:K] for _ in range(n_rows)])
    lengths = rng.integers(0, K + 1, n_rows)
    recommended[np.arange(K)[None, :] >= lengths[:, None]] = -1
    relevant_rows = [rng.choice(n_items, int(rng.integers(0, 6)), replace=False) for _ in range(n_rows)]
    popularity = ItemPopularity(buyers=rng.integers(0, 30, n_items), n_customers=30)
    factors = rng.normal(size=(n_items, 5))
    factors[3] = 0.0

    def relevant(rows: list) -> Csr:
        return Csr(np.concatenate([[0], np.cumsum([len(r) for r in rows])]), np.concatenate(rows).astype(np.int64))

    parts = [slice(0, 37), slice(37, 120), slice(120, n_rows)]
    sums = [partition_sums(recommended[p], relevant(relevant_rows[p]), K, popularity, factors) for p in parts]
    total = {key: sum(s[key] for s in sums) for key in sums[0]}
    distinct = np.unique(np.concatenate([np.unique(recommended[p][recommended[p] >= 0]) for p in parts])).size
    expected = evaluate(recommended, relevant(relevant_rows), K, n_items, popularity, factors)
    assert 0 < expected["users"] < n_rows
    assert_same({"x": metrics_from_sums(total, distinct, K, n_items, diversity=True)}, {"x": expected})


@pytest.mark.parametrize("params", [KnnParams(), KnnParams(neighbours=5), KnnParams(neighbours=5, max_customers=40),
                                    KnnParams(neighbours=5, weighting="bm25", k1=2.0, b=0.5)])
def test_sparks_neighbour_table_is_the_one_built_from_the_training_counts(holdout, params):
    _, split, _ = holdout
    p = split.purchased
    expected = item_neighbours(p.indptr, p.indices, p.counts, N_ITEMS, params).toarray()
    got = item_neighbours_on_executors(split.train, len(p.indptr) - 1, N_ITEMS, params).toarray()
    if params.weighting == "cosine":
        np.testing.assert_array_equal(got, expected)      # the same arithmetic on whole counts: bit for bit
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("exclude", [True, False])
def test_candidate_table_matches_the_driver_path(holdout, exclude):
    factors, split, base = holdout
    expected = candidate_table(factors, split, K, exclude, CANDIDATES)
    got = candidate_table_on_executors(split.train, split.test, base, CANDIDATES, K, exclude, split.popularity,
                                       item_factors=factors.item_factors, partitions=3)
    assert expected["als"]["users"] > 100 and len({m["map"] for m in expected.values()}) == len(CANDIDATES)
    assert_same(got, expected)


@pytest.mark.parametrize("selected", [Candidate("blend", 0.5), Candidate("item_knn")], ids=["blend", "item_knn"])
def test_buy_again_table_matches_the_driver_path(holdout, selected):
    factors, split, base = holdout
    expected = evaluate_buy_again(factors, split, K, selected)
    got = buy_again_table_on_executors(split.train, split.test, base, K, selected, split.popularity, partitions=3)
    assert len(expected) == 3 and expected["buy_again(als)"]["users"] > 20
    assert_same(got, expected)


def test_no_held_out_repurchase_gives_no_buy_again_table(holdout):
    from pyspark.sql import functions as F

    _, split, base = holdout
    new_only = split.test.where(~F.col("repurchase"))
    assert buy_again_table_on_executors(split.train, new_only, base, K, Candidate("als"), split.popularity) == {}


def test_the_result_does_not_depend_on_the_number_of_partitions(holdout):
    factors, split, base = holdout
    one, seven = (candidate_table_on_executors(split.train, split.test, base, CANDIDATES, K, True, split.popularity,
                                               item_factors=factors.item_factors, partitions=n) for n in (1, 7))
    assert_same(seven, one)
    again = [buy_again_table_on_executors(split.train, split.test, base, K, Candidate("als"), split.popularity,
                                          partitions=n) for n in (1, 7)]
    assert_same(again[1], again[0])


def test_a_split_builds_each_neighbour_table_once_for_every_pass_and_fit(holdout):
    """The table does not depend on the ALS fit: the driver path's passes (purchases excluded and
    included, the buy-again table) and every fit scored on the split share one build."""
    factors, split, _ = holdout
    split.neighbour_tables.clear()
    candidate_table(factors, split, K, True, CANDIDATES)
    tables = dict(split.neighbour_tables)
    candidate_table(factors, split, K, False, CANDIDATES)
    evaluate_buy_again(factors, split, K, Candidate("item_knn"))
    assert len(tables) == 2                                   # cosine (every neighbour) and bm25 top-5
    assert split.neighbour_tables.keys() == tables.keys()
    assert all(split.neighbour_tables[key] is table for key, table in tables.items())
