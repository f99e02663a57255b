"""The shared scoring math against direct, slow reference computations."""
from __future__ import annotations

from datetime import UTC

import numpy as np
import pytest

from models.artifact import ModelArtifact, ModelValidationError, new_version
from models.scoring import fitted_items, fold_in, gramian, popularity_order, popularity_top_k, top_k


def _random_csr(rng, n_users: int, n_items: int, max_len: int, empty_every: int = 7):
    lengths = rng.integers(1, max_len + 1, n_users)
    lengths[::empty_every] = 0
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([rng.choice(n_items, size=n, replace=False) for n in lengths]).astype(np.int32)
    values = rng.integers(1, 6, indptr[-1]).astype(np.float32)
    return indptr, indices, values


def _reference_fold_in(item_factors, indptr, indices, values, reg, alpha, implicit):
    """Spark's computeFactors written out per user with a plain solve."""
    y = item_factors.astype(np.float64)
    rank = y.shape[1]
    out = np.zeros((len(indptr) - 1, rank))
    for user in range(len(indptr) - 1):
        items, ratings = indices[indptr[user]:indptr[user + 1]], values[indptr[user]:indptr[user + 1]].astype(float)
        if implicit:
            confidence = alpha * np.abs(ratings)
            positive = ratings > 0
            a = y.T @ y + (y[items].T * confidence) @ y[items]
            b = ((1 + confidence) * positive) @ y[items]
            n = positive.sum()
        else:
            a = y[items].T @ y[items]
            b = ratings @ y[items]
            n = len(items)
        if n:
            out[user] = np.linalg.solve(a + reg * n * np.eye(rank), b)
    return out


@pytest.mark.parametrize("implicit", [True, False])
def test_fold_in_solves_sparks_normal_equations(implicit):
    rng = np.random.default_rng(7)
    item_factors = rng.normal(0, 0.3, (150, 6)).astype(np.float32)
    indptr, indices, values = _random_csr(rng, 60, 150, 25)
    values[::5] *= -1          # Spark's extension: non-positive ratings add confidence, no preference
    expected = _reference_fold_in(item_factors, indptr, indices, values, 0.05, 3.0, implicit)
    actual = fold_in(item_factors, indptr, indices, values, reg_param=0.05, alpha=3.0, implicit=implicit)
    assert actual.dtype == np.float32 and actual.shape == (60, 6)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert np.all(actual[np.diff(indptr) == 0] == 0)


def test_fold_in_reuses_the_gramian_and_ignores_unknown_items():
    rng = np.random.default_rng(3)
    item_factors = rng.normal(0, 0.3, (80, 5)).astype(np.float32)
    indptr, indices, values = _random_csr(rng, 20, 80, 10)
    with_unknown = indices.copy()
    with_unknown[::3] = -1
    kept = with_unknown >= 0
    row_of = np.repeat(np.arange(20), np.diff(indptr))
    kept_indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[kept], minlength=20))])
    expected = _reference_fold_in(item_factors, kept_indptr, indices[kept], values[kept], 0.1, 1.0, True)
    actual = fold_in(item_factors, indptr, with_unknown, values, 0.1, 1.0, gram=gramian(item_factors))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implicit", [True, False])
def test_fold_in_ignores_products_the_fit_left_out(implicit):
    """Products without factors (new, or left out of the fit for too few buyers) were never in
    Spark's user step: they must not count in the regularisation it scales by a user's ratings."""
    rng = np.random.default_rng(11)
    item_factors = rng.normal(0, 0.3, (60, 4)).astype(np.float32)
    item_factors[::4] = 0.0                       # every fourth product left out of the fit
    indptr, indices, values = _random_csr(rng, 30, 60, 12)
    fitted = indices % 4 != 0
    row_of = np.repeat(np.arange(30), np.diff(indptr))
    fitted_indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[fitted], minlength=30))])
    expected = _reference_fold_in(item_factors, fitted_indptr, indices[fitted], values[fitted], 0.1, 2.0, implicit)
    actual = fold_in(item_factors, indptr, indices, values, 0.1, 2.0, implicit=implicit)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    kept = fold_in(item_factors, indptr, indices, values, 0.1, 2.0, implicit=implicit,
                   fitted=fitted_items(item_factors))     # the mask a model keeps, as the scorers pass it
    np.testing.assert_array_equal(kept, actual)
    only_left_out = np.flatnonzero(np.bincount(row_of[fitted], minlength=30) == 0)
    assert np.all(actual[only_left_out] == 0)


