"""Small models for tests: a six-product, two-customer ALS model for the model store and the serving
path, and a 60-customer, 50-product one of any model type whose purchases favour a few best sellers."""
from __future__ import annotations

import numpy as np

from models.artifact import ModelArtifact

PAST_CUTOFF = "2025-01-01T00:00:00.000Z"


def small_als(version: str = "v1", cutoff_time: str | None = PAST_CUTOFF) -> ModelArtifact:
    """Built without validate(), so a test can hand a model the store would refuse to the code under test."""
    rng = np.random.default_rng(1)
    return ModelArtifact(
        version=version, model_type="als", item_ids=[f"P{i}" for i in range(6)],
        item_factors=rng.normal(size=(6, 3)).astype(np.float32), user_ids=["K1", "K2"],
        user_factors=rng.normal(size=(2, 3)).astype(np.float32), popularity=[5, 9, 1, 7, 3, 2],
        user_items_indptr=[0, 2, 3], user_items_indices=[0, 2, 5], user_items_counts=[2, 1, 4],
        params={"rank": 3, "reg_param": 0.1, "alpha": 1.0, "implicit_prefs": True, "scaling": "none"},
        cutoff_time=cutoff_time)


def skewed_model(model_type: str, seed: int = 4, **params) -> ModelArtifact:
    """60 customers x 50 products, rank 5, any model type; low product indices sell most, so the
    popularity and the scores are related (what the popularity penalty and count scaling act on).
    ``params`` update the model's params (``scaling``, ``popularity_penalty``, ``knn_weighting``...)."""
    rng = np.random.default_rng(seed)
    n_users, n_items, rank = 60, 50, 5
    lengths = rng.integers(1, 9, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    weights = np.linspace(3, 0.2, n_items) / np.linspace(3, 0.2, n_items).sum()
    indices = np.concatenate([np.sort(rng.choice(n_items, size=n, replace=False, p=weights))
                              for n in lengths]).astype(np.int32)
    return ModelArtifact(
        version=f"{model_type}-{seed}", model_type=model_type, item_ids=np.array([f"P{i}" for i in range(n_items)]),
        item_factors=rng.normal(size=(n_items, rank)).astype(np.float32),
        user_ids=np.array([f"C{u}" for u in range(n_users)]),
        user_factors=rng.normal(size=(n_users, rank)).astype(np.float32),
        popularity=np.bincount(indices, minlength=n_items).astype(np.float64),
        user_items_indptr=indptr, user_items_indices=indices,
        user_items_counts=rng.integers(1, 4, indptr[-1]).astype(np.float32),
        params={"rank": rank, "reg_param": 0.1, "alpha": 2.0, "implicit_prefs": True, "scaling": "none",
                "knn_neighbours": 20, "knn_weighting": "cosine", **params},
        cutoff_time=PAST_CUTOFF)
