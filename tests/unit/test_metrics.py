"""Ranking and beyond-accuracy metrics against values worked out by hand on tiny examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from batch_training.evaluation import Csr, first_k_unpurchased, format_metrics_table
from batch_training.metrics import catalog_coverage, intra_list_diversity, novelty, ranking_metrics, rmse

# Discounts of ranks 1, 2, 3: 1/log2(2) = 1, 1/log2(3) = 0.63093, 1/log2(4) = 0.5
D1, D2, D3 = 1.0, 1.0 / math.log2(3), 0.5


def _csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return indptr, np.array([i for r in rows for i in r], dtype=np.int64)


# Four users, k = 3:
#   u0 recommends [1, 2, 3], relevant {2, 5}: hits [0, 1, 0]
#   u1 recommends [4, 0, -1] (padded), relevant {4, 0, 7, 8}: hits [1, 1, 0]
#   u2 recommends [1, 2, 3], relevant {}: skipped
#   u3 recommends [9, 8, 7], relevant {6}: hits [0, 0, 0]
RECOMMENDED = np.array([[1, 2, 3], [4, 0, -1], [1, 2, 3], [9, 8, 7]])
RELEVANT = [[2, 5], [4, 0, 7, 8], [], [6]]


def test_ranking_metrics_match_hand_computation():
    result = ranking_metrics(RECOMMENDED, *_csr(RELEVANT), k=3)
    # precision@3 = hits / 3: u0 1/3, u1 2/3, u3 0 -> mean over 3 users = 1/3
    assert result["precision"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # recall@3 = hits / |rel|: u0 1/2, u1 2/4, u3 0/1 -> 1/3
    assert result["recall"] == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)
    # AP@3: u0 precision@2 = 1/2 at its hit, / min(2, 3) = 0.25
    #       u1 precision@1 = 1 and precision@2 = 1, / min(4, 3) = 2/3;  u3 0
    assert result["map"] == pytest.approx((0.25 + 2 / 3 + 0) / 3)
    # nDCG@3: u0 DCG = D2, IDCG over min(2,3) = D1 + D2
    #         u1 DCG = D1 + D2, IDCG over min(4,3) = D1 + D2 + D3;  u3 0
    ndcg_u0 = D2 / (D1 + D2)                     # 0.386853
    ndcg_u1 = (D1 + D2) / (D1 + D2 + D3)         # 0.765361
    assert result["ndcg"] == pytest.approx((ndcg_u0 + ndcg_u1 + 0) / 3)
    assert result["users"] == 3


def test_users_without_relevant_items_are_skipped():
    with_empty = ranking_metrics(RECOMMENDED, *_csr(RELEVANT), k=3)
    without = ranking_metrics(np.delete(RECOMMENDED, 2, axis=0), *_csr([RELEVANT[i] for i in (0, 1, 3)]), k=3)
    assert with_empty == pytest.approx(without)


def test_no_user_with_relevant_items_gives_nan_and_zero_users():
    result = ranking_metrics(RECOMMENDED[:1], *_csr([[]]), k=3)
    assert result["users"] == 0
    assert all(math.isnan(result[name]) for name in ("precision", "recall", "map", "ndcg"))


def test_padding_and_short_lists_never_hit_and_precision_divides_by_k():
    # One user, lists of 2 (+ padding) evaluated at k = 4; relevant {7, 3, 3} = {3, 7} (duplicate once)
    # hits [1, 0, 0, 0]: precision 1/4, recall 1/2, AP = (1/1) / min(2, 4) = 0.5,
    # nDCG = D1 / (D1 + D2)
    result = ranking_metrics(np.array([[3, -1]]), *_csr([[7, 3, 3]]), k=4)
    assert result["precision"] == pytest.approx(1 / 4)
    assert result["recall"] == pytest.approx(1 / 2)
    assert result["map"] == pytest.approx(0.5)
    assert result["ndcg"] == pytest.approx(D1 / (D1 + D2))


def test_cut_off_below_list_length_ignores_later_hits():
    # k = 1 on u1 of the example: only item 4 counts -> precision 1, recall 1/4, AP 1/1, nDCG 1
    result = ranking_metrics(RECOMMENDED[1:2], *_csr([RELEVANT[1]]), k=1)
    assert result == pytest.approx({"precision": 1.0, "recall": 0.25, "map": 1.0, "ndcg": 1.0, "users": 1})


def test_vectorised_metrics_equal_a_plain_per_user_loop():
    rng = np.random.default_rng(7)
    n_users, n_items, k = 200, 30, 5
    recommended = np.array([rng.permutation(n_items)[:k] for _ in range(n_users)])
    recommended[rng.random((n_users, k)) < 0.1] = -1
    relevant = [list(rng.choice(n_items, rng.integers(0, 6), replace=False)) for _ in range(n_users)]
    expected = {"precision": [], "recall": [], "map": [], "ndcg": []}
    for recs, rel in zip(recommended, relevant):
        if not rel:
            continue
        hits = [1.0 if r in rel else 0.0 for r in recs]
        expected["precision"].append(sum(hits) / k)
        expected["recall"].append(sum(hits) / len(rel))
        expected["map"].append(sum(sum(hits[:i + 1]) / (i + 1) for i in range(k) if hits[i]) / min(len(rel), k))
        dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits))
        expected["ndcg"].append(dcg / sum(1 / math.log2(i + 2) for i in range(min(len(rel), k))))
    result = ranking_metrics(recommended, *_csr(relevant), k=k)
    for name, values in expected.items():
        assert result[name] == pytest.approx(np.mean(values)), name
    assert result["users"] == len(expected["map"])


def test_misaligned_relevant_rows_are_refused():
    with pytest.raises(ValueError, match="rel_indptr"):
        ranking_metrics(RECOMMENDED, *_csr(RELEVANT[:3]), k=3)


def test_catalog_coverage_counts_distinct_items_ignoring_padding():
    # items {0, 1, 2} of 10
    assert catalog_coverage(np.array([[0, 1, -1], [1, 2, -1]]), n_items=10) == pytest.approx(3 / 10)
    with pytest.raises(ValueError, match="outside the catalogue"):
        catalog_coverage(np.array([[0, 12]]), n_items=10)


def test_novelty_is_mean_self_information_per_list():
    popularity = np.array([50, 25, 100, 0])   # buyers of items 0..3 among 100 customers
    # list [0, 1]: -log2(0.5) = 1, -log2(0.25) = 2 -> 1.5
    # list [2, 3]: -log2(1.0) = 0, item 3 has no buyer -> counted as 1: -log2(0.01) = 6.643856 -> 3.321928
    # list [0, -1]: 1 (padding ignored); list [-1, -1]: skipped
    recommended = np.array([[0, 1], [2, 3], [0, -1], [-1, -1]])
    expected = (1.5 + (0 + -math.log2(0.01)) / 2 + 1.0) / 3
    assert novelty(recommended, popularity, n_users_total=100) == pytest.approx(expected)


def test_novelty_refuses_counts_above_the_number_of_customers():
    with pytest.raises(ValueError, match="n_users_total"):
        novelty(np.array([[0]]), np.array([5]), n_users_total=3)


def test_intra_list_diversity_is_mean_pairwise_cosine_distance():
    factors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    # list [0, 1, 2]: d(0,1) = 1 - 0 = 1, d(0,2) = d(1,2) = 1 - 1/sqrt(2) = 0.292893 -> mean 0.528595
    # list [0, 3, -1]: d(0,3) = 1 - 1 = 0 -> 0
    # list [1, -1, -1]: a single item has no pair -> skipped
    recommended = np.array([[0, 1, 2], [0, 3, -1], [1, -1, -1]])
    list0 = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert intra_list_diversity(recommended, factors) == pytest.approx((list0 + 0.0) / 2)


def test_intra_list_diversity_reads_only_the_listed_items_and_treats_zero_vectors_as_unrelated():
    factors = np.zeros((50_000, 2))
    factors[40_000], factors[49_999] = [3.0, 0.0], [1.0, 1.0]     # item 7 stays all-zero
    recommended = np.array([[40_000, 49_999, 7], [49_999, -1, -1]])
    # d(40000, 49999) = 1 - 1/sqrt(2); each pair with the zero vector: 1 - 0 = 1
    assert intra_list_diversity(recommended, factors) == pytest.approx((1 - 1 / math.sqrt(2) + 2) / 3)
    factors[:7] = factors[8:40_000] = 5.0                      # unlisted items change nothing
    assert intra_list_diversity(recommended, factors) == pytest.approx((1 - 1 / math.sqrt(2) + 2) / 3)


def test_rmse():
    # differences 0, -2, 3 -> squares 0, 4, 9 -> sqrt(13 / 3)
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 0.0])) == pytest.approx(math.sqrt(13 / 3))
    with pytest.raises(ValueError, match="same"):
        rmse(np.array([1.0]), np.array([1.0, 2.0]))


def test_first_k_unpurchased_skips_each_rows_items_in_popularity_order():
    order = np.array([3, 1, 0, 2, 4])
    # row 0 bought {3, 0} -> [1, 2, 4]; row 1 nothing -> [3, 1, 0]; row 2 bought everything -> padding
    purchased = Csr(*_csr([[0, 3], [], [0, 1, 2, 3, 4]]))
    assert first_k_unpurchased(order, purchased, k=3).tolist() == [[1, 2, 4], [3, 1, 0], [-1, -1, -1]]
    # a k beyond the catalogue pads
    assert first_k_unpurchased(order, Csr(*_csr([[]])), k=7).tolist() == [[3, 1, 0, 2, 4, -1, -1]]


def test_metrics_table_has_one_aligned_row_per_recommender():
    table = format_metrics_table({
        "als": {"k": 10, "users": 1234, "precision": 0.04123, "recall": 0.2, "map": 0.1, "ndcg": 0.15,
                "coverage": 0.3, "novelty": 9.5, "diversity": 0.8},
        "popularity": {"k": 10, "users": 1234, "precision": 0.02, "recall": 0.1, "map": 0.05, "ndcg": 0.07,
                       "coverage": 0.001, "novelty": 4.2},
    })
    header, als, baseline = table.splitlines()
    assert header.split() == ["recommender", "users", "precision@10", "recall@10", "map@10", "ndcg@10",
                              "coverage", "novelty", "diversity"]
    assert als.split()[:3] == ["als", "1234", "0.0412"]
    assert baseline.split()[-1] == "-"
    assert len(header) == len(als) == len(baseline)
    assert header.index("precision@10") + len("precision@10") == als.index("0.0412") + len("0.0412")