def test_fold_in_with_long_and_short_rows_in_one_call():
    rng = np.random.default_rng(11)
    item_factors = rng.normal(0, 0.3, (3000, 4)).astype(np.float32)
    lengths = np.array([1, 2900, 3, 0, 1500, 2])       # forces several padded chunks
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([rng.choice(3000, n, replace=False) for n in lengths])
    values = rng.integers(1, 4, indptr[-1]).astype(np.float32)
    expected = _reference_fold_in(item_factors, indptr, indices, values, 0.1, 2.0, True)
    np.testing.assert_allclose(fold_in(item_factors, indptr, indices, values, 0.1, 2.0), expected,
                               rtol=1e-4, atol=1e-6)


def test_fold_in_rejects_out_of_range_items():
    with pytest.raises(ValueError, match="out of range"):
        fold_in(np.ones((3, 2), np.float32), np.array([0, 1]), np.array([3]), np.array([1.0]), 0.1, 1.0)


def _brute_top_k(scores: np.ndarray, k: int, exclude=None):
    n_users, n_items = scores.shape
    items = np.full((n_users, k), -1)
    values = np.full((n_users, k), np.nan, dtype=np.float32)
    for user in range(n_users):
        banned = set(exclude[1][exclude[0][user]:exclude[0][user + 1]]) if exclude else set()
        ranked = sorted((-scores[user, i], i) for i in range(n_items) if i not in banned)[:k]
        items[user, :len(ranked)] = [i for _, i in ranked]
        values[user, :len(ranked)] = [-s for s, _ in ranked]
    return items, values


@pytest.mark.parametrize("n_items", [4, 11, 130, 1000])
@pytest.mark.parametrize("with_exclusions", [False, True])
def test_top_k_equals_a_full_sort(n_items, with_exclusions):
    rng = np.random.default_rng(n_items)
    # Small integer factors make many exact ties: the order must still be score, then index.
    item_factors = rng.integers(-3, 4, (n_items, 3)).astype(np.float32)
    users = rng.integers(-2, 3, (23, 3)).astype(np.float32)
    exclude = None
    if with_exclusions:
        indptr, indices, _ = _random_csr(rng, 23, n_items, min(n_items, 9))
        exclude = (indptr, indices)
    expected_items, expected_scores = _brute_top_k(users @ item_factors.T, 10, exclude)
    for block_size in (None, 4):
        items, scores = top_k(users, item_factors, 10, exclude=exclude, block_size=block_size)
        assert items.dtype == np.int32 and scores.dtype == np.float32
        np.testing.assert_array_equal(items, expected_items)
        np.testing.assert_allclose(scores, expected_scores, equal_nan=True)


def test_top_k_pads_when_exclusions_leave_fewer_than_k():
    item_factors = np.eye(3, dtype=np.float32)
    items, scores = top_k(np.array([[3, 2, 1], [1, 1, 1]], np.float32), item_factors, 4,
                          exclude=(np.array([0, 1, 5]), np.array([0, 0, 1, 2, -1])))
    np.testing.assert_array_equal(items, [[1, 2, -1, -1], [-1, -1, -1, -1]])
    assert np.isnan(scores[0, 2:]).all() and np.isnan(scores[1]).all()
    np.testing.assert_array_equal(scores[0, :2], [2, 1])


def test_top_k_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same rank"):
        top_k(np.ones((2, 3)), np.ones((5, 4)), 2)
    with pytest.raises(ValueError, match="one per user"):
        top_k(np.ones((2, 3)), np.ones((5, 3)), 2, exclude=(np.array([0, 1]), np.array([1])))
    with pytest.raises(ValueError, match="k must be"):
        top_k(np.ones((2, 3)), np.ones((5, 3)), 0)


