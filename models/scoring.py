"""The scoring math shared by the batch and the streaming job: fold-in and top-k.

Both jobs must turn the same purchases into the same recommendations, so the one copy of the
math lives here and runs on plain numpy arrays (no Spark needed to score).

``fold_in`` recomputes a customer's factor vector from their purchases the way Spark ML's ALS
computes user factors from fixed item factors (``ALS.computeFactors`` with the Cholesky solver):

* implicit prefs: ``(YtY + sum_i c_i y_i y_i^T + lambda * n_u * I) x = sum_{r_i > 0} (1 + c_i) y_i``
  with ``c_i = alpha * |r_i|``, ``YtY`` over every item factor and ``n_u`` the number of the
  customer's ratings that are > 0;
* explicit: ``(sum_i y_i y_i^T + lambda * n_u * I) x = sum_i r_i y_i`` with ``n_u`` all ratings.

Spark accumulates in double precision from float32 factors and returns float32; so does this.
For a customer Spark trained on, folding in their training ratings against the final item
factors reproduces Spark's user factors (the last ALS half-step is exactly this solve).
"""
from __future__ import annotations

import numpy as np

Csr = tuple[np.ndarray, np.ndarray]   # (indptr, indices): one row per user

# Entries (users x padded items) gathered at once by fold_in: bounds memory at ~32 MB per array
# at rank 64 whatever the spread of basket sizes.
_FOLD_IN_BUDGET = 65_536
# Scores held at once by top_k (users x items, float32): ~64 MB.
_TOP_K_BUDGET = 16_777_216
# Items per chunk for the chunk-maximum threshold of top_k.
_CHUNK = 64


def gramian(item_factors: np.ndarray) -> np.ndarray:
    """``YtY`` in double precision; pass it to ``fold_in`` to compute it once per model."""
    factors = np.asarray(item_factors, dtype=np.float64)
    return factors.T @ factors


def fitted_items(item_factors: np.ndarray) -> np.ndarray:
    """Which products the fit saw (a non-zero factor row); pass it to ``fold_in`` to scan once per model."""
    return np.asarray(item_factors).any(axis=1)


def fold_in(item_factors: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
            reg_param: float, alpha: float, implicit: bool = True,
            gram: np.ndarray | None = None, fitted: np.ndarray | None = None) -> np.ndarray:
    """Each user's factor vector (float32 [n_users, rank]) from their ratings, as Spark ALS does.

    ``indptr``/``indices``/``values`` are the users' ratings in CSR form (``values`` already
    transformed by ``models.scaling.als_ratings``). Entries with a negative item index (unknown products) or
    an all-zero factor row (products the fit did not see: new ones, or ones it left out, see
    ``batch.als.min_item_customers``) are ignored, as Spark's user step never saw them: they would
    add nothing but the regularisation Spark scales by each user's number of ratings. Users with no
    usable rating get a zero vector: callers fall back to popularity.
    ``gram`` is ``gramian(item_factors)`` when the caller keeps it (implicit mode only), ``fitted``
    likewise ``fitted_items(item_factors)``.
    """
    item_factors = np.asarray(item_factors, dtype=np.float32)
    indptr, indices, values = _check_csr(indptr, indices, values, item_factors.shape[0])
    n_users, rank = len(indptr) - 1, item_factors.shape[1]
    result = np.zeros((n_users, rank), dtype=np.float32)
    if n_users == 0 or rank == 0:
        return result
    known = indices >= 0
    fitted = fitted_items(item_factors) if fitted is None else fitted
    known[known] = fitted[indices[known]]
    if not known.all():   # drop unknown items, keep the CSR row boundaries
        row_of = np.repeat(np.arange(n_users), np.diff(indptr))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[known], minlength=n_users))])
        indices, values = indices[known], values[known]
    if implicit:
        gram = gramian(item_factors) if gram is None else np.asarray(gram, dtype=np.float64)
        if gram.shape != (rank, rank):
            raise ValueError(f"gram has shape {gram.shape}, expected ({rank}, {rank}) for these item factors")
    lengths = np.diff(indptr)
    order = np.argsort(lengths, kind="stable")   # similar lengths together: little padding
    start = int(np.searchsorted(lengths[order], 1))
    for chunk in _length_chunks(lengths[order[start:]]):
        users = order[start:][chunk]
        result[users] = _solve_chunk(item_factors, indptr, indices, values, users,
                                     reg_param, alpha, implicit, gram)
    return result


