"""The scorer family of models/scorers.py: blend limits, popularity type, item-kNN against a reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.artifact import ModelArtifact, new_version
from models.neighbours import KnnParams
from models.scorers import (
    best_scores,
    buy_again,
    item_neighbours_of,
    recommend_from_counts,
    segment_popularity,
    user_vectors,
)
from models.scoring import fold_in, popularity_top_k, top_k


def _csr(rng, n_users: int, n_items: int, max_len: int):
    lengths = rng.integers(0, max_len + 1, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n_items, size=n, replace=False)) for n in lengths]).astype(np.int32)
    counts = rng.integers(1, 5, indptr[-1]).astype(np.float32)
    return indptr, indices, counts


def _artifact(model_type: str, weight: float | None = None, n_users=40, n_items=70, rank=6, seed=3):
    rng = np.random.default_rng(seed)
    indptr, indices, counts = _csr(rng, n_users, n_items, 8)
    params = {"rank": rank, "reg_param": 0.1, "alpha": 2.0, "implicit_prefs": True, "scaling": "none"}
    if weight is not None:
        params["blend_weight"] = weight
    return ModelArtifact(
        version=new_version(), model_type=model_type, item_ids=np.array([f"P{i}" for i in range(n_items)]),
        item_factors=rng.normal(size=(n_items, rank)).astype(np.float32),
        user_ids=np.array([f"C{u}" for u in range(n_users)]),
        user_factors=rng.normal(size=(n_users, rank)).astype(np.float32),
        popularity=rng.integers(0, 30, n_items).astype(np.float64),
        user_items_indptr=indptr, user_items_indices=indices, user_items_counts=counts, params=params).validate()


@pytest.mark.parametrize("exclude", [True, False])
def test_blend_weight_zero_is_popularity_and_one_is_als(exclude):
    als = _artifact("als")
    indptr, indices, counts = als.user_items
    als_items, _, strategies = recommend_from_counts(als, indptr, indices, counts, 10, exclude)
    at_one, _, _ = recommend_from_counts(_artifact("blend", 1.0), indptr, indices, counts, 10, exclude)
    np.testing.assert_array_equal(at_one, als_items)

    at_zero, _, _ = recommend_from_counts(_artifact("blend", 0.0), indptr, indices, counts, 10, exclude)
    popular, _ = popularity_top_k(als.popularity, 10, exclude=(indptr, indices) if exclude else None)
    np.testing.assert_array_equal(at_zero, np.broadcast_to(popular, at_zero.shape))

    halfway, _, _ = recommend_from_counts(_artifact("blend", 0.5), indptr, indices, counts, 10, exclude)
    assert not np.array_equal(halfway, als_items) and not np.array_equal(halfway, at_zero)
    # ALS itself: the fold-in of the counts, ranked by top_k (the same code the stream runs).
    personal = np.diff(indptr) > 0
    vectors = fold_in(als.item_factors, indptr, indices, counts, 0.1, 2.0)
    expected, _ = top_k(vectors[personal], als.item_factors, 10,
                        exclude=_sub(indptr, indices, np.flatnonzero(personal)) if exclude else None)
    np.testing.assert_array_equal(als_items[personal], expected)
    assert strategies == ["personalized" if p else "popularity" for p in personal]


def _sub(indptr, indices, rows):
    lengths = indptr[rows + 1] - indptr[rows]
    return (np.concatenate([[0], np.cumsum(lengths)]),
            np.concatenate([indices[indptr[r]:indptr[r + 1]] for r in rows]))


def test_the_popularity_type_gives_everyone_the_best_sellers_minus_their_purchases():
    model = _artifact("popularity")
    indptr, indices, counts = model.user_items
    items, scores, strategies = recommend_from_counts(model, indptr, indices, counts, 5, True)
    order = np.lexsort((np.arange(model.n_items), -model.popularity))
    for user in range(model.n_users):
        bought = set(indices[indptr[user]:indptr[user + 1]])
        assert list(items[user]) == [i for i in order if i not in bought][:5]
    assert set(strategies) == {"popularity"}
    np.testing.assert_array_equal(scores, model.popularity[items])


def test_item_knn_ranks_by_summed_similarity_to_the_customers_items():
    model = _artifact("item_knn")
    indptr, indices, counts = model.user_items
    items, scores, _ = recommend_from_counts(model, indptr, indices, counts, 5, True)
    similarity = item_neighbours_of(model).toarray()       # no stored table: every neighbour, built once
    for user in np.flatnonzero(np.diff(indptr) > 0)[:10]:
        bought = indices[indptr[user]:indptr[user + 1]]
        expected = similarity[bought].sum(axis=0)
        expected[bought] = -np.inf
        listed = scores[user][scores[user] > 0]
        np.testing.assert_allclose(listed, np.sort(expected)[::-1][:len(listed)], rtol=1e-5)
        assert not set(items[user]) & set(bought)


def test_item_knn_scores_with_the_stored_table_when_the_version_has_one():
    model = _artifact("item_knn")
    indptr, indices, counts = model.user_items
    model.params.update(KnnParams(neighbours=2).as_params())
    built = item_neighbours_of(model)
    stored = _artifact("item_knn")
    stored.params.update(KnnParams(neighbours=2).as_params())
    stored.item_neighbours = built.copy()
    stored.item_neighbours.data[:] = 1.0                    # a different table: the stored one must be used
    assert not np.array_equal(recommend_from_counts(stored, indptr, indices, counts, 5, True)[1],
                              recommend_from_counts(model, indptr, indices, counts, 5, True)[1])


@pytest.mark.parametrize("model_type", ["als", "blend", "popularity", "item_knn"])
def test_buy_again_holds_only_past_purchases_and_never_overlaps_discover(model_type):
    model = _artifact(model_type, 0.5 if model_type == "blend" else None)
    indptr, indices, counts = model.user_items
    again, again_scores = buy_again(model, indptr, indices, counts, 5)
    new, _, _ = recommend_from_counts(model, indptr, indices, counts, 5, exclude_purchased=True)   # the discover list
    for user in range(model.n_users):
        bought = set(indices[indptr[user]:indptr[user + 1]])
        listed = [i for i in again[user] if i >= 0]
        assert set(listed) <= bought and len(listed) == min(5, len(bought))
        assert not set(listed) & set(new[user])
        valid = again_scores[user][:len(listed)]
        assert np.all(np.diff(valid) <= 1e-6)  # best first


@pytest.mark.parametrize("model_type", ["als", "blend"])
def test_lists_from_shared_user_vectors_equal_lists_folded_in_per_call(model_type):
    """The stream and the evaluation fold every customer in once and pass the vectors to both
    lists; the lists must be exactly those each call computes on its own."""
    model = _artifact(model_type, 0.5 if model_type == "blend" else None)
    indptr, indices, counts = model.user_items
    vectors = user_vectors(model, indptr, indices, counts)
    for exclude in (True, False):
        alone = recommend_from_counts(model, indptr, indices, counts, 10, exclude)
        shared = recommend_from_counts(model, indptr, indices, counts, 10, exclude, vectors=vectors)
        # the evaluation also passes every blend weight the customers' best ALS scores, computed once
        scaled = recommend_from_counts(model, indptr, indices, counts, 10, exclude, vectors=vectors,
                                       vector_max=best_scores(vectors, model.item_factors))
        for result in (shared, scaled):
            np.testing.assert_array_equal(result[0], alone[0])
            np.testing.assert_allclose(result[1], alone[1], rtol=1e-5)
            assert result[2] == alone[2]
    again_alone = buy_again(model, indptr, indices, counts, 5)
    again_shared = buy_again(model, indptr, indices, counts, 5, vectors=vectors)
    np.testing.assert_array_equal(again_shared[0], again_alone[0])
    np.testing.assert_allclose(again_shared[1], again_alone[1], rtol=1e-5)


def test_buy_again_ranks_by_relevance_plus_purchase_frequency():
    model = _artifact("popularity")
    popularity = np.zeros(model.n_items)
    popularity[[1, 2, 3]] = [10.0, 5.0, 1.0]
    model.popularity = popularity
    indptr, indices, counts = np.array([0, 3]), np.array([1, 2, 3]), np.array([1.0, 1.0, 4.0])
    items, scores = buy_again(model, indptr, indices, counts, 3)
    # 1: 10/10 + 1/4 = 1.25, 2: 0.5 + 0.25 = 0.75, 3: 0.1 + 1 = 1.1
    assert list(items[0]) == [1, 3, 2]
    np.testing.assert_allclose(scores[0], [1.25, 1.1, 0.75], rtol=1e-6)


def test_a_new_customer_in_a_known_segment_gets_that_segments_list():
    model = _artifact("als", n_users=6, n_items=8)
    indptr = np.array([0, 2, 4, 6, 7, 8, 9])
    indices = np.array([0, 1, 0, 1, 5, 6, 5, 6, 7])
    model.params["segment_popularity"] = segment_popularity(["UK", "UK", "FR", "FR", "FR", None], indptr,
                                                            indices, model.n_items)
    assert model.params["segment_popularity"]["FR"]["items"][:2] == [5, 6]
    model.params = json.loads(json.dumps(model.params))  # as stored in metadata.json
    empty = np.zeros(5, dtype=np.int64)  # four customers, none with a purchase
    items, scores, strategies = recommend_from_counts(model, empty, np.zeros(0), np.zeros(0), 3, True,
                                                      segments=["FR", "UK", "DE", None])
    assert list(items[0][:2]) == [5, 6] and scores[0][0] == 2.0
    assert list(items[1][:2]) == [0, 1]
    general, _ = popularity_top_k(model.popularity, 3)
    np.testing.assert_array_equal(items[2:], np.vstack([general, general]))
    assert strategies == ["segment_popularity", "segment_popularity", "popularity", "popularity"]
    # A known customer with purchases stays personalised whatever the segment.
    _, _, mixed = recommend_from_counts(model, np.array([0, 1]), np.array([2]), np.array([1.0]), 3, True,
                                        segments=["FR"])
    assert mixed == ["personalized"]