def test_popularity_top_k_ranks_by_count_then_index_and_excludes():
    popularity = np.array([5, 9, 5, 0, 9, 1], dtype=np.float64)
    np.testing.assert_array_equal(popularity_order(popularity), [1, 4, 0, 2, 5, 3])
    items, scores = popularity_top_k(popularity, 3)
    np.testing.assert_array_equal(items, [[1, 4, 0]])
    np.testing.assert_array_equal(scores, [[9, 9, 5]])
    exclude = (np.array([0, 2, 2, 8]), np.array([1, 0, 0, 1, 2, 3, 4, 5]))
    items, scores = popularity_top_k(popularity, 3, exclude=exclude)
    np.testing.assert_array_equal(items, [[4, 2, 5], [1, 4, 0], [-1, -1, -1]])
    assert np.isnan(scores[2]).all()
    brute, _ = _brute_top_k(np.tile(popularity, (3, 1)), 3, exclude)
    np.testing.assert_array_equal(items, brute)


def _artifact(**changes) -> ModelArtifact:
    rng = np.random.default_rng(0)
    fields = dict(version=new_version(), model_type="als", item_ids=np.array(["A", "B", "C"]),
                  item_factors=rng.normal(size=(3, 2)).astype(np.float32), user_ids=np.array(["u1", "u2"]),
                  user_factors=rng.normal(size=(2, 2)).astype(np.float32), popularity=np.array([3.0, 1.0, 3.0]),
                  user_items_indptr=np.array([0, 2, 3]), user_items_indices=np.array([0, 2, 1]),
                  user_items_counts=np.array([1.0, 2.0, 1.0]), params={"rank": 2, "scaling": "none"})
    fields.update(changes)
    return ModelArtifact(**fields)


def test_artifact_helpers():
    artifact = _artifact().validate()
    np.testing.assert_array_equal(artifact.item_index(["C", "zzz", "A"]), [2, -1, 0])
    np.testing.assert_array_equal(artifact.user_index(["u2", "nobody"]), [1, -1])
    np.testing.assert_array_equal(artifact.popularity_order(), [0, 2, 1])
    indptr, indices, counts = artifact.user_items_of([1, -1, 0])
    np.testing.assert_array_equal(indptr, [0, 1, 1, 3])
    np.testing.assert_array_equal(indices, [1, 0, 2])
    np.testing.assert_array_equal(counts, [1.0, 1.0, 2.0])


@pytest.mark.parametrize("changes, message", [
    ({"item_factors": np.zeros((4, 2), np.float32)}, "item_factors has 4 rows"),
    ({"user_factors": np.zeros((2, 3), np.float32)}, "rank 3 differs"),
    ({"item_ids": np.array(["A", "B", "A"])}, "'A' appears more than once"),
    ({"popularity": np.array([1.0, 2.0])}, "popularity has shape"),
    ({"user_items_indptr": np.array([0, 2, 4])}, "indptr ends at 4"),
    ({"user_items_indptr": np.array([0, 3])}, "expected n_users"),
    ({"user_items_indices": np.array([0, 2, 3])}, r"must lie in \[0, 3\)"),
    ({"item_factors": np.full((3, 2), np.nan, np.float32)}, "NaN"),
    ({"version": "../escape"}, "version"),
    ({"params": {"rank": 2, "scaling": "sqrt"}}, "scaling"),
    ({"metrics": {"map": object()}}, "JSON"),
    ({"item_factors": np.zeros((3, 0), np.float32), "user_factors": np.zeros((2, 0), np.float32)},
     "needs item factors"),
])
def test_artifact_validate_rejects_inconsistent_parts(changes, message):
    with pytest.raises(ModelValidationError, match=message):
        _artifact(**changes).validate()


def test_popularity_artifact_needs_no_factors():
    artifact = _artifact(model_type="popularity", item_factors=np.zeros((0, 0)), user_factors=np.zeros(0),
                         params={})
    assert artifact.validate().rank == 0 and artifact.item_factors.shape == (3, 0)


def test_versions_sort_by_creation_time():
    from datetime import datetime, timedelta

    start = datetime(2026, 11, 27, 3, 15, tzinfo=UTC)
    versions = [new_version(start + timedelta(seconds=s)) for s in (0, 1, 59, 3600, 86400 * 40)]
    assert sorted(versions) == versions and versions[0].startswith("20261127T031500Z-")
