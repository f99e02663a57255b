"""Item-kNN's sparse neighbour table (models/neighbours.py) against dense reference computations."""
from __future__ import annotations

import numpy as np
import pytest

from models.neighbours import KnnParams, item_neighbours, knn_pair_scores, knn_top_k
from models.scoring import popularity_top_k


def _purchases(seed: int, n_users: int = 60, n_items: int = 40, max_len: int = 9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n_items, n, replace=False)) for n in lengths]).astype(np.int32)
    counts = rng.integers(1, 6, indptr[-1]).astype(np.float32)
    return indptr, indices, counts


def _dense(indptr, indices, values, n_items):
    matrix = np.zeros((len(indptr) - 1, n_items))
    matrix[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), indices] = values
    return matrix


def _reference(indptr, indices, counts, n_items, params: KnnParams) -> np.ndarray:
    """The full similarity, dense and written out from the formulas in the module docstring."""
    if params.weighting == "cosine":
        bought = _dense(indptr, indices, 1.0, n_items)
        co = bought.T @ bought
        buyers = bought.sum(axis=0)
        similarity = co / np.sqrt(np.maximum(np.outer(buyers, buyers), 1e-300))
    else:
        x = _dense(indptr, indices, counts, n_items)
        idf = np.log(n_items / (1.0 + (x > 0).sum(axis=1)))
        length = x.sum(axis=0)
        norm = (1 - params.b) + params.b * length / length[length > 0].mean()
        w = np.where(x > 0, x * (params.k1 + 1) / (params.k1 * norm[None, :] + x) * idf[:, None], 0.0)
        similarity = w.T @ w
    np.fill_diagonal(similarity, 0.0)
    return np.where(similarity > 0, similarity, 0.0)


@pytest.mark.parametrize("params", [KnnParams(), KnnParams(weighting="bm25", k1=1.2, b=0.75),
                                    KnnParams(weighting="bm25", k1=100.0, b=0.8)])
def test_the_full_table_is_the_dense_similarity(params):
    indptr, indices, counts = _purchases(1)
    table = item_neighbours(indptr, indices, counts, 40, params)
    np.testing.assert_allclose(table.toarray(), _reference(indptr, indices, counts, 40, params), rtol=1e-5, atol=1e-7)
    assert table.dtype == np.float32 and not table.diagonal().any()


@pytest.mark.parametrize("weighting", ["cosine", "bm25"])
def test_each_product_keeps_its_best_neighbours_ties_to_the_lower_index(weighting):
    indptr, indices, counts = _purchases(2)
    full = _reference(indptr, indices, counts, 40, KnnParams(weighting=weighting)).astype(np.float32)
    table = item_neighbours(indptr, indices, counts, 40, KnnParams(neighbours=3, weighting=weighting)).toarray()
    for item in range(40):
        positive = np.flatnonzero(full[item] > 0)
        best = positive[np.lexsort((positive, -full[item, positive]))][:3]
        assert sorted(np.flatnonzero(table[item])) == sorted(best), item


def _reference_lists(table: np.ndarray, indptr, indices, counts, k, weighting, exclude, popularity):
    x = _dense(indptr, indices, counts if weighting == "bm25" else 1.0, table.shape[0])
    scores = x @ table.astype(np.float64)
    lists = []
    for user in range(len(indptr) - 1):
        bought = set(indices[indptr[user]:indptr[user + 1]]) if exclude else set()
        ranked = [int(i) for i in np.lexsort((np.arange(table.shape[0]), -scores[user]))
                  if scores[user, i] > 0 and i not in bought][:k]
        fill = [int(i) for i in np.lexsort((np.arange(len(popularity)), -popularity))
                if i not in bought and i not in ranked]
        lists.append(ranked + fill[:k - len(ranked)])
    return lists


@pytest.mark.parametrize("weighting", ["cosine", "bm25"])
@pytest.mark.parametrize("exclude", [True, False])
def test_top_k_ranks_by_summed_similarity_and_completes_short_lists_with_best_sellers(weighting, exclude):
    indptr, indices, counts = _purchases(3)
    popularity = np.random.default_rng(0).integers(0, 20, 40).astype(np.float64)
    table = item_neighbours(indptr, indices, counts, 40, KnnParams(neighbours=4, weighting=weighting))
    excluded = (indptr, indices) if exclude else None
    items, scores = knn_top_k(table, indptr, indices, counts, 10, weighting, excluded,
                              lambda k, ex: popularity_top_k(popularity, k, exclude=ex))
    expected = _reference_lists(table.toarray(), indptr, indices, counts, 10, weighting, exclude, popularity)
    assert [list(row[row >= 0]) for row in items] == expected
    short = [u for u in range(len(indptr) - 1) if (scores[u] == 0).any()]
    assert short, "some list must need best sellers for the test to cover the completion"
    pair = knn_pair_scores(table, indptr, indices, counts, weighting, np.repeat(np.arange(len(indptr) - 1), 10),
                           np.where(items >= 0, items, 0).ravel())
    np.testing.assert_allclose(pair.reshape(items.shape)[items >= 0], scores[items >= 0], rtol=1e-5)


def test_a_catalogue_of_90_thousand_products_is_built_sparse():
    """The dense matrix would need 30 GiB here; the table holds at most neighbours per product."""
    rng = np.random.default_rng(4)
    n_items, n_users = 90_000, 3_000
    lengths = rng.integers(1, 60, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n_items, n, replace=False)) for n in lengths]).astype(np.int32)
    table = item_neighbours(indptr, indices, np.ones(indptr[-1], np.float32), n_items, KnnParams(neighbours=20))
    assert table.shape == (n_items, n_items) and 0 < table.nnz <= 20 * n_items
    assert np.diff(table.indptr).max() == 20


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="weighting 'tfidf'"):
        KnnParams(weighting="tfidf")
    with pytest.raises(ValueError, match="neighbours 0"):
        KnnParams(neighbours=0)
    assert KnnParams.from_params(KnnParams(neighbours=5, weighting="bm25", k1=2.0, b=0.5).as_params()) == \
        KnnParams(neighbours=5, weighting="bm25", k1=2.0, b=0.5)
    assert KnnParams.from_params({}) == KnnParams()       # versions before the table: every neighbour


def test_a_large_customer_base_is_sampled_every_stride_th_customer():
    indptr, indices, counts = _purchases(6, n_users=90)
    params = KnnParams(neighbours=4, max_customers=30)
    assert params.stride(90) == 3 and params.stride(91) == 4 and KnnParams().stride(10 ** 9) == 1
    every_third = np.arange(0, 90, 3)
    lengths = np.diff(indptr)[every_third]
    sub_indptr = np.concatenate([[0], np.cumsum(lengths)])
    take = np.concatenate([np.arange(indptr[u], indptr[u + 1]) for u in every_third])
    expected = item_neighbours(sub_indptr, indices[take], counts[take], 40, KnnParams(neighbours=4))
    assert (item_neighbours(indptr, indices, counts, 40, params) != expected).nnz == 0
