"""Ranking and beyond-accuracy metrics of top-k recommendations (pure numpy, no Spark).

Purchases are implicit feedback: what matters is whether the items a customer bought next are near
the top of their list, not how well a score approximates a count. So the ranking metrics are the
headline and RMSE is kept only for explicit-rating runs.

Inputs shared by the functions:
- ``recommended``: int array ``[n_users, k]``, item indices ranked best first; ``-1`` pads lists
  shorter than k (a padded slot is never a hit and is never counted as an item).
- the relevant (held-out) items per user in CSR form: ``rel_indptr`` (length ``n_users + 1``) and
  ``rel_indices``, row ``u`` holding ``rel_indices[rel_indptr[u]:rel_indptr[u + 1]]``, aligned
  with the rows of ``recommended``. Duplicates within a row count once; a list should not repeat
  an item (a repeat counts as a second hit, as in Spark).

Definitions at cut-off k, for a user with relevant set R (|R| >= 1) and hit_i = 1 when the item at
rank i (1-based) is in R:
- precision@k = (sum_{i<=k} hit_i) / k   (k, not the list length: a short list is penalised)
- recall@k    = (sum_{i<=k} hit_i) / |R|
- AP@k        = (1 / min(|R|, k)) * sum_{i<=k, hit_i=1} precision@i
                (as Spark's ``RankingMetrics.meanAveragePrecisionAt``)
- nDCG@k      = DCG@k / IDCG@k with binary gains and a log2(i + 1) discount:
                DCG@k = sum_{i<=k} hit_i / log2(i + 1), IDCG@k = sum_{i<=min(|R|,k)} 1 / log2(i + 1)
Each is averaged over the users with at least one relevant item; the others carry no signal
(Spark would count them as zeros) and are skipped.
"""
from __future__ import annotations

import numpy as np

RANKING_METRICS = ("precision", "recall", "map", "ndcg")
PADDING = -1
# Lists are processed in blocks of this many users when a [users, k, factors] array is needed.
_DIVERSITY_BLOCK_USERS = 8192


def ranking_metrics(recommended: np.ndarray, rel_indptr: np.ndarray, rel_indices: np.ndarray,
                    k: int = 10) -> dict[str, float]:
    """precision, recall, map and ndcg at k, averaged over users with relevant items, and ``users``.

    The metrics are nan when no user has a relevant item (nothing was measured).
    """
    top = _top_k(recommended, k)
    rel_indptr, rel_indices = _check_csr(rel_indptr, rel_indices, n_rows=top.shape[0])
    hits, n_relevant = _hit_matrix(top, rel_indptr, rel_indices)
    scored = n_relevant > 0
    hits, n_relevant = hits[scored], n_relevant[scored]
    if hits.shape[0] == 0:
        return {**{name: float("nan") for name in RANKING_METRICS}, "users": 0}

    ranks = np.arange(1, k + 1)
    n_hits = hits.sum(axis=1)
    precision_at_rank = np.cumsum(hits, axis=1) / ranks
    average_precision = (precision_at_rank * hits).sum(axis=1) / np.minimum(n_relevant, k)
    discount = 1.0 / np.log2(ranks + 1)
    dcg = hits @ discount
    ideal_dcg = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
    return {
        "precision": float(np.mean(n_hits / k)),
        "recall": float(np.mean(n_hits / n_relevant)),
        "map": float(np.mean(average_precision)),
        "ndcg": float(np.mean(dcg / ideal_dcg)),
        "users": int(hits.shape[0]),
    }


def catalog_coverage(recommended: np.ndarray, n_items: int) -> float:
    """Share of the catalogue (``n_items`` items) recommended to at least one user."""
    items = _valid_items(recommended, n_items)
    return float(np.unique(items).size / n_items)


def novelty(recommended: np.ndarray, popularity: np.ndarray, n_users_total: int) -> float:
    """Mean self-information -log2 p(i) of the recommended items, in bits.

    p(i) = popularity[i] / n_users_total is the share of customers who bought item i (popularity
    counts distinct buyers in the training data). High novelty means the lists reach beyond the
    best sellers. An item nobody bought is given one buyer so its information stays finite. The
    value is the mean over lists (with at least one item) of each list's mean.
    """
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.ndim != 1:
        raise ValueError(f"popularity must be one count per item, got shape {popularity.shape}")
    if n_users_total < 1 or np.any(popularity > n_users_total):
        raise ValueError(f"n_users_total={n_users_total} must be >= 1 and >= every popularity count "
                         f"(max {popularity.max(initial=0):g}): pass the number of customers counted")
    top = _as_recommendations(recommended)
    valid = top != PADDING
    _valid_items(top, popularity.size)
    share = np.maximum(popularity, 1.0) / n_users_total
    information = np.where(valid, -np.log2(share[np.where(valid, top, 0)]), 0.0)
    per_list = valid.sum(axis=1)
    listed = per_list > 0
    if not listed.any():
        return float("nan")
    return float(np.mean(information.sum(axis=1)[listed] / per_list[listed]))


