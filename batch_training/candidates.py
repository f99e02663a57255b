"""The candidate scorers the batch job chooses among, evaluated through models.scorers.

Every candidate (ALS, ALS blended with popularity at each configured weight, popularity, item-kNN)
is scored by ``models.scorers.recommend_from_counts`` from the same training counts and the same
ALS fit, so the evaluation measures exactly what the jobs will serve.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import logging

import numpy as np

from models.artifact import ModelArtifact
from models.scorers import MODEL_TYPES, recommend_from_counts

log = logging.getLogger(__name__)
DEFAULT_CANDIDATES = ("als", "blend", "popularity", "item_knn")
DEFAULT_BLEND_WEIGHTS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Candidate:
    model_type: str
    blend_weight: float | None = None

    @property
    def name(self) -> str:
        return f"blend(w={self.blend_weight:g})" if self.model_type == "blend" else self.model_type

    def params(self) -> dict[str, Any]:
        return {"blend_weight": self.blend_weight} if self.blend_weight is not None else {}


def candidates_from_config(cfg) -> list[Candidate]:
    """``batch.scorers.candidates`` (model types) with one blend per ``batch.scorers.blend_weights``."""
    types = list(cfg.get_path("batch.scorers.candidates", DEFAULT_CANDIDATES) or ["als"])
    unknown = sorted(set(types) - set(MODEL_TYPES))
    if unknown:
        raise ValueError(f"unknown batch.scorers.candidates {unknown}: use some of {list(MODEL_TYPES)}")
    weights = [float(w) for w in cfg.get_path("batch.scorers.blend_weights", DEFAULT_BLEND_WEIGHTS) or []]
    bad = [w for w in weights if not 0.0 <= w <= 1.0]
    if bad:
        raise ValueError(f"batch.scorers.blend_weights {bad} must lie in [0, 1]")
    result: list[Candidate] = []
    for model_type in types:
        if model_type == "blend":
            result += [Candidate("blend", w) for w in weights]
        else:
            result.append(Candidate(model_type))
    return result


def without_unaffordable_knn(candidates: list[Candidate], n_items: int, max_items: int) -> list[Candidate]:
    """Drop item-kNN when its dense item-item similarity would not fit in memory.

    The similarity is a dense float32 [n_items, n_items] matrix (plus the co-occurrence it is
    built from): 90k products would need ~60 GiB. Above ``batch.scorers.max_knn_items`` the
    candidate and the baseline are skipped, and the log says so.
    """
    if n_items <= max_items or not any(c.model_type == "item_knn" for c in candidates):
        return candidates
    need_gib = 2 * 4 * n_items ** 2 / 2 ** 30
    log.warning("item-kNN skipped: %s products exceed batch.scorers.max_knn_items=%s (its dense similarity "
                "would need ~%.0f GiB)", f"{n_items:,}", f"{max_items:,}", need_gib)
    return [c for c in candidates if c.model_type != "item_knn"]


def scoring_artifact(item_factors: np.ndarray, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                     popularity: np.ndarray, als_params: dict) -> ModelArtifact:
    """A throw-away artifact over integer ids holding a fit and its training counts, for evaluation."""
    n_items, n_users = item_factors.shape[0], len(indptr) - 1
    return ModelArtifact(version="evaluation", model_type="als", item_ids=np.arange(n_items).astype(str),
                         item_factors=item_factors, user_ids=np.arange(n_users).astype(str),
                         user_factors=np.zeros((n_users, 0), dtype=np.float32), popularity=popularity,
                         user_items_indptr=indptr, user_items_indices=indices, user_items_counts=counts,
                         params=dict(als_params))


def as_candidate(base: ModelArtifact, candidate: Candidate) -> ModelArtifact:
    """``base`` as the given model type (a shallow copy: the scorer cache is shared)."""
    artifact = copy.copy(base)
    artifact.model_type = candidate.model_type
    artifact.params = {**base.params, **candidate.params()}
    return artifact


def recommend_candidates(base: ModelArtifact, candidates: list[Candidate], users: np.ndarray, k: int,
                         exclude_purchased: bool) -> dict[str, np.ndarray]:
    """Each candidate's top-k for ``users`` (rows of ``base``'s training counts), by name."""
    indptr, indices, counts = base.user_items_of(users)
    return {c.name: recommend_from_counts(as_candidate(base, c), indptr, indices, counts, k,
                                          exclude_purchased)[0] for c in candidates}


def select(results: dict[str, dict], candidates: list[Candidate], metric: str,
           min_lift: float) -> Candidate:
    """The best candidate by ``metric``; a personalised one must beat popularity by ``min_lift``.

    Ties go to the earlier candidate. Without a popularity candidate the best one wins.
    """
    by_name = {c.name: c for c in candidates}
    best = max(candidates, key=lambda c: (_finite(results[c.name][metric]), -candidates.index(c)))
    if "popularity" not in by_name or best.model_type == "popularity":
        return best
    baseline = _finite(results["popularity"][metric])
    return best if _finite(results[best.name][metric]) >= baseline * (1 + min_lift) else by_name["popularity"]


def _finite(value) -> float:
    value = float(value)
    return value if np.isfinite(value) else -np.inf
