"""Item-kNN's neighbour table: each product's N most similar products, as a sparse matrix.

A dense item-item matrix needs n_items² floats (30 GiB at 90k products), so item-kNN keeps only
the ``neighbours`` best of each row (scipy.sparse CSR, float32, zero diagonal). The similarity of
items i and j comes from the customers who bought both:

* ``cosine``: binary purchases, ``co(i, j) / sqrt(buyers(i) * buyers(j))``; a customer's score for
  j is the sum over the products they bought of ``S[bought, j]``.
* ``bm25``: the purchase counts weighted as in Okapi BM25 with the products as documents and the
  customers as terms (as the ``implicit`` library's BM25 item-kNN does): a customer who buys
  everything counts less (idf), and so does a repeat purchase of a product bought in bulk (k1, b).
  ``S = W^T W``; a customer's score for j is the sum of their counts times ``S[bought, j]``.

Ties keep the lower item index, so every path that builds the table (here from a CSR of purchases,
or Spark's on the executors, ``batch_training.executor_eval.item_neighbours_on_executors``) gives
the same lists. scipy.sparse does the products: it is what a hand-written loop would redo, slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.scaling import bm25_idf, bm25_norm, bm25_weight

WEIGHTINGS = ("cosine", "bm25")
# Customers' score rows built at once (entries of purchases x neighbours): bounds a block's memory.
_SCORE_BUDGET = 8_000_000
# Product rows of the co-occurrence built at once (entries): bounds the build's memory.
_BUILD_BUDGET = 20_000_000


@dataclass(frozen=True)
class KnnParams:
    """How the neighbour table is built (``batch.scorers.knn``); the model's params keep them."""

    neighbours: int | None = None      # None: every co-bought product (versions before the table)
    weighting: str = "cosine"
    k1: float = 1.2
    b: float = 0.75
    # Built from every ``stride``-th customer (by user index) of more than this many: the pairs a
    # customer adds grow with the square of their products, and a million customers' co-purchases
    # already rank the neighbours stably. None: everyone.
    max_customers: int | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"item-kNN weighting {self.weighting!r}: use one of {list(WEIGHTINGS)}")
        if self.neighbours is not None and (not isinstance(self.neighbours, int) or self.neighbours < 1):
            raise ValueError(f"item-kNN neighbours {self.neighbours!r}: use a whole number >= 1")
        if self.max_customers is not None and self.max_customers < 1:
            raise ValueError(f"item-kNN max_customers {self.max_customers!r}: use a whole number >= 1")
        if self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise ValueError(f"item-kNN bm25 k1={self.k1}, b={self.b}: use k1 >= 0 and b in [0, 1]")

    def as_params(self) -> dict:
        params = {"knn_neighbours": self.neighbours, "knn_weighting": self.weighting}
        if self.max_customers is not None:
            params["knn_max_customers"] = self.max_customers
        if self.weighting == "bm25":
            params.update(bm25_k1=self.k1, bm25_b=self.b)
        return params

    @classmethod
    def from_params(cls, params: dict) -> KnnParams:
        """The table's settings from a model's params; versions without them get every neighbour."""
        return cls(neighbours=params.get("knn_neighbours"), weighting=params.get("knn_weighting") or "cosine",
                   k1=float(params.get("bm25_k1", cls.k1)), b=float(params.get("bm25_b", cls.b)),
                   max_customers=params.get("knn_max_customers"))

    def stride(self, n_users: int) -> int:
        """The table is built from the customers whose user index is a multiple of this."""
        return 1 if self.max_customers is None else max(1, -(-n_users // self.max_customers))


def purchase_matrix(indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, n_items: int,
                    weighting: str):
    """Customers x products (CSR): 1 per purchased product for cosine, the counts for bm25
    (unknown products, index < 0, dropped; a repeated index summed)."""
    import scipy.sparse as sp

    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    known = indices >= 0
    values = np.asarray(counts, dtype=np.float64)[known] if weighting == "bm25" else np.ones(int(known.sum()))
    matrix = sp.csr_matrix((values, (rows[known], indices[known])), shape=(len(indptr) - 1, n_items))
    matrix.sum_duplicates()
    if weighting != "bm25":
        matrix.data[:] = 1.0
    return matrix


def bm25_weights(matrix, k1: float, b: float):
    """``matrix`` (customers x products, counts) weighted by BM25, products as the documents
    (models.scaling holds the formula; the lengths here are the products' summed counts)."""
    weighted = matrix.tocoo(copy=True)
    idf = bm25_idf(matrix.shape[1], np.bincount(weighted.row, minlength=matrix.shape[0]))
    norm = bm25_norm(np.bincount(weighted.col, weights=weighted.data, minlength=matrix.shape[1]), b)
    weighted.data = bm25_weight(weighted.data, norm[weighted.col], idf[weighted.row], k1)
    return weighted.tocsr()


def item_neighbours(indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, n_items: int,
                    params: KnnParams):
    """The neighbour table (float32 CSR [n_items, n_items]) of these customers' purchases."""
    matrix = purchase_matrix(indptr, indices, counts, n_items, params.weighting)
    stride = params.stride(matrix.shape[0])
    if stride > 1:
        matrix = matrix[::stride]
    if params.weighting == "bm25":
        matrix = bm25_weights(matrix, params.k1, params.b)
    by_item = matrix.T.tocsr()
    buyers = np.diff(by_item.indptr).astype(np.int64)
    # A product row's co-occurrence: at most its buyers times their mean basket.
    mean_basket = max(1, int(matrix.nnz / max(matrix.shape[0], 1)))
    blocks = []
    for begin, end in _budget_blocks(buyers * mean_basket, _BUILD_BUDGET):
        co = (by_item[begin:end] @ matrix).tocsr()
        co.sort_indices()
        co = co.tocoo()
        rows, cols, values = co.row.astype(np.int64) + begin, co.col.astype(np.int64), co.data
        if params.weighting == "cosine":
            values = values / np.sqrt(buyers[rows].astype(np.float64) * buyers[cols])
        blocks.append(top_per_row(rows, cols, values, params.neighbours))
    rows, cols, values = (np.concatenate(parts) for parts in zip(*blocks)) if blocks else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    return from_triplets(rows, cols, values, n_items)


def top_per_row(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, neighbours: int | None,
                off_diagonal: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``neighbours`` largest positive values of each row (off the diagonal: an item is not its
    own neighbour), ties to the lower column; sorted by row, then rank.

    The entries must come ordered by row, then column (a CSR's with sorted indices). Each row is
    cut with a partition and only its kept entries sorted: a global three-key sort of the tens of
    millions of co-occurrence cells took most of the build.
    """
    keep = values > 0
    if off_diagonal:
        keep &= rows != cols
    rows, cols, values = rows[keep], cols[keep], values[keep]
    if not len(rows):
        return rows, cols, values
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    order = [_row_order(values, start, end, neighbours) for start, end in zip(starts, ends)]
    order = np.concatenate(order)
    return rows[order], cols[order], values[order]


def _row_order(values: np.ndarray, start: int, end: int, neighbours: int | None) -> np.ndarray:
    """Positions of one row's kept entries, best first (its columns ascend, so a stable sort on the
    value breaks ties by column)."""
    segment = values[start:end]
    if neighbours is not None and len(segment) > neighbours:
        cut = np.partition(segment, len(segment) - neighbours)[len(segment) - neighbours]
        above = np.flatnonzero(segment > cut)
        ties = np.flatnonzero(segment == cut)[:neighbours - len(above)]
        chosen = np.sort(np.concatenate([above, ties]))
    else:
        chosen = np.arange(len(segment))
    return start + chosen[np.argsort(-segment[chosen], kind="stable")]


def from_triplets(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_items: int):
    """The float32 CSR of (row, col, value) triplets, one per cell (the stored file's layout)."""
    import scipy.sparse as sp

    table = sp.csr_matrix((np.asarray(values, dtype=np.float32), (np.asarray(rows, dtype=np.int64),
                                                                  np.asarray(cols, dtype=np.int64))),
                          shape=(n_items, n_items))
    table.sort_indices()
    return table


def knn_scores(table, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, weighting: str):
    """Customers x products scores (CSR, float64): the bought products' rows of the table summed,
    weighted by the counts for bm25."""
    matrix = purchase_matrix(indptr, indices, counts, table.shape[0], weighting)
    return (matrix @ table.astype(np.float64)).tocsr()


def knn_top_k(table, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, k: int, weighting: str,
              exclude: tuple[np.ndarray, np.ndarray] | None, fill,
              banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per customer by summed similarity; a list the neighbours leave short is completed by
    ``fill(k, excluded_csr)`` (the best sellers not yet listed, score 0; it must leave out the
    ``banned`` items too). ``banned``: a bool mask of items never listed (models.business_rules).
    Blocks of customers keep the score rows within ``_SCORE_BUDGET`` entries."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    n_users = len(indptr) - 1
    item_idx = np.full((n_users, k), -1, dtype=np.int32)
    scores = np.full((n_users, k), np.nan, dtype=np.float32)
    for begin, end in _customer_blocks(table, indptr, indices):
        _block_top_k(table, indptr, indices, counts, begin, end, k, weighting, exclude, item_idx, scores, banned)
    short = np.flatnonzero((item_idx == -1).any(axis=1))
    if len(short):
        _complete(short, item_idx, scores, exclude, fill, k)
    return item_idx, scores


def knn_pair_scores(table, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray, weighting: str,
                    rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The score of ``items[j]`` for customer ``rows[j]`` (float64), as ``knn_top_k`` ranks it."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    rows, items = np.asarray(rows, dtype=np.int64), np.asarray(items, dtype=np.int64)
    result = np.zeros(len(rows))
    for begin, end in _customer_blocks(table, indptr, indices):
        wanted = (rows >= begin) & (rows < end)
        if wanted.any():
            lo, hi = indptr[begin], indptr[end]
            block = knn_scores(table, indptr[begin:end + 1] - lo, indices[lo:hi], np.asarray(counts)[lo:hi], weighting)
            result[wanted] = np.asarray(block[rows[wanted] - begin, items[wanted]]).ravel()
    return result


def _customer_blocks(table, indptr: np.ndarray, indices: np.ndarray):
    """(begin, end) ranges of customers whose score rows hold about ``_SCORE_BUDGET`` entries."""
    row_len = np.diff(table.indptr).astype(np.int64)
    entries = np.where(indices >= 0, row_len[np.clip(indices, 0, None)], 0) if len(indices) else np.zeros(0, np.int64)
    return _budget_blocks(np.diff(np.r_[0, np.cumsum(entries)][indptr]), _SCORE_BUDGET)


def _budget_blocks(cost: np.ndarray, budget: int):
    """Consecutive (begin, end) ranges of rows whose summed ``cost`` stays within ``budget`` (a row
    over it alone makes a range of one)."""
    total = np.r_[0, np.cumsum(cost)]
    begin = 0
    while begin < len(cost):
        end = int(np.searchsorted(total, total[begin] + budget, side="right")) - 1
        end = min(len(cost), max(begin + 1, end))
        yield begin, end
        begin = end


def _block_top_k(table, indptr, indices, counts, begin, end, k, weighting, exclude, item_idx, scores,
                 banned=None) -> None:
    lo, hi = indptr[begin], indptr[end]
    block = knn_scores(table, indptr[begin:end + 1] - lo, indices[lo:hi], np.asarray(counts)[lo:hi], weighting)
    block.sort_indices()
    block = block.tocoo()
    rows, cols, values = block.row.astype(np.int64), block.col.astype(np.int64), block.data
    if exclude is not None:
        ex_indptr, ex_indices = (np.asarray(a, dtype=np.int64) for a in exclude)
        ex_rows = np.repeat(np.arange(end - begin), np.diff(ex_indptr[begin:end + 1]))
        ex_cols = ex_indices[ex_indptr[begin]:ex_indptr[end]]
        n_items = table.shape[0]
        keep = ~np.isin(rows * n_items + cols, ex_rows * n_items + ex_cols)
        rows, cols, values = rows[keep], cols[keep], values[keep]
    if banned is not None:
        keep = ~np.asarray(banned, dtype=bool)[cols]
        rows, cols, values = rows[keep], cols[keep], values[keep]
    rows, cols, values = top_per_row(rows, cols, values, k, off_diagonal=False)
    rows_start = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    rank = np.arange(len(rows)) - np.repeat(rows_start, np.diff(np.r_[rows_start, len(rows)]))
    item_idx[begin + rows, rank] = cols
    scores[begin + rows, rank] = values


def _complete(short: np.ndarray, item_idx, scores, exclude, fill, k: int) -> None:
    """Fill the short lists' empty places with ``fill``'s items, skipping the listed and excluded."""
    listed = item_idx[short]
    taken = [row[row >= 0] for row in listed]
    if exclude is not None:
        ex_indptr, ex_indices = exclude
        taken = [np.concatenate([t, ex_indices[ex_indptr[u]:ex_indptr[u + 1]]]) for t, u in zip(taken, short)]
    lengths = np.array([len(t) for t in taken], dtype=np.int64)
    csr = (np.r_[0, np.cumsum(lengths)], np.concatenate(taken) if len(taken) else np.zeros(0, np.int64))
    extra_idx, _ = fill(k, csr)
    for row_no, user in enumerate(short):
        have = int((item_idx[user] >= 0).sum())
        more = extra_idx[row_no][extra_idx[row_no] >= 0][:k - have]
        item_idx[user, have:have + len(more)] = more
        scores[user, have:have + len(more)] = 0.0
