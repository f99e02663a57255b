"""Evaluation protocol on Spark: agreement with Spark's RankingMetrics, splits, popularity baseline."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from batch_training.evaluation import (
    evaluate_with_baseline,
    evaluation_users,
    format_metrics_table,
    holdout_split,
    item_popularity,
    kfold_splits,
    popularity_recommendations,
    relevant_sets,
)
from batch_training.metrics import ranking_metrics

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

EPOCH = datetime(2024, 1, 1)


def _pairs_frame(spark, rng: np.random.Generator, n_users: int = 150, n_items: int = 60, max_items: int = 12):
    """Users with 1..max_items distinct items each (about a sixth with exactly one)."""
    rows = []
    for user in range(n_users):
        n = 1 if user % 6 == 0 else int(rng.integers(2, max_items + 1))
        for item in rng.choice(n_items, n, replace=False):
            rows.append((user, int(item), float(rng.integers(1, 5)), EPOCH + timedelta(days=int(rng.integers(0, 300)))))
    frame = pd.DataFrame(rows, columns=["user", "item", "count", "last_time"])
    return spark.createDataFrame(frame, schema="user int, item int, count double, last_time timestamp"), frame


def _pair_set(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user"].astype(int), frame["item"].astype(int)))


def test_ranking_metrics_agree_with_spark_ranking_metrics(spark):
    from pyspark.mllib.evaluation import RankingMetrics

    rng = np.random.default_rng(3)
    n_users, n_items, width = 300, 40, 12
    recommended = np.array([rng.permutation(n_items)[:width] for _ in range(n_users)])
    lengths = rng.integers(3, width + 1, n_users)           # some lists shorter than k: padded
    recommended[np.arange(width)[None, :] >= lengths[:, None]] = -1
    relevant = [rng.choice(n_items, int(rng.integers(1, 16)), replace=False) for _ in range(n_users)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in relevant])])
    indices = np.concatenate(relevant)
    spark_input = spark.sparkContext.parallelize(
        [([int(i) for i in recs if i >= 0], [int(i) for i in rel]) for recs, rel in zip(recommended, relevant)], 2)
    reference = RankingMetrics(spark_input)
    for k in (5, 10):
        ours = ranking_metrics(recommended, indptr, indices, k=k)
        assert ours["users"] == n_users
        assert ours["precision"] == pytest.approx(reference.precisionAt(k), abs=1e-12)
        assert ours["map"] == pytest.approx(reference.meanAveragePrecisionAt(k), abs=1e-12)
        assert ours["ndcg"] == pytest.approx(reference.ndcgAt(k), abs=1e-12)
        assert ours["recall"] == pytest.approx(reference.recallAt(k), abs=1e-12)


def test_random_holdout_keeps_history_and_holds_out_the_fraction(spark):
    pairs, frame = _pairs_frame(spark, np.random.default_rng(11))
    train, test = (part.toPandas() for part in holdout_split(pairs, "random", test_fraction=0.2, seed=42))
    assert _pair_set(train).isdisjoint(_pair_set(test))
    assert _pair_set(train) | _pair_set(test) == _pair_set(frame)
    assert not test["repurchase"].any()
    n_per_user = frame.groupby("user").size()
    n_test = test.groupby("user").size().reindex(n_per_user.index, fill_value=0)
    n_train = train.groupby("user").size().reindex(n_per_user.index, fill_value=0)
    several = n_per_user >= 2
    assert (n_test[several] >= 1).all() and (n_train[several] >= 1).all()
    assert (n_test[~several] == 0).all()
    # round half up of 0.2 * n, clamped to [1, n - 1]
    expected = np.clip(np.floor(0.2 * n_per_user[several] + 0.5), 1, n_per_user[several] - 1)
    assert (n_test[several] == expected).all()
    share = len(test) / len(frame)
    assert 0.15 < share < 0.25, share
    merged = test.merge(frame, on=["user", "item"], suffixes=("", "_in"))
    assert (merged["count"] == merged["count_in"]).all()


def test_random_holdout_is_reproducible_by_seed(spark):
    pairs, _ = _pairs_frame(spark, np.random.default_rng(5))
    first = _pair_set(holdout_split(pairs, "random", seed=1)[1].toPandas())
    again = _pair_set(holdout_split(pairs.repartition(3), "random", seed=1)[1].toPandas())
    other = _pair_set(holdout_split(pairs, "random", seed=2)[1].toPandas())
    assert first == again
    assert first != other


def _events_frame(spark, rng: np.random.Generator, n_users: int = 120, n_items: int = 25):
    """Events with repeated products (repurchases), ties in time, returns and missing times."""
    rows = []
    for user in range(n_users):
        n_events = 1 if user % 10 == 0 else int(rng.integers(2, 16))
        same_day = user % 10 == 1                    # every purchase at one instant: no split possible
        for _ in range(n_events):
            time = EPOCH if same_day else EPOCH + timedelta(hours=int(rng.integers(0, 2000)))
            rows.append((user, int(rng.integers(0, n_items)), float(rng.integers(1, 4)), time))
    rows.append((2, 3, -1.0, EPOCH + timedelta(days=400)))    # a return: not a purchase
    rows.append((3, 4, 2.0, None))                             # no time: stays in train
    frame = pd.DataFrame(rows, columns=["user", "item", "quantity", "event_time"])
    schema = "user int, item int, quantity double, event_time timestamp"
    return spark.createDataFrame(frame, schema=schema), frame


def test_time_holdout_holds_out_each_customers_latest_purchases(spark):
    events, frame = _events_frame(spark, np.random.default_rng(9))
    train, test = (part.toPandas() for part in holdout_split(events, "time", test_fraction=0.2,
                                                             count_mode="quantity"))
    # Counting purchase rows (the data module's default) must split the same events.
    rows_test = holdout_split(events, "time", test_fraction=0.2)[1].toPandas()
    purchases = frame[frame["quantity"] > 0]
    last_train_time = train.groupby("user")["last_time"].max()
    for user, own in purchases.groupby("user"):
        timed = own.dropna(subset=["event_time"])
        later = timed["event_time"] > last_train_time[user]
        # The split is a time cut: everything after the customer's latest train event is test...
        expected_test = timed[later].groupby("item")["quantity"].sum()
        got_test = test[test["user"] == user].set_index("item")["count"]
        assert got_test.sort_index().to_dict() == expected_test.sort_index().to_dict(), user
        rows_counts = rows_test[rows_test["user"] == user].set_index("item")["count"]
        assert rows_counts.sort_index().to_dict() == timed[later].groupby("item").size().sort_index().to_dict()
        # ...and the rest is train, so each test event is later than each train event.
        expected_train = pd.concat([timed[~later], own[own["event_time"].isna()]]).groupby("item")["quantity"].sum()
        got_train = train[train["user"] == user].set_index("item")["count"]
        assert got_train.sort_index().to_dict() == expected_train.sort_index().to_dict(), user
        if timed["event_time"].nunique() >= 2:
            assert len(got_test) >= 1, f"customer {user} with history has nothing held out"
    assert set(test["user"]).isdisjoint({u for u in range(120) if u % 10 in (0, 1)})
    merged = test.merge(train[["user", "item"]], on=["user", "item"], how="left", indicator=True)
    assert (merged["repurchase"] == (merged["_merge"] == "both")).all()
    assert merged["repurchase"].any() and not merged["repurchase"].all()
    share = test["count"].sum() / purchases["quantity"].sum()
    assert 0.1 < share < 0.35, share


def test_random_holdout_of_events_splits_purchase_pairs(spark):
    events, frame = _events_frame(spark, np.random.default_rng(4))
    train, test = (part.toPandas() for part in holdout_split(events, "random", count_mode="rows"))
    purchases = frame[frame["quantity"] > 0]
    rows_per_pair = purchases.groupby(["user", "item"]).size()   # the return row counts nowhere
    both = pd.concat([train, test]).set_index(["user", "item"])["count"]
    assert both.sort_index().to_dict() == rows_per_pair.sort_index().to_dict()


def test_kfold_puts_every_pair_in_exactly_one_test_fold(spark):
    pairs, frame = _pairs_frame(spark, np.random.default_rng(21), n_users=80)
    folds = [(train.toPandas(), test.toPandas()) for train, test in kfold_splits(pairs, k=4, seed=7)]
    assert len(folds) == 4
    seen: dict[tuple[int, int], int] = {}
    for train, test in folds:
        assert _pair_set(train).isdisjoint(_pair_set(test))
        assert _pair_set(train) | _pair_set(test) == _pair_set(frame)
        assert set(test["user"]) <= set(train["user"]), "a test customer lost all their training history"
        for pair in _pair_set(test):
            seen[pair] = seen.get(pair, 0) + 1
    single = set(frame.groupby("user").filter(lambda g: len(g) == 1)["user"])
    assert not any(user in single for user, _ in seen)
    several = {pair for pair in _pair_set(frame) if pair[0] not in single}
    assert set(seen) == several and set(seen.values()) == {1}
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 0.25 * np.mean(sizes), sizes


def _tiny_train(spark):
    # buyers: item 1 -> 3 customers, item 2 -> 2, item 0 -> 1, item 3 -> 1, item 4 -> 0
    # popularity order (ties by index): [1, 2, 0, 3, 4]
    rows = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 1), (3, 3), (3, 2)]
    return spark.createDataFrame([(u, i, 1.0) for u, i in rows], schema="user int, item int, count double")


def test_popularity_recommendations_exclude_purchased_items_when_asked(spark):
    train = _tiny_train(spark)
    popularity = item_popularity(train, n_items=5)
    assert popularity.buyers.tolist() == [1, 3, 2, 1, 0] and popularity.n_customers == 4
    users = np.array([2, 0, 9, 1])                 # 9 has no training history
    kept = popularity_recommendations(train, users, n_items=5, k=3, exclude_purchased=False)
    assert kept.tolist() == [[1, 2, 0]] * 4
    excluded = popularity_recommendations(train, users, n_items=5, k=3, exclude_purchased=True)
    # user 2 bought {1}: [2, 0, 3]; user 0 bought {0, 1}: [2, 3, 4]; user 9: [1, 2, 0]; user 1 bought {1, 2}
    assert excluded.tolist() == [[2, 0, 3], [2, 3, 4], [1, 2, 0], [0, 3, 4]]


def test_relevant_sets_follow_the_users_order_and_drop_repurchases_when_asked(spark):
    test = spark.createDataFrame([(0, 4, 1.0, False), (0, 2, 1.0, True), (5, 1, 2.0, False), (7, 3, 1.0, False)],
                                 schema="user int, item int, count double, repurchase boolean")
    users = np.array([5, 0, 3])                    # 3 has no test pairs; 7 is not asked for
    everything = relevant_sets(test, users, exclude_purchased=False)
    assert everything.indptr.tolist() == [0, 1, 3, 3]
    assert everything.indices.tolist() == [1, 2, 4]
    new_only = relevant_sets(test, users, exclude_purchased=True)
    assert new_only.indptr.tolist() == [0, 1, 2, 2]
    assert new_only.indices.tolist() == [1, 4]
    assert evaluation_users(test, exclude_purchased=True).tolist() == [0, 5, 7]


def test_model_and_popularity_are_evaluated_on_the_same_split(spark):
    pairs, _ = _pairs_frame(spark, np.random.default_rng(13), n_items=30)
    train, test = holdout_split(pairs, "random", test_fraction=0.3, seed=3)
    users = evaluation_users(test, exclude_purchased=True)
    relevant = relevant_sets(test, users, exclude_purchased=True)
    # An oracle that lists each user's held-out items first: recall@5 = mean(min(|rel|, 5) / |rel|)
    oracle = np.full((users.size, 5), -1)
    for row in range(users.size):
        items = relevant.indices[relevant.indptr[row]:relevant.indptr[row + 1]][:5]
        oracle[row, :items.size] = items
    sizes = np.diff(relevant.indptr)
    results = evaluate_with_baseline(oracle, train, test, users, n_items=30, k=5, exclude_purchased=True,
                                     model_name="oracle")
    assert list(results) == ["oracle", "popularity"]
    assert results["oracle"]["recall"] == pytest.approx(np.mean(np.minimum(sizes, 5) / sizes))
    assert results["oracle"]["users"] == results["popularity"]["users"] == users.size
    assert results["popularity"]["recall"] < results["oracle"]["recall"]
    table = format_metrics_table(results)
    log.info("oracle vs popularity:\n%s", table)
    assert table.splitlines()[2].startswith("popularity")


def test_popularity_beats_random_lists_on_groceries_time_split(spark, shared_datasets):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    raw = spark.read.csv(str(shared_datasets / "groceries" / "Groceries_dataset.csv"), header=True)
    events = (raw.select(F.col("Member_number").alias("customer_id"), F.col("itemDescription").alias("product_id"),
                         F.to_timestamp("Date", "dd-MM-yyyy").alias("event_time"), F.lit(1.0).alias("quantity"))
              .withColumn("user", F.dense_rank().over(Window.orderBy("customer_id")) - 1)
              .withColumn("item", F.dense_rank().over(Window.orderBy("product_id")) - 1))
    n_items = events.select("item").distinct().count()
    train, test = holdout_split(events, "time", test_fraction=0.2)
    train, test = train.cache(), test.cache()
    users = evaluation_users(test, exclude_purchased=True)
    relevant = relevant_sets(test, users, exclude_purchased=True)
    rng = np.random.default_rng(0)
    random_lists = np.array([rng.permutation(n_items)[:10] for _ in range(users.size)])
    results = evaluate_with_baseline(random_lists, train, test, users, n_items, k=10, exclude_purchased=True,
                                     model_name="random")
    log.info("Groceries time split, %d users, %d items:\n%s", users.size, n_items, format_metrics_table(results))
    assert results["random"]["users"] == np.count_nonzero(np.diff(relevant.indptr)) > 1000
    assert results["popularity"]["recall"] > 1.5 * results["random"]["recall"]
    assert results["popularity"]["novelty"] < results["random"]["novelty"]
    assert results["popularity"]["coverage"] < results["random"]["coverage"]
    train.unpersist()
    test.unpersist()