def intra_list_diversity(recommended: np.ndarray, item_factors: np.ndarray) -> float:
    """Mean over lists of the mean pairwise cosine distance (1 - cosine similarity) of their items.

    Distances are taken in the model's item-factor space, so 0 means a list of near-duplicates and
    1 means unrelated items. Lists with fewer than two items are skipped (nan when none has two);
    an all-zero factor vector is treated as unrelated to everything (similarity 0).
    """
    factors = np.asarray(item_factors)
    if factors.ndim != 2:
        raise ValueError(f"item_factors must be [n_items, rank], got shape {factors.shape}")
    lists = _as_recommendations(recommended)
    _valid_items(lists, factors.shape[0])
    # Only the listed items' vectors are normalised (lists renumbered to them): a catalogue of a
    # million items would otherwise be copied in float64 on every call, hundreds of MB per task.
    listed, position = np.unique(np.where(lists == PADDING, 0, lists), return_inverse=True)
    top = np.where(lists == PADDING, PADDING, position.reshape(lists.shape))
    used = factors[listed].astype(np.float64)
    norms = np.linalg.norm(used, axis=1, keepdims=True)
    unit = np.divide(used, norms, out=np.zeros_like(used), where=norms > 0)

    distance_sums, pair_counts = [], []
    for start in range(0, top.shape[0], _DIVERSITY_BLOCK_USERS):
        block = top[start:start + _DIVERSITY_BLOCK_USERS]
        valid = block != PADDING
        vectors = unit[np.where(valid, block, 0)] * valid[..., None]
        similarity = np.einsum("uid,ujd->uij", vectors, vectors)
        pair_mask = valid[:, :, None] & valid[:, None, :]
        pair_mask &= ~np.eye(block.shape[1], dtype=bool)
        distance_sums.append(((1.0 - similarity) * pair_mask).sum(axis=(1, 2)) / 2)
        pair_counts.append(pair_mask.sum(axis=(1, 2)) / 2)
    distance_sum, pairs = np.concatenate(distance_sums), np.concatenate(pair_counts)
    scored = pairs > 0
    if not scored.any():
        return float("nan")
    return float(np.mean(distance_sum[scored] / pairs[scored]))


def rmse(pred: np.ndarray, actual: np.ndarray) -> float:
    """Root mean squared error, for explicit-rating runs only (meaningless for purchase counts)."""
    pred, actual = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if pred.shape != actual.shape or pred.size == 0:
        raise ValueError(f"pred {pred.shape} and actual {actual.shape} must have the same, non-empty "
                         "shape")
    if not (np.isfinite(pred).all() and np.isfinite(actual).all()):
        raise ValueError("pred and actual must be finite: drop the pairs the model cannot score "
                         "(e.g. ALS coldStartStrategy='drop') first")
    return float(np.sqrt(np.mean((pred - actual) ** 2)))


def _as_recommendations(recommended: np.ndarray) -> np.ndarray:
    top = np.asarray(recommended)
    if top.ndim != 2 or not np.issubdtype(top.dtype, np.integer):
        raise ValueError(f"recommended must be an int array [n_users, k], got {top.dtype} "
                         f"of shape {top.shape}")
    if np.any(top < PADDING):
        raise ValueError(f"recommended holds negative item indices other than the padding {PADDING}")
    return top.astype(np.int64, copy=False)


def _top_k(recommended: np.ndarray, k: int) -> np.ndarray:
    """The first k columns; lists shorter than k are padded."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = _as_recommendations(recommended)[:, :k]
    if top.shape[1] < k:
        pad = np.full((top.shape[0], k - top.shape[1]), PADDING, dtype=np.int64)
        top = np.hstack([top, pad])
    return top


def _valid_items(recommended: np.ndarray, n_items: int) -> np.ndarray:
    """The non-padding items, checked to lie in the catalogue."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    top = _as_recommendations(recommended)
    items = top[top != PADDING]
    if items.size and items.max() >= n_items:
        raise ValueError(f"recommended holds item {items.max()} outside the catalogue of {n_items} items")
    return items


def _check_csr(indptr: np.ndarray, indices: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if indptr.shape != (n_rows + 1,) or indptr[0] != 0 or indptr[-1] != indices.size \
            or np.any(np.diff(indptr) < 0):
        raise ValueError(f"rel_indptr must be non-decreasing, of length n_users + 1 = {n_rows + 1}, "
                         f"start at 0 and end at len(rel_indices) = {indices.size}; got length "
                         f"{indptr.size}: build it aligned with the rows of recommended")
    if np.any(indices < 0):
        raise ValueError("rel_indices must be item indices >= 0")
    return indptr, indices


def _hit_matrix(top: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hits[u, i] = 1.0 when top[u, i] is relevant to u, and the number of distinct relevant items.

    Membership is a sorted-key lookup over (row, item) keys, vectorised over all users at once.
    """
    n_rows = top.shape[0]
    width = int(max(indices.max(initial=0), top.max(initial=0))) + 1
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    relevant_keys = np.unique(rows * width + indices)
    n_relevant = np.bincount(relevant_keys // width, minlength=n_rows)
    if relevant_keys.size == 0:
        return np.zeros(top.shape), n_relevant
    wanted = np.arange(n_rows, dtype=np.int64)[:, None] * width + top
    found = np.minimum(np.searchsorted(relevant_keys, wanted), relevant_keys.size - 1)
    is_hit = (top != PADDING) & (relevant_keys[found] == wanted)
    return is_hit.astype(np.float64), n_relevant