def _solve_chunk(item_factors, indptr, indices, values, users, reg_param, alpha, implicit, gram):
    """Build and solve the normal equations of ``users`` at once (padded to their longest row)."""
    lengths = indptr[users + 1] - indptr[users]
    width = int(lengths.max())
    offsets = np.arange(width)
    valid = offsets[None, :] < lengths[:, None]
    positions = np.where(valid, indptr[users][:, None] + offsets[None, :], 0)
    factors = item_factors[indices[positions]].astype(np.float64)        # [u, width, rank]
    ratings = np.where(valid, values[positions].astype(np.float64), 0.0)
    rank = item_factors.shape[1]
    if implicit:
        confidence = alpha * np.abs(ratings)                               # c1 = confidence - 1
        positive = ratings > 0
        weights_b = np.where(positive, 1.0 + confidence, 0.0)
        a = gram[None] + np.matmul(np.swapaxes(factors * confidence[..., None], 1, 2), factors)
        n_explicit = positive.sum(axis=1)
    else:
        weights_b = ratings
        a = np.matmul(np.swapaxes(factors * valid[..., None], 1, 2), factors)   # padding rows weigh 0
        n_explicit = lengths
    b = np.einsum("ul,ulr->ur", weights_b, factors)
    a[:, np.arange(rank), np.arange(rank)] += (reg_param * n_explicit)[:, None]
    solution = np.zeros((len(users), rank))
    solvable = n_explicit > 0   # no positive rating: b = 0, Spark's solution is 0 too
    if solvable.any():
        solution[solvable] = np.linalg.solve(a[solvable], b[solvable][..., None])[..., 0]
    return solution.astype(np.float32)


