"""A six-product, two-customer ALS model for tests of the model store and the serving path."""
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
