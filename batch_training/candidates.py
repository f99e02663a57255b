"""The candidate scorers the batch job chooses among, evaluated through models.scorers.

Every candidate (ALS, ALS blended with popularity at each configured weight, popularity, item-kNN
with each configured weighting; ALS and item-kNN at each configured popularity penalty)
is scored by ``models.scorers.recommend_from_counts`` from the same training counts and the same
ALS fit, so the evaluation measures exactly what the jobs will serve.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.artifact import ModelArtifact
from models.neighbours import WEIGHTINGS, KnnParams
from models.popularity_bias import PENALIZED_TYPES, check_penalty
from models.scorers import MODEL_TYPES, best_scores, give_neighbours, needs_vectors, recommend_from_counts, user_vectors

log = logging.getLogger(__name__)
DEFAULT_CANDIDATES = ("als", "blend", "popularity", "item_knn")
DEFAULT_BLEND_WEIGHTS = (0.25, 0.5, 0.75)
PARAMETER_FREE = ("popularity", "item_knn")     # scorers that do not use the ALS fit


@dataclass(frozen=True)
class Candidate:
    model_type: str
    blend_weight: float | None = None
    knn: KnnParams | None = None        # item-kNN: how its neighbour table is built
    penalty: float = 0.0                # als, item-kNN: the popularity penalty (models.popularity_bias)

    @property
    def name(self) -> str:
        if self.model_type == "blend":
            return f"blend(w={self.blend_weight:g})"
        details = [self.knn.weighting] if self.knn is not None and self.knn.weighting != "cosine" else []
        details += [f"penalty={self.penalty:g}"] if self.penalty else []
        return f"{self.model_type}({','.join(details)})" if details else self.model_type

    def params(self) -> dict[str, Any]:
        params = self.knn.as_params() if self.knn is not None else {}
        if self.blend_weight is not None:
            params["blend_weight"] = self.blend_weight
        if self.penalty:
            params["popularity_penalty"] = self.penalty
        return params


def knn_from_config(cfg) -> list[KnnParams]:
    """One neighbour-table setting per ``batch.scorers.knn.weightings`` entry."""
    knn = cfg.get_path("batch.scorers.knn")
    weightings = list(knn["weightings"] or [])
    if not weightings:
        raise ValueError("batch.scorers.knn.weightings is empty: name at least one of "
                         f"{list(WEIGHTINGS)}, or drop item_knn from batch.scorers.candidates")
    most = knn["max_customers"]
    shared = {"neighbours": int(knn["neighbours"]), "max_customers": None if most is None else int(most)}
    return [KnnParams(weighting=w, **shared) if w == "cosine" else
            KnnParams(weighting=w, k1=float(knn["bm25_k1"]), b=float(knn["bm25_b"]), **shared)
            for w in weightings]


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
    penalties = list(cfg.get_path("batch.scorers.popularity_penalties") or [0.0])
    bad = [problem for problem in map(check_penalty, penalties) if problem]
    if bad:
        raise ValueError(f"batch.scorers.popularity_penalties: {bad[0]}")
    penalties = [float(p) for p in penalties]
    result: list[Candidate] = []
    for model_type in types:
        if model_type == "blend":
            result += [Candidate("blend", w) for w in weights]
        elif model_type == "item_knn":
            result += [Candidate("item_knn", knn=knn, penalty=p) for knn in knn_from_config(cfg) for p in penalties]
        elif model_type in PENALIZED_TYPES:
            result += [Candidate(model_type, penalty=p) for p in penalties]
        else:
            result.append(Candidate(model_type))
    return result


def seed_neighbour_tables(artifact: ModelArtifact, candidates: list[Candidate], tables: dict, build) -> None:
    """Give ``artifact`` each item-kNN candidate's neighbour table, from ``tables`` or built once by
    ``build(params)`` and kept there: a table does not depend on the ALS fit, so one per split serves
    every pass and fit scored on it."""
    for candidate in candidates:
        if candidate.model_type == "item_knn":
            params = KnnParams.from_params(candidate.params())
            if params not in tables:
                tables[params] = build(params)
            give_neighbours(artifact, params, tables[params])


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
    # The ALS-based candidates share one fit, hence one fold-in of these customers.
    vectors = user_vectors(base, indptr, indices, counts) if any(
        needs_vectors(c.model_type) for c in candidates) else None
    # ... and every blend weight one scale (each customer's best ALS score), computed once.
    best = best_scores(vectors, base.item_factors) if any(c.model_type == "blend" for c in candidates) else None
    return {c.name: recommend_from_counts(as_candidate(base, c), indptr, indices, counts, k,
                                          exclude_purchased, vectors=vectors, vector_max=best)[0]
            for c in candidates}


def select_model(results, candidates: list[Candidate], metric: str, min_lift: float,
                 lower_is_better: bool = False):
    """The (ALS parameters, scorer) pair with the best cross-validated mean ``metric``.

    ``results`` are ``batch_training.train.CandidateResult`` (one per ALS parameter set, each fold
    holding every scorer's metrics). A personalised winner must beat popularity's mean by
    ``min_lift``, otherwise popularity is chosen, as the publish gate would refuse it anyway.
    Ties go to the earlier parameter set, then the earlier scorer. Returns
    ``(params, candidate, rows)`` with one row per pair, best first, for the log and the report
    (pairs whose ALS parameters a CV race stopped early come last).
    """
    sign = -1.0 if lower_is_better else 1.0
    folds = max((len(result.fold_metrics) for result in results), default=0)
    first_complete = next((p_no for p_no, result in enumerate(results) if len(result.fold_metrics) == folds), 0)
    rows = [{"params": result.params, "candidate": candidate, "mean": result.mean(metric, candidate.name),
             "sd": result.sd(metric, candidate.name), "folds": len(result.fold_metrics), "order": (p_no, c_no)}
            for p_no, result in enumerate(results) for c_no, candidate in enumerate(candidates)
            if candidate.name in result.scorers()
            and (p_no == first_complete or candidate.model_type not in PARAMETER_FREE)]   # the same under every fit
    if not rows:
        raise ValueError("cross-validation produced no metrics: no candidate was scored")
    # A set the race stopped early is listed, not chosen: its mean is over fewer folds.
    rows.sort(key=lambda row: (row["folds"] < folds, -_finite(sign * row["mean"]), row["order"]))
    best = rows[0]
    if best["candidate"].model_type != "popularity" and not lower_is_better:
        popular = [row for row in rows if row["candidate"].model_type == "popularity"]
        if popular and _finite(best["mean"]) < _finite(popular[0]["mean"]) * (1 + min_lift):
            log.info("the best personalised model %s (%s %.4f) does not beat popularity (%.4f) by %.0f%%: "
                     "popularity is selected", best["candidate"].name, metric, best["mean"], popular[0]["mean"],
                     min_lift * 100)
            best = popular[0]
    return best["params"], best["candidate"], rows


def _finite(value) -> float:
    value = float(value)
    return value if np.isfinite(value) else -np.inf
