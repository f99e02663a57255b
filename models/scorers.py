"""The scorer family: one function turns a customer's purchase counts into a ranked list for every
model type, so the batch job and the streaming job serve the same lists from the same counts.

Model types (``ModelArtifact.model_type``):

* ``als``: fold the counts into a user vector (``scoring.fold_in``) and rank by dot product.
* ``blend``: ``w * als / max_als + (1 - w) * popularity / max_popularity`` per customer, where
  ``max_als`` is the customer's best ALS score over the catalogue and ``w`` is
  ``params["blend_weight"]``. On small or sparse catalogues ALS alone can fall below the best
  sellers; the prior pulls it back, and the weight is chosen on held-out data. The blend is an
  extra factor column (user ``[w u / max_u, 1 - w]``, item ``[v, p / max_p]``), so the same
  ``scoring.top_k`` ranks it: ``w = 0`` is the popularity ranking, ``w = 1`` the ALS ranking.
* ``popularity``: the best sellers (the model the gate publishes when nothing beats it).
* ``item_knn``: each product's nearest products by co-purchase (``models.neighbours``: cosine or
  BM25, the N best kept), score = the summed similarities of the products the customer bought; the
  table is stored with the version (built from the trained purchases for older versions).

``params["popularity_penalty"]`` (models.popularity_bias) scales ALS and item-kNN scores down for
best sellers; the ranking uses it, the buy-again list's relevance (``pair_scores``) does not.

``rules`` (models.business_rules, the serving jobs' business rules; None: none) ban products from
every list and multiply every list's scores by a per-product margin boost. The boost folds into
the item side like the penalty (ALS and blend item rows, item-kNN table columns, the popularity
vector a fallback ranks by); the banned products are masked in every top-k. Model evaluation
scores without rules.

A customer with no purchase of a product the model knows gets the popularity list (strategy
``popularity``), or their segment's (a country, a store: strategy ``segment_popularity``) when the
artifact has ``params["segment_popularity"]`` (see ``segment_popularity``) and the segment is known;
the others are ``personalized``.
"""
from __future__ import annotations

import numpy as np

from models import popularity_bias, scoring
from models.business_rules import RULED, BusinessRules, ItemRules, aligned, banned_of, boost_of, boosted
from models.neighbours import KnnParams, item_neighbours, knn_pair_scores, knn_top_k
from models.scaling import als_ratings

MODEL_TYPES = ("als", "blend", "popularity", "item_knn")
PERSONALIZED = "personalized"
POPULARITY = "popularity"
SEGMENT_POPULARITY = "segment_popularity"


