"""Scoring the customers of one micro-batch: fold-in and top-k, vectorised over all of them.

For each customer with new purchases the full purchase counts are the counts the model was
trained on (the artifact's CSR row; none for a customer the model does not know) plus the
purchases since the model's cutoff held in the state. Products the model does not know are kept
in the state but cannot score. The customer's vector is folded in from the model's item factors
with the same code and parameters as training (models.scoring), then ranked by the same top-k the
batch job uses. A customer with no purchase of a known product gets the popularity list.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models import scoring
from models.records import RecommendationRecord, build_records
from streaming.serving import ServingModel

PERSONALIZED = "personalized"
POPULARITY = "popularity"


@dataclass
class Scored:
    customer_ids: np.ndarray
    item_idx: np.ndarray        # int32 [n, k], -1 padded
    scores: np.ndarray          # float32 [n, k], NaN padded
    strategies: list[str]


def purchase_counts(model: ServingModel, customers: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The customers' full purchase counts over the model's items as CSR (indptr, indices, counts).

    ``customers`` has the processor's columns ``customer_id``, ``product_ids``, ``quantities`` and
    ``event_times_ms`` (one row per customer). Purchases at or before the model's cutoff are
    ignored: the model has them already.
    """
    artifact = model.artifact
    n_customers = len(customers)
    users = artifact.user_index(customers["customer_id"].to_numpy())
    trained_indptr, trained_items, trained_counts = artifact.user_items_of(users)
    trained_rows = np.repeat(np.arange(n_customers), np.diff(trained_indptr))

    lengths = customers["product_ids"].map(len).to_numpy()
    stream_rows = np.repeat(np.arange(n_customers), lengths)
    products = np.concatenate([np.asarray(p, dtype=object) for p in customers["product_ids"]]) \
        if lengths.sum() else np.array([], dtype=object)
    times = np.concatenate([np.asarray(t, dtype=np.int64) for t in customers["event_times_ms"]]) \
        if lengths.sum() else np.array([], dtype=np.int64)
    if model.count_mode == "quantity":
        weights = np.concatenate([np.asarray(q, dtype=np.float64) for q in customers["quantities"]]) \
            if lengths.sum() else np.array([], dtype=np.float64)
    else:
        weights = np.ones(len(products), dtype=np.float64)
    items = artifact.item_index(products) if len(products) else np.array([], dtype=np.int64)
    usable = items >= 0
    if model.cutoff_ms is not None:
        usable &= times > model.cutoff_ms

    rows = np.concatenate([trained_rows, stream_rows[usable]]).astype(np.int64)
    cols = np.concatenate([trained_items, items[usable]]).astype(np.int64)
    counts = np.concatenate([trained_counts.astype(np.float64), weights[usable]])
    codes, inverse = np.unique(rows * artifact.n_items + cols, return_inverse=True)
    summed = np.bincount(inverse, weights=counts, minlength=len(codes))
    row_of_code = codes // artifact.n_items
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of_code, minlength=n_customers))]).astype(np.int64)
    return indptr, (codes % artifact.n_items).astype(np.int32), summed.astype(np.float32)


def score_customers(model: ServingModel, customers: pd.DataFrame, k: int, exclude_purchased: bool) -> Scored:
    """Top-k for every customer of the frame (see the module docstring)."""
    artifact = model.artifact
    indptr, indices, counts = purchase_counts(model, customers)
    ratings = scoring.transform_counts(counts, model.scaling)
    vectors = scoring.fold_in(artifact.item_factors, indptr, indices, ratings, model.reg_param, model.alpha,
                              implicit=model.implicit, gram=model.gram)
    personal = np.diff(indptr) > 0       # at least one purchase of a product the model knows
    n = len(customers)
    item_idx = np.full((n, k), -1, dtype=np.int32)
    scores = np.full((n, k), np.nan, dtype=np.float32)
    exclude = _rows(indptr, indices, np.flatnonzero(personal)) if exclude_purchased else None
    if personal.any():
        item_idx[personal], scores[personal] = scoring.top_k(vectors[personal], artifact.item_factors, k,
                                                             exclude=exclude)
    fallback = np.flatnonzero(~personal)
    if len(fallback):
        excluded = _rows(indptr, indices, fallback) if exclude_purchased else None
        top_items, top_scores = scoring.popularity_top_k(artifact.popularity, k, exclude=excluded)
        item_idx[fallback], scores[fallback] = top_items, top_scores   # one row broadcasts
    strategies = [PERSONALIZED if p else POPULARITY for p in personal]
    return Scored(customers["customer_id"].to_numpy(), item_idx, scores, strategies)


def _rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR (indptr, indices) of ``rows`` only, in their order."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    sub_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = np.repeat(starts - sub_indptr[:-1], lengths) + np.arange(sub_indptr[-1])
    return sub_indptr, indices[take]


def records_for(model: ServingModel, customers: pd.DataFrame, scored: Scored,
                computed_at_ms: int) -> list[RecommendationRecord]:
    """The output records: newest event time and offsets reflected, purchases since the cutoff."""
    last_event = [int(max(times)) if len(times) else None for times in customers["event_times_ms"]]
    offsets = [dict(o) if o is not None and len(o) else None for o in customers["source_offsets"]]
    records = build_records(scored.customer_ids, scored.item_idx, scored.scores, model.artifact.item_ids,
                            model.version, scored.strategies, last_event, source="stream",
                            source_offsets=offsets, computed_at_ms=computed_at_ms)
    since_cutoff = [_since_cutoff(times, model.cutoff_ms) for times in customers["event_times_ms"]]
    for record, purchases in zip(records, since_cutoff):
        record.extra["purchases_since_cutoff"] = purchases
    return records


def _since_cutoff(times, cutoff_ms: int | None) -> int:
    times = np.asarray(times, dtype=np.int64)
    return int(len(times) if cutoff_ms is None else (times > cutoff_ms).sum())
