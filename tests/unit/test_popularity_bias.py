"""Popularity-bias control (models/popularity_bias.py) through the scorers both jobs use, and the
batch job's candidates for it."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from batch_training.candidates import Candidate, candidates_from_config
from models.artifact import ModelArtifact, ModelValidationError, new_version
from models.config import load_config
from models.neighbours import KnnParams, knn_scores
from models.popularity_bias import check_penalty, multipliers
from models.scorers import buy_again, item_neighbours_of, recommend_from_counts, user_vectors
from tests.small_models import skewed_model


def _artifact(model_type: str, penalty: float | None = None, seed: int = 4) -> ModelArtifact:
    extra = {} if penalty is None else {"popularity_penalty": penalty}
    artifact = skewed_model(model_type, seed, **extra)
    artifact.version = new_version()
    return artifact.validate()


def _mean_popularity(artifact: ModelArtifact, items: np.ndarray) -> float:
    return float(artifact.popularity[items[items >= 0]].mean())


def test_the_multiplier_and_its_checks():
    np.testing.assert_allclose(multipliers(np.array([0.0, 3.0, 99.0]), 0.5), [1.0, 0.5, 0.1])
    assert check_penalty(0) is None and check_penalty(0.25) is None
    assert "use a number in [0, 10]" in check_penalty(-0.5)
    assert check_penalty("high") is not None and check_penalty(True) is not None


@pytest.mark.parametrize("model_type", ["als", "item_knn"])
def test_a_penalty_of_zero_changes_nothing_and_a_positive_one_ranks_by_the_penalised_scores(model_type):
    plain = _artifact(model_type)
    indptr, indices, counts = plain.user_items
    unpenalised, _, _ = recommend_from_counts(plain, indptr, indices, counts, 10, True)
    zero, _, _ = recommend_from_counts(_artifact(model_type, 0.0), indptr, indices, counts, 10, True)
    np.testing.assert_array_equal(zero, unpenalised)

    beta = 0.7
    penalised = _artifact(model_type, beta)
    items, scores, _ = recommend_from_counts(penalised, indptr, indices, counts, 10, True)
    # The reference: the unpenalised scores of every product times (1 + buyers)^-beta, ranked.
    if model_type == "als":
        raw = user_vectors(plain, indptr, indices, counts) @ plain.item_factors.T.astype(np.float64)
    else:
        raw = np.asarray(knn_scores(item_neighbours_of(plain), indptr, indices, counts, "cosine").todense())
    expected = raw * multipliers(plain.popularity, beta)[None, :]
    for user in range(plain.n_users):
        bought = set(indices[indptr[user]:indptr[user + 1]])
        listed = [i for i in items[user] if i >= 0]
        got = expected[user, listed]
        np.testing.assert_allclose(scores[user, :len(listed)], got, rtol=1e-4, atol=1e-6)
        rest = [j for j in range(plain.n_items) if j not in bought and j not in listed]
        if model_type == "als" or got.min() > 0:     # item-kNN fills a short list with best sellers at 0
            assert not rest or expected[user, rest].max() <= got.min() + 1e-5
    assert not np.array_equal(items, unpenalised)
    assert _mean_popularity(penalised, items) < _mean_popularity(plain, unpenalised)


def test_the_blend_and_the_buy_again_list_ignore_the_penalty():
    blend, penalised_blend = _artifact("blend"), _artifact("blend", 1.0)
    blend.params["blend_weight"] = penalised_blend.params["blend_weight"] = 0.5
    indptr, indices, counts = blend.user_items
    np.testing.assert_array_equal(recommend_from_counts(blend, indptr, indices, counts, 10, True)[0],
                                  recommend_from_counts(penalised_blend, indptr, indices, counts, 10, True)[0])
    np.testing.assert_array_equal(buy_again(_artifact("als"), indptr, indices, counts, 5)[0],
                                  buy_again(_artifact("als", 1.0), indptr, indices, counts, 5)[0])


def test_shallow_copies_with_other_penalties_do_not_share_a_cached_item_side():
    base = _artifact("als")
    indptr, indices, counts = base.user_items
    first = copy.copy(base)
    first.params = {**base.params, "popularity_penalty": 1.0}
    second = copy.copy(base)
    second.params = {**base.params, "popularity_penalty": 0.2}
    strong = recommend_from_counts(first, indptr, indices, counts, 10, True)[0]
    mild = recommend_from_counts(second, indptr, indices, counts, 10, True)[0]
    np.testing.assert_array_equal(mild, recommend_from_counts(_artifact("als", 0.2), indptr, indices, counts,
                                                              10, True)[0])
    assert not np.array_equal(strong, mild)


def test_a_model_with_a_bad_penalty_is_refused():
    with pytest.raises(ModelValidationError, match="popularity_penalty -1"):
        _artifact("als", -1.0)


def test_the_cv_gets_one_als_and_item_knn_candidate_per_penalty():
    cfg = load_config().with_overrides({"batch.scorers.popularity_penalties": [0.0, 0.5],
                                        "batch.scorers.blend_weights": [0.5]})
    names = [c.name for c in candidates_from_config(cfg)]
    assert names == ["als", "als(penalty=0.5)", "blend(w=0.5)", "popularity", "item_knn(bm25)",
                     "item_knn(bm25,penalty=0.5)"]
    assert Candidate("als", penalty=0.5).params() == {"popularity_penalty": 0.5}
    assert Candidate("item_knn", knn=KnnParams(), penalty=0.25).params()["popularity_penalty"] == 0.25
    with pytest.raises(ValueError, match="batch.scorers.popularity_penalties: popularity_penalty 'x'"):
        candidates_from_config(load_config().with_overrides({"batch.scorers.popularity_penalties": ["x"]}))
