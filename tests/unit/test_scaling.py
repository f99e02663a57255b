"""The count transforms (models.scaling): what a model trained on is what every fold-in sees."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models.scaling import IDF_FLOOR, als_ratings, transform_counts


def test_none_and_log_need_only_the_counts():
    counts = np.array([0, 1, 3, 250])
    np.testing.assert_array_equal(transform_counts(counts, "none"), counts.astype(np.float32))
    np.testing.assert_allclose(transform_counts(counts, "log"), np.log1p(counts), rtol=1e-7)
    assert transform_counts(counts, "log").dtype == np.float32
    with pytest.raises(ValueError, match="sqrt"):
        transform_counts(counts, "sqrt")
    with pytest.raises(ValueError, match="als_ratings"):
        transform_counts(counts, "bm25")


def _bm25_by_hand(count: float, buyers: list[float], product: int, bought: int, k1: float, b: float) -> float:
    """The module docstring's formula, written out for one entry."""
    mean = sum(x for x in buyers if x > 0) / sum(1 for x in buyers if x > 0)
    norm = (1 - b) + b * buyers[product] / mean
    idf = max(math.log(len(buyers) / (1 + bought)), IDF_FLOOR)
    return count * (k1 + 1) / (k1 * norm + count) * idf


def test_bm25_follows_the_documented_formula():
    # 3 customers over 5 products; product 4 has no buyer (it still counts in the catalogue's size).
    buyers = [3.0, 1.0, 2.0, 1.0, 0.0]
    indptr = np.array([0, 3, 4, 6])
    indices = np.array([0, 1, 2, 0, 0, 3])
    counts = np.array([1.0, 4.0, 2.0, 1.0, 7.0, 1.0])
    params = {"scaling": "bm25", "scaling_k1": 1.5, "scaling_b": 0.75}
    ratings = als_ratings(params, indptr, indices, counts, np.array(buyers))
    rows = np.repeat(np.arange(3), np.diff(indptr))
    expected = [_bm25_by_hand(c, buyers, i, int(np.diff(indptr)[r]), 1.5, 0.75)
                for c, i, r in zip(counts, indices, rows)]
    assert ratings.dtype == np.float32
    np.testing.assert_allclose(ratings, expected, rtol=1e-6)
    # A best seller's purchase weighs less than a niche product's, at the same count and customer.
    assert ratings[0] < _bm25_by_hand(1.0, buyers, 1, 3, 1.5, 0.75)


def test_bm25_ignores_unknown_products_and_keeps_every_rating_positive():
    buyers = np.array([5.0, 5.0, 1.0])
    # Customer 0 bought the whole catalogue (idf at the floor); customer 1 one known product and
    # two the model does not know (index -1), which neither get a rating nor count as bought.
    indptr = np.array([0, 3, 6])
    indices = np.array([0, 1, 2, -1, 2, -1])
    counts = np.ones(6)
    ratings = als_ratings({"scaling": "bm25"}, indptr, indices, counts, buyers)
    assert (ratings[:3] > 0).all() and ratings[3] == 0 and ratings[5] == 0
    alone = als_ratings({"scaling": "bm25"}, np.array([0, 1]), np.array([2]), np.ones(1), buyers)
    assert ratings[4] == alone[0]
    # Defaults (k1 100, b 0.8) apply when a model's params predate them.
    assert ratings[4] == als_ratings({"scaling": "bm25", "scaling_k1": 100.0, "scaling_b": 0.8},
                                     np.array([0, 1]), np.array([2]), np.ones(1), buyers)[0]


def test_the_other_scalings_ignore_the_rows():
    counts = np.array([2.0, 3.0])
    np.testing.assert_array_equal(als_ratings({"scaling": "log"}, np.array([0, 2]), np.array([0, 1]), counts,
                                              np.ones(2)), transform_counts(counts, "log"))
    np.testing.assert_array_equal(als_ratings({}, np.array([0, 2]), np.array([0, 1]), counts, np.ones(2)),
                                  counts.astype(np.float32))