def _length_chunks(sorted_lengths: np.ndarray):
    """Slices of ascending row lengths whose padded size stays within the memory budget."""
    begin, total = 0, len(sorted_lengths)
    while begin < total:
        end = min(total, begin + 4096)
        while end - begin > 1 and (end - begin) * int(sorted_lengths[end - 1]) > _FOLD_IN_BUDGET:
            end = begin + max(1, _FOLD_IN_BUDGET // int(sorted_lengths[end - 1]))
        yield slice(begin, end)
        begin = end


def top_k(user_vectors: np.ndarray, item_factors: np.ndarray, k: int, exclude: Csr | None = None,
          block_size: int | None = None, banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items per user by dot product: (item_idx int32 [n, k], scores float32 [n, k]).

    Ranked by higher score, then lower item index, so equal scores always come out in the same
    order. ``exclude`` is a CSR (indptr, indices) of items never to return for each user (negative
    indices = unknown products, ignored); ``banned`` a bool mask of items never to return for
    anyone (models.business_rules). Rows with fewer than ``k`` candidates are padded with
    item -1 and score NaN. Users are scored ``block_size`` at a time (default: ~64 MB of scores)
    with one matrix product per block.
    """
    users = np.asarray(user_vectors, dtype=np.float32)
    items = np.ascontiguousarray(item_factors, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"user vectors {users.shape} and item factors {items.shape} must be 2-D "
                         "with the same rank")
    _check_k(k)
    n_users, n_items = users.shape[0], items.shape[0]
    if exclude is not None:
        exclude = _check_exclude(exclude, n_users, n_items)
    block = block_size or max(1, _TOP_K_BUDGET // max(n_items, 1))
    banned_idx = None if banned is None else np.flatnonzero(_check_banned(banned, n_items))
    item_idx = np.full((n_users, k), -1, dtype=np.int32)
    scores = np.full((n_users, k), np.nan, dtype=np.float32)
    n_padded = -(-n_items // _CHUNK) * _CHUNK
    buffer = np.empty((n_padded, min(block, n_users)), dtype=np.float32)
    for begin in range(0, n_users, block):
        end = min(n_users, begin + block)
        # Item-major scores [n_items (padded), users]: the chunk maxima then reduce along a middle
        # axis with the users contiguous, which vectorises far better than along rows.
        block_scores = buffer[:, :end - begin] if end - begin < buffer.shape[1] else buffer
        np.matmul(items, users[begin:end].T, out=block_scores[:n_items])
        block_scores[n_items:] = -np.inf
        if exclude is not None:
            _mask_excluded(block_scores, exclude, begin, end)
        if banned_idx is not None:
            block_scores[banned_idx] = -np.inf
        item_idx[begin:end], scores[begin:end] = _select_top(block_scores, n_items, k)
    return item_idx, scores


def popularity_top_k(popularity: np.ndarray, k: int, exclude: Csr | None = None,
                     banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most popular items: one row, or one row per user of ``exclude`` without them.

    Same conventions as ``top_k`` (ties by lower item index, -1/NaN padding, ``banned`` items
    never listed); the scores are the popularity values.
    """
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.ndim != 1:
        raise ValueError(f"popularity must be 1-D (one value per item), got shape {popularity.shape}")
    _check_k(k)
    n_items = popularity.shape[0]
    order = popularity_order(popularity)
    if banned is not None:
        order = order[~_check_banned(banned, n_items)[order]]
    if exclude is None:
        item_idx = np.full((1, k), -1, dtype=np.int32)
        scores = np.full((1, k), np.nan, dtype=np.float32)
        best = order[:k]
        item_idx[0, :len(best)], scores[0, :len(best)] = best, popularity[best]
        return item_idx, scores
    indptr, indices = _check_exclude(exclude, None, n_items)
    n_users = len(indptr) - 1
    lengths = np.diff(indptr)
    # Each user needs at most k + (their excluded items) of the global ranking.
    depth = min(len(order), k + (int(lengths.max()) if n_users else 0))
    candidates = np.broadcast_to(order[:depth], (n_users, depth))
    rows = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    excluded_codes = np.unique(rows * n_items + indices)
    keep = ~np.isin(np.arange(n_users, dtype=np.int64)[:, None] * n_items + candidates, excluded_codes)
    rank_in_row = np.cumsum(keep, axis=1) - 1
    take = keep & (rank_in_row < k)
    item_idx = np.full((n_users, k), -1, dtype=np.int32)
    scores = np.full((n_users, k), np.nan, dtype=np.float32)
    row_ids, col_ids = np.nonzero(take)
    item_idx[row_ids, rank_in_row[row_ids, col_ids]] = candidates[row_ids, col_ids]
    scores[row_ids, rank_in_row[row_ids, col_ids]] = popularity[candidates[row_ids, col_ids]]
    return item_idx, scores


def popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Item indices by descending popularity, ties by lower item index."""
    popularity = np.asarray(popularity, dtype=np.float64)
    return np.lexsort((np.arange(popularity.shape[0]), -popularity)).astype(np.int32)


def _select_top(block_scores: np.ndarray, n_items: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each column of item-major scores [n_padded, users], deterministic under ties.

    Each item chunk's maximum bounds its items; the k-th best chunk maximum is a threshold no
    higher than the column's k-th best score (k chunks hold an item at least that good), so only
    the chunks reaching it can hold the top k. Every item reaching it (ties included) is then
    sorted exactly: one pass over the scores instead of a partition of every column.
    """
    n_padded, n_rows = block_scores.shape
    n_chunks = n_padded // _CHUNK
    chunk_max = block_scores.reshape(n_chunks, _CHUNK, n_rows).max(axis=1).T    # [users, chunks]
    if n_chunks >= k:
        threshold = np.partition(chunk_max, n_chunks - k, axis=1)[:, n_chunks - k]
    else:
        threshold = np.full(n_rows, -np.inf, dtype=np.float32)
    rows, chunks = np.nonzero(chunk_max >= threshold[:, None])
    cols = chunks[:, None] * _CHUNK + np.arange(_CHUNK)[None, :]               # [m, chunk]
    rows = np.broadcast_to(rows[:, None], cols.shape)
    values = block_scores[cols, rows]
    keep = (values >= threshold[rows]) & np.isfinite(values)
    rows, cols, values = rows[keep], cols[keep], values[keep]
    return top_k_of_triples(rows, cols, values, n_rows, k)


def _mask_excluded(block_scores: np.ndarray, exclude: Csr, begin: int, end: int) -> None:
    indptr, indices = exclude
    lo, hi = indptr[begin], indptr[end]
    rows = np.repeat(np.arange(end - begin), np.diff(indptr[begin:end + 1]))
    cols = indices[lo:hi]
    known = cols >= 0
    block_scores[cols[known], rows[known]] = -np.inf


def _check_banned(banned: np.ndarray, n_items: int) -> np.ndarray:
    banned = np.asarray(banned, dtype=bool)
    if banned.shape != (n_items,):
        raise ValueError(f"banned must be one flag per item ({n_items}), got shape {banned.shape}")
    return banned


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_exclude(exclude: Csr, n_users: int | None, n_items: int) -> Csr:
    try:
        indptr, indices = exclude
    except (TypeError, ValueError):
        raise ValueError("exclude must be a CSR pair (indptr, indices) with one row per user") from None
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if n_users is not None and len(indptr) != n_users + 1:
        raise ValueError(f"exclude has {len(indptr) - 1} rows, expected one per user ({n_users})")
    _check_csr_shape(indptr, indices, n_items)
    return indptr, indices


def _check_csr(indptr, indices, values, n_items: int):
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    if len(values) != len(indices):
        raise ValueError(f"CSR values ({len(values)}) and indices ({len(indices)}) differ in length")
    _check_csr_shape(indptr, indices, n_items)
    return indptr, indices, values


def _check_csr_shape(indptr: np.ndarray, indices: np.ndarray, n_items: int) -> None:
    if indptr.ndim != 1 or len(indptr) == 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) \
            or indptr[-1] != len(indices):
        raise ValueError(f"invalid CSR: indptr must start at 0, never decrease and end at the number "
                         f"of indices ({len(indices)})")
    if len(indices) and indices.max() >= n_items:
        raise ValueError(f"CSR item index {int(indices.max())} is out of range for {n_items} items")


def top_k_of_triples(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (col, value) per row from unordered triples, as padded [n_rows, k] matrices.

    Ranked by value descending, ties by lower column; -1 / NaN pad rows with fewer than k.
    """
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    rank_in_row = np.arange(len(rows)) - np.searchsorted(rows, np.arange(n_rows))[rows]
    take = rank_in_row < k
    item_idx = np.full((n_rows, k), -1, dtype=np.int32)
    scores = np.full((n_rows, k), np.nan, dtype=np.float32)
    item_idx[rows[take], rank_in_row[take]] = cols[take]
    scores[rows[take], rank_in_row[take]] = values[take]
    return item_idx, scores


def csr_rows(indptr: np.ndarray, rows: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """The CSR restricted to ``rows``, in their order: (indptr, column[take] for each column)."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    sub_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = np.repeat(starts - sub_indptr[:-1], lengths) + np.arange(sub_indptr[-1])
    return (sub_indptr, *(column[take] for column in columns))
