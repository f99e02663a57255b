"""Spark ALS as the reference: fold-in reproduces its user factors, our top-k its recommendations."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from batch_training.recommend import collect_factors, recommend_for_all, to_recommendations_df, top_k_on_driver
from models.scaling import transform_counts
from models.scoring import fold_in, top_k

pytestmark = pytest.mark.integration

N_USERS, N_ITEMS, RANK, K = 200, 300, 8, 10
REG, ALPHA = 0.1, 2.0


def _item_id(index):
    """Sparse, non-contiguous item ids: positions and ids must not be confused."""
    return 5 * np.asarray(index) + 3


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    rng = np.random.default_rng(42)
    popular = rng.zipf(1.6, 4000) % N_ITEMS
    users = np.concatenate([np.arange(N_USERS), rng.integers(0, N_USERS, 4000), rng.integers(0, N_USERS, N_ITEMS)])
    items = np.concatenate([rng.integers(0, N_ITEMS, N_USERS), popular, np.arange(N_ITEMS)])
    pairs = pd.DataFrame({"user": users, "item": _item_id(items)})
    counts = pairs.value_counts().reset_index(name="count")      # every user and item at least once
    counts["rating"] = transform_counts(counts["count"].to_numpy(), "log")
    return counts


def _fit(spark, ratings: pd.DataFrame, implicit: bool):
    from pyspark.ml.recommendation import ALS

    frame = spark.createDataFrame(ratings[["user", "item", "rating"]].astype({"rating": "float32"}))
    als = ALS(rank=RANK, maxIter=6, regParam=REG, alpha=ALPHA, implicitPrefs=implicit, seed=7,
              numUserBlocks=2, numItemBlocks=3, userCol="user", itemCol="item", ratingCol="rating")
    return als.fit(frame), frame


@pytest.fixture(scope="module")
def implicit_model(spark, ratings):
    return _fit(spark, ratings, implicit=True)


@pytest.mark.parametrize("implicit", [True, False])
def test_fold_in_reproduces_sparks_user_factors(spark, ratings, implicit_model, implicit):
    model = implicit_model[0] if implicit else _fit(spark, ratings, implicit=False)[0]
    user_ids, user_factors = collect_factors(model.userFactors)
    item_ids, item_factors = collect_factors(model.itemFactors)
    assert len(user_ids) == N_USERS and len(item_ids) == N_ITEMS
    rows = pd.Index(user_ids).get_indexer(ratings["user"])
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(user_ids)))])
    indices = pd.Index(item_ids).get_indexer(ratings["item"])[order]
    folded = fold_in(item_factors, indptr, indices, ratings["rating"].to_numpy()[order],
                     reg_param=REG, alpha=ALPHA, implicit=implicit)
    np.testing.assert_allclose(folded, user_factors, rtol=1e-5, atol=1e-6)   # bit-exact here
    # The test can tell a wrong regularisation apart from float noise.
    assert not np.allclose(fold_in(item_factors, indptr, indices, ratings["rating"].to_numpy()[order],
                                   reg_param=REG * 1.05, alpha=ALPHA, implicit=implicit),
                           user_factors, rtol=1e-5, atol=1e-6)


def _as_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frame = frame.sort_values("user")
    items = np.array([[r["item"] for r in recs] for recs in frame["recommendations"]])
    scores = np.array([[r["rating"] for r in recs] for recs in frame["recommendations"]], dtype=np.float32)
    return frame["user"].to_numpy(), items, scores


def assert_same_recommendations(expected_items, expected_scores, items, scores, tol=1e-6):
    """Same items in the same order, except among scores equal to float tolerance.

    Spark orders equal ratings by higher item id (and computes scores with another summation
    order), ours by lower index: a different item at a place is fine only inside such a tie, and
    only the tie at the k-th place may bring in a different item.
    """
    np.testing.assert_allclose(scores, expected_scores, rtol=tol, atol=tol)
    near = lambda a, b: np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b))   # noqa: E731
    tied = np.zeros_like(expected_scores, dtype=bool)
    tied[:, 1:] |= near(expected_scores[:, 1:], expected_scores[:, :-1])
    tied[:, :-1] |= near(expected_scores[:, :-1], expected_scores[:, 1:])
    at_boundary = near(expected_scores, expected_scores[:, -1:])   # may tie with items past the k-th
    assert np.all((tied | at_boundary)[items != expected_items]), "a place differs where no tie explains it"
    for row in range(len(items)):
        assert set(items[row][~at_boundary[row]]) == set(expected_items[row][~at_boundary[row]])


def test_recommend_for_all_equals_spark(spark, implicit_model):
    model, _ = implicit_model
    item_ids, item_factors = collect_factors(model.itemFactors)
    expected = model.recommendForAllUsers(K)
    ours = recommend_for_all(spark, model.userFactors, item_factors, K, item_ids=item_ids)
    assert ours.schema.simpleString() == expected.schema.simpleString()
    users, expected_items, expected_scores = _as_arrays(expected.toPandas())
    our_users, our_items, our_scores = _as_arrays(ours.toPandas())
    np.testing.assert_array_equal(our_users, users)
    assert expected_items.shape == (N_USERS, K)
    assert_same_recommendations(expected_items, expected_scores, our_items, our_scores)

    driver_users, driver_items, driver_scores = top_k_on_driver(model.userFactors, item_factors, K,
                                                                item_ids=item_ids)
    np.testing.assert_array_equal(driver_users, users)
    np.testing.assert_array_equal(driver_items, our_items)
    # The same lists; the float32 scores may differ in the last bit: the driver's BLAS runs its
    # own threads, the Spark tasks' one thread each, and they sum the dot products in other orders.
    np.testing.assert_allclose(driver_scores, our_scores, rtol=1e-6, atol=1e-7)
    # The driver result turned into Spark's output shape reads back the same.
    round_trip = to_recommendations_df(spark, driver_users, driver_items, driver_scores)
    assert round_trip.schema.simpleString() == expected.schema.simpleString()
    _, back_items, back_scores = _as_arrays(round_trip.toPandas())
    np.testing.assert_array_equal(back_items, driver_items)


def test_recommend_for_all_never_returns_excluded_items(spark, implicit_model, ratings):
    model, frame = implicit_model
    item_ids, item_factors = collect_factors(model.itemFactors)
    user_ids, user_factors = collect_factors(model.userFactors)
    bought = frame.select("user", "item")
    ours = recommend_for_all(spark, model.userFactors, item_factors, K, exclude_df=bought, item_ids=item_ids,
                             block_size=16)
    our_users, our_items, our_scores = _as_arrays(ours.toPandas())
    np.testing.assert_array_equal(our_users, user_ids)
    purchased = set(zip(ratings["user"], ratings["item"]))
    assert not any((u, i) in purchased for u, row in zip(our_users, our_items) for i in row)

    rows = pd.Index(user_ids).get_indexer(ratings["user"])
    order = np.argsort(rows, kind="stable")
    exclude = (np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(user_ids)))]),
               pd.Index(item_ids).get_indexer(ratings["item"])[order])
    expected_idx, expected_scores = top_k(user_factors, item_factors, K, exclude=exclude)
    np.testing.assert_array_equal(our_items, item_ids[expected_idx])
    np.testing.assert_allclose(our_scores, expected_scores, rtol=1e-6, atol=1e-7)   # last bit, as above
    _, driver_items, _ = top_k_on_driver(model.userFactors, item_factors, K, exclude_df=bought, item_ids=item_ids)
    np.testing.assert_array_equal(driver_items, our_items)