def recommend_from_counts(artifact, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, k: int,
                          exclude_purchased: bool, segments=None,
                          vectors: np.ndarray | None = None,
                          vector_max: np.ndarray | None = None,
                          rules: BusinessRules | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Top-k per customer from their full purchase counts (CSR over the artifact's item index).

    ``segments`` (optional, one per customer, None when unknown) picks the popularity list of the
    customers who get one. ``vectors`` are ``user_vectors`` of the same counts when the caller
    already has them (the fold-in is the costly part; the buy-again list and other scorers of the
    same ALS fit reuse it); ``vector_max`` their best ALS score over all items (``best_scores``),
    which every blend weight needs; ``rules`` the business rules to apply (module docstring).
    Returns ``(item_idx int32 [n, k], scores float32 [n, k], strategies)``; -1/NaN pad short lists.
    """
    model_type = artifact.model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} cannot be scored: use one of {MODEL_TYPES}")
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float32)
    n = len(indptr) - 1
    personal = np.diff(indptr) > 0
    if model_type == POPULARITY:
        personal[:] = False
    item_idx = np.full((n, k), -1, dtype=np.int32)
    scores = np.full((n, k), np.nan, dtype=np.float32)
    rows = np.flatnonzero(personal)
    item_rules = rules_for(artifact, rules)
    if len(rows):
        sub = _rows(indptr, indices, counts, rows)
        excluded = sub[:2] if exclude_purchased else None
        item_idx[rows], scores[rows] = _personal_top_k(artifact, *sub, k, excluded,
                                                       None if vectors is None else vectors[rows],
                                                       None if vector_max is None else vector_max[rows], item_rules)
    strategies = np.where(personal, PERSONALIZED, POPULARITY).astype(object)
    by_segment = _segment_rows(artifact, segments, np.flatnonzero(~personal))
    for popularity, fallback, strategy in by_segment:
        excluded = _rows(indptr, indices, counts, fallback)[:2] if exclude_purchased else None
        item_idx[fallback], scores[fallback] = scoring.popularity_top_k(
            boosted(popularity, item_rules), k, exclude=excluded, banned=banned_of(item_rules))
        strategies[fallback] = strategy
    return item_idx, scores, list(strategies)


def segment_popularity(user_segments, indptr: np.ndarray, indices: np.ndarray, n_items: int,
                       top_n: int = 100) -> dict:
    """Distinct buyers per item within each segment, the ``top_n`` best per segment, for
    ``params["segment_popularity"]``: ``{segment: {"items": [...], "buyers": [...]}}``."""
    segments = np.asarray(user_segments, dtype=object)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    result = {}
    for name in sorted({str(s) for s in segments if s is not None and s == s and str(s) != ""}):
        users = np.flatnonzero(segments.astype(str) == name)
        buyers = np.bincount(np.asarray(indices)[np.isin(rows, users)], minlength=n_items).astype(np.float64)
        best = scoring.popularity_order(buyers)[:top_n]
        best = best[buyers[best] > 0]
        result[name] = {"items": best.astype(int).tolist(), "buyers": buyers[best].tolist()}
    return result


def _segment_rows(artifact, segments, fallback: np.ndarray):
    """(popularity vector, rows, strategy) groups: each known segment's rows, then the rest."""
    table = (artifact.params or {}).get("segment_popularity") or {}
    if not len(fallback):
        return []
    if segments is None or not table:
        return [(artifact.popularity, fallback, POPULARITY)]
    names = np.asarray(segments, dtype=object)[fallback]
    groups, rest = [], np.ones(len(fallback), dtype=bool)
    for name in {str(n) for n in names if n is not None} & set(table):
        here = np.array([n is not None and str(n) == name for n in names])
        vector = np.zeros(artifact.n_items)
        vector[np.asarray(table[name]["items"], dtype=np.int64)] = table[name]["buyers"]
        groups.append((vector, fallback[here], SEGMENT_POPULARITY))
        rest &= ~here
    if rest.any():
        groups.append((artifact.popularity, fallback[rest], POPULARITY))
    return groups


def _personal_top_k(artifact, indptr, indices, counts, k, excluded, vectors=None, vector_max=None,
                    item_rules: ItemRules | None = None):
    if artifact.model_type == "item_knn":
        return _knn_top_k(artifact, indptr, indices, counts, k, excluded, item_rules)
    if vectors is None:
        vectors = user_vectors(artifact, indptr, indices, counts)
    if artifact.model_type == "als":
        return scoring.top_k(vectors, _ranked_item_factors(artifact, item_rules), k, exclude=excluded,
                             banned=banned_of(item_rules))
    weight = float(artifact.params.get("blend_weight", 1.0))
    users, items = blend_factors(vectors, artifact.item_factors, artifact.popularity, weight, best=vector_max)
    boost = boost_of(item_rules)
    if boost is not None:
        items = popularity_bias.scaled_factors(items, boost)
    return scoring.top_k(users, items, k, exclude=excluded, banned=banned_of(item_rules))


def rank_vectors(artifact, vectors: np.ndarray, k: int, exclude=None,
                 rules: BusinessRules | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ALS top-k of given user vectors (the batch job's final fit) as ``recommend_from_counts``
    ranks an ALS model's: with its popularity penalty and the business rules."""
    item_rules = rules_for(artifact, rules)
    return scoring.top_k(vectors, _ranked_item_factors(artifact, item_rules), k, exclude=exclude,
                         banned=banned_of(item_rules))


def needs_vectors(model_type: str) -> bool:
    """Whether the model type scores through folded-in ALS user vectors (``user_vectors``)."""
    return model_type in ("als", "blend")


def user_vectors(artifact, indptr, indices, counts) -> np.ndarray:
    """ALS fold-in of the counts with the artifact's training parameters (gramian cached)."""
    params = artifact.params or {}
    implicit = bool(params.get("implicit_prefs", True))
    cache = _cache(artifact)
    if implicit and "gram" not in cache:
        cache["gram"] = scoring.gramian(artifact.item_factors)
    if "fitted" not in cache:       # a scan of every factor row: once per model, not per call
        cache["fitted"] = scoring.fitted_items(artifact.item_factors)
    ratings = als_ratings(params, indptr, indices, counts, artifact.popularity)
    return scoring.fold_in(artifact.item_factors, indptr, indices, ratings, float(params["reg_param"]),
                           float(params["alpha"]), implicit=implicit, gram=cache.get("gram"),
                           fitted=cache["fitted"])


def best_scores(user_vectors: np.ndarray, item_factors: np.ndarray) -> np.ndarray:
    """Each customer's highest ALS score over the whole catalogue (the blend's scale)."""
    users = np.asarray(user_vectors, dtype=np.float32)
    if not len(users):
        return np.zeros(0)
    return scoring.top_k(users, np.asarray(item_factors, dtype=np.float32), 1)[1][:, 0].astype(np.float64)


def blend_factors(user_vectors: np.ndarray, item_factors: np.ndarray, popularity: np.ndarray,
                  weight: float, best: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augmented (users, items) whose dot product is the blended score (see the module docstring).
    ``best``: ``best_scores`` of the same vectors when the caller has them (one pass over the
    catalogue fewer per blend weight)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend_weight must lie in [0, 1], got {weight}")
    users = np.asarray(user_vectors, dtype=np.float32)
    items = np.asarray(item_factors, dtype=np.float32)
    best = best_scores(users, items) if best is None else np.asarray(best, dtype=np.float64)
    scale = np.where(np.isfinite(best) & (best > 0), weight / np.where(best > 0, best, 1.0), 0.0)
    popularity = np.asarray(popularity, dtype=np.float64)
    prior = popularity / popularity.max() if popularity.size and popularity.max() > 0 else np.zeros_like(popularity)
    blended_users = np.hstack([users * scale[:, None].astype(np.float32),
                               np.full((len(users), 1), 1.0 - weight, dtype=np.float32)])
    blended_items = np.hstack([items, prior[:, None].astype(np.float32)])
    return blended_users, blended_items


# ------------------------------------------------------------------------------------ buy again

def buy_again(artifact, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
              k: int, vectors: np.ndarray | None = None,
              rules: BusinessRules | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Products each customer bought before, best first: ``(item_idx int32 [n, k], scores float32)``.

    score = relevance / the customer's best relevance + count / the customer's largest count, so
    what the model predicts and what the customer buys often (recently, with recency-weighted
    counts, see models.recency) both lift a product. Ties by lower item index; -1/NaN padding.
    ``rules``: banned products left out, the score times the product's boost.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    known = indices >= 0
    relevance = np.zeros(len(indices))
    relevance[known] = pair_scores(artifact, indptr, indices, counts, rows[known], indices[known], vectors)
    combined = _share_of_row_max(relevance, rows, n) + _share_of_row_max(counts, rows, n)
    item_rules = rules_for(artifact, rules)
    boost, banned = boost_of(item_rules), banned_of(item_rules)
    if boost is not None:
        combined[known] *= boost[indices[known]]
    if banned is not None:
        known[known] = ~banned[indices[known]]
    return scoring.top_k_of_triples(rows[known], indices[known], combined[known], n, k)


def pair_scores(artifact, indptr, indices, counts, rows: np.ndarray, items: np.ndarray,
                vectors: np.ndarray | None = None) -> np.ndarray:
    """The model's score of ``items[j]`` for customer ``rows[j]`` (float64), as the ranking uses it
    before any popularity penalty (what the customer buys again is not a discovery)."""
    model_type = artifact.model_type
    rows, items = np.asarray(rows, dtype=np.int64), np.asarray(items, dtype=np.int64)
    if model_type == POPULARITY or len(rows) == 0:
        return np.asarray(artifact.popularity, dtype=np.float64)[items]
    if model_type == "item_knn":
        return knn_pair_scores(item_neighbours_of(artifact), indptr, indices, counts, knn_params(artifact).weighting,
                               rows, items)
    if vectors is None:
        vectors = user_vectors(artifact, np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64),
                               np.asarray(counts, dtype=np.float32))
    item_factors = artifact.item_factors
    if model_type == "blend":
        vectors, item_factors = blend_factors(vectors, item_factors, artifact.popularity,
                                              float(artifact.params.get("blend_weight", 1.0)))
    return np.einsum("ij,ij->i", vectors[rows].astype(np.float64), item_factors[items].astype(np.float64))


def _share_of_row_max(values: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Each value over its row's largest value (0 where that is not positive)."""
    top = np.full(n_rows, -np.inf)
    np.maximum.at(top, rows, values)
    scale = top[rows]
    return np.where(scale > 0, values / np.where(scale > 0, scale, 1.0), 0.0)


# ------------------------------------------------------------------------------------ item-kNN

def knn_params(artifact) -> KnnParams:
    """The artifact's neighbour-table settings (``models.neighbours``)."""
    return KnnParams.from_params(artifact.params or {})


def item_neighbours_of(artifact):
    """The artifact's neighbour table: the stored one, or built once from its trained purchases
    (evaluation artifacts, and versions written before the table was stored)."""
    if getattr(artifact, "item_neighbours", None) is not None:
        return artifact.item_neighbours
    params = knn_params(artifact)
    cache = _cache(artifact)
    key = _neighbours_key(params)
    if key not in cache:
        trained_indptr, trained_indices, trained_counts = artifact.user_items
        cache[key] = item_neighbours(trained_indptr, trained_indices, trained_counts, artifact.n_items, params)
    return cache[key]


def give_neighbours(artifact, params: KnnParams, table) -> None:
    """Let ``item_neighbours_of`` find ``table`` for ``params`` on this artifact (and its shallow
    copies) instead of building it from the artifact's own purchases."""
    _cache(artifact)[_neighbours_key(params)] = table


def _neighbours_key(params: KnnParams) -> tuple:
    return ("neighbours", params)


def _knn_top_k(artifact, indptr, indices, counts, k, excluded, item_rules: ItemRules | None = None):
    banned = banned_of(item_rules)
    popularity = boosted(artifact.popularity, item_rules)

    def fill(k_: int, exclude):
        return scoring.popularity_top_k(popularity, k_, exclude=exclude, banned=banned)

    return knn_top_k(_ranked_neighbours(artifact, item_rules), indptr, indices, counts, k,
                     knn_params(artifact).weighting, excluded, fill, banned=banned)


def _ranked_item_factors(artifact, item_rules: ItemRules | None = None) -> np.ndarray:
    """The item factors ALS ranks with: the artifact's, or scaled by the popularity penalty and the
    business rules' boost (cached)."""
    beta, boost = popularity_bias.penalty_of(artifact.params), boost_of(item_rules)
    if not beta and boost is None:
        return artifact.item_factors
    cache = _cache(artifact)
    key = ("penalized_factors", beta) if boost is None else (RULED, "factors", beta)
    if key not in cache:
        cache[key] = popularity_bias.scaled_factors(artifact.item_factors, _multiplier(artifact, beta, boost))
    return cache[key]


def _ranked_neighbours(artifact, item_rules: ItemRules | None = None):
    """The neighbour table item-kNN ranks with: the model's, or its columns scaled by the popularity
    penalty and the business rules' boost (cached)."""
    table, beta, boost = item_neighbours_of(artifact), popularity_bias.penalty_of(artifact.params), boost_of(item_rules)
    if not beta and boost is None:
        return table
    cache, params_key = _cache(artifact), _neighbours_key(knn_params(artifact))
    key = ("penalized_table", params_key, beta) if boost is None else (RULED, "table", params_key, beta)
    if key not in cache:
        cache[key] = popularity_bias.scaled_table(table, _multiplier(artifact, beta, boost))
    return cache[key]


# ------------------------------------------------------------------------------ business rules

def rules_for(artifact, rules: BusinessRules | None) -> ItemRules | None:
    """``rules`` over the artifact's items, cached per artifact (``business_rules.aligned``)."""
    return None if rules is None else aligned(rules, _cache(artifact), artifact.item_index, artifact.n_items)


def _multiplier(artifact, beta: float, boost: np.ndarray | None) -> np.ndarray:
    """Each product's score multiplier: the popularity penalty times the boost."""
    penalty = popularity_bias.multipliers(artifact.popularity, beta) if beta else None
    if boost is None:
        return penalty
    return boost if penalty is None else penalty * boost


# ----------------------------------------------------------------------------------- internals

def _rows(indptr, indices, counts, rows):
    """The CSR of ``rows`` only, in their order: (indptr, indices, counts)."""
    return scoring.csr_rows(indptr, rows, indices, counts)


def _cache(artifact) -> dict:
    """Per-artifact precomputations (gramian, item similarity), computed once per loaded model."""
    cache: dict | None = getattr(artifact, "_scorer_cache", None)
    if cache is None:
        cache = {}
        artifact._scorer_cache = cache
    return cache
