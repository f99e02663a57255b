"""Purchase counts -> ALS ratings: the count transforms both jobs apply the same way.

``params["scaling"]`` names the transform a model was trained with; the batch job's Spark fit
(``batch_training.train.with_ratings``) and every fold-in (``als_ratings``: the CV, the holdout,
the stream) must agree on it bit for bit, or a customer's folded-in vector drifts from the fit's.

* ``none``: the counts as they are.
* ``log``: ``log1p(count)``: a product bought twenty times counts about three times one bought once.
* ``bm25``: Okapi BM25 with the products as documents and the customers as terms, as the
  ``implicit`` library weights ALS input (its ``bm25_weight`` on the items x users matrix):
  ``count * (k1 + 1) / (k1 * norm(product) + count) * idf(customer)`` with
  ``norm = (1 - b) + b * buyers(product) / mean buyers`` and
  ``idf = max(log(n_products / (1 + products the customer bought)), IDF_FLOOR)``.
  A best seller's purchase weighs less than a niche product's (b), repeats saturate (k1), and a
  customer who buys everything says less about each product (idf). A product's length is its
  distinct buyers: the popularity every artifact already carries, so the stream needs nothing
  more to fold a customer in. The idf is floored because Spark's implicit ALS reads a rating
  <= 0 as "not wanted"; only a customer who bought most of a small catalogue reaches the floor.
"""
from __future__ import annotations

import numpy as np

SCALINGS = ("none", "log", "bm25")
# The smallest customer weight of bm25 (see the module docstring).
IDF_FLOOR = 0.01
# bm25's defaults, as the implicit library's ALS example uses them (batch.als.scaling_k1/_b).
BM25_K1 = 100.0
BM25_B = 0.8


def transform_counts(counts: np.ndarray, scaling: str) -> np.ndarray:
    """Counts -> ratings (float32) for the transforms that need nothing but the count.

    Spark computes ``log1p`` in double and casts the rating to float; this does the same so
    training and fold-in see bit-identical ratings.
    """
    values = np.asarray(counts, dtype=np.float64)
    if scaling == "none":
        return values.astype(np.float32)
    if scaling == "log":
        return np.log1p(values).astype(np.float32)
    if scaling == "bm25":
        raise ValueError("bm25 scaling needs the customers' rows and the products' buyers: use als_ratings")
    raise ValueError(f"unknown count scaling {scaling!r}: use one of {SCALINGS}")


def bm25_norm(lengths: np.ndarray, b: float) -> np.ndarray:
    """Each document's length normalisation ``(1 - b) + b * length / mean length`` (float64);
    the mean is over documents of positive length."""
    lengths = np.asarray(lengths, dtype=np.float64)
    positive = lengths > 0
    mean = lengths[positive].sum() / positive.sum() if positive.any() else 1.0
    return (1.0 - b) + b * lengths / mean


def bm25_idf(n_documents: int, terms_per_row: np.ndarray) -> np.ndarray:
    """``log(n_documents / (1 + documents the term occurs in))`` per row (float64, unfloored)."""
    return np.log(float(n_documents) / (1.0 + np.asarray(terms_per_row, dtype=np.float64)))


def bm25_weight(counts: np.ndarray, norm: np.ndarray, idf: np.ndarray, k1: float) -> np.ndarray:
    """BM25's weight of each entry from its count and its document's norm and term's idf (float64).
    The operation order is Spark's in ``with_ratings``: the same doubles on both sides."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts * (k1 + 1.0) / (k1 * norm + counts) * idf


def als_ratings(params: dict, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                buyers: np.ndarray) -> np.ndarray:
    """The ratings a model with these ``params`` trained on, for customers' counts in CSR form
    (``indices`` over the model's products; negative ones are unknown products, rated 0 and
    not counted). ``buyers``: distinct buyers per product in the fit's data (the artifact's
    popularity); its length is the catalogue's size."""
    scaling = str(params.get("scaling", "none"))
    if scaling != "bm25":
        return transform_counts(counts, scaling)
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    known = indices >= 0
    known_per_row = np.diff(np.concatenate([[0], np.cumsum(known)])[indptr])
    idf = np.maximum(bm25_idf(len(buyers), known_per_row), IDF_FLOOR)
    norm = bm25_norm(buyers, float(params.get("scaling_b", BM25_B)))
    entry_norm = np.where(known, norm[np.where(known, indices, 0)], 1.0)
    weights = bm25_weight(counts, entry_norm, np.repeat(idf, np.diff(indptr)), float(params.get("scaling_k1", BM25_K1)))
    return np.where(known, weights, 0.0).astype(np.float32)
