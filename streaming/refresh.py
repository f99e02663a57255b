"""Scoring the customers of one micro-batch, vectorised over all of them, with the batch job's code.

For each customer with new purchases the full purchase counts are the counts the model was
trained on (the artifact's CSR row; none for a customer the model does not know) plus the
purchases since the model's cutoff held in the state, each weighted as the batch job weighted its
training events (``ServingModel.event_weights``: rows or units, recency decay). Products the model
does not know are kept in the state but cannot score. The lists then come from the one scorer
family both jobs use (``models.scorers``: fold-in and top-k for ALS, the blend, item-kNN,
popularity), so a customer with no purchase of a known product gets the popularity list. The
business rules in force (models.business_rules) apply to both lists, as in the batch job.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models import scorers
from models.records import RecommendationRecord, build_records
from streaming.serving import ServingModel


@dataclass
class Scored:
    customer_ids: np.ndarray
    item_idx: np.ndarray        # int32 [n, k], -1 padded
    scores: np.ndarray          # float32 [n, k], NaN padded
    strategies: list[str]
    again_idx: np.ndarray       # buy-again list (products bought before), same conventions
    again_scores: np.ndarray


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
    products = _flatten(customers["product_ids"], object)
    times = _flatten(customers["event_times_ms"], np.int64)
    weights = model.event_weights(_flatten(customers["quantities"], np.float64), times)
    items = artifact.item_index(products) if len(products) else np.zeros(0, dtype=np.int64)
    usable = items >= 0
    if model.cutoff_ms is not None:
        usable &= times > model.cutoff_ms

    rows = np.concatenate([trained_rows, stream_rows[usable]]).astype(np.int64)
    cols = np.concatenate([trained_items, items[usable]]).astype(np.int64)
    counts = np.concatenate([trained_counts.astype(np.float64), weights[usable]])
    codes, inverse = np.unique(rows * artifact.n_items + cols, return_inverse=True)
    summed = np.bincount(inverse, weights=counts, minlength=len(codes))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(codes // artifact.n_items, minlength=n_customers))])
    return indptr.astype(np.int64), (codes % artifact.n_items).astype(np.int32), summed.astype(np.float32)


def _flatten(column: pd.Series, dtype) -> np.ndarray:
    arrays = [np.asarray(value, dtype=dtype) for value in column]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def score_customers(model: ServingModel, customers: pd.DataFrame, k: int, exclude_purchased: bool,
                    segments: np.ndarray | None = None, rules=None) -> Scored:
    """Top-k (and the buy-again list) for every customer of the frame (see the module docstring).

    ``segments`` (one per customer, None when unknown: the events' optional ``segment``) picks
    the segment's popularity list for a customer with no known purchase, when the model has one.
    ``rules``: the business rules the driver handed over for this batch (None: none).
    """
    artifact = model.artifact
    indptr, indices, counts = purchase_counts(model, customers)
    # One fold-in per customer serves both lists.
    needs = scorers.needs_vectors(artifact.model_type)
    vectors = scorers.user_vectors(artifact, indptr, indices, counts) if needs else None
    item_idx, scores, strategies = scorers.recommend_from_counts(artifact, indptr, indices, counts, k,
                                                                 exclude_purchased, segments=segments,
                                                                 vectors=vectors, rules=rules)
    again_idx, again_scores = scorers.buy_again(artifact, indptr, indices, counts, k, vectors=vectors, rules=rules)
    return Scored(customers["customer_id"].to_numpy(), item_idx, scores, strategies, again_idx, again_scores)


def records_for(model: ServingModel, customers: pd.DataFrame, scored: Scored,
                computed_at_ms: int) -> list[RecommendationRecord]:
    """The output records: newest event time and offsets reflected, purchases since the cutoff,
    and the buy-again list as the batch job writes it."""
    last_event = [int(max(times)) if len(times) else None for times in customers["event_times_ms"]]
    offsets = [dict(o) if o is not None and len(o) else None for o in customers["source_offsets"]]
    item_ids = model.artifact.item_ids
    records = build_records(scored.customer_ids, scored.item_idx, scored.scores, item_ids,
                            model.version, scored.strategies, last_event, source="stream",
                            source_offsets=offsets, computed_at_ms=computed_at_ms)
    for record, times, again, again_scores in zip(records, customers["event_times_ms"], scored.again_idx,
                                                  scored.again_scores):
        record.extra["purchases_since_cutoff"] = _since_cutoff(times, model.cutoff_ms)
        record.extra["buy_again"] = [{"rank": rank, "product_id": str(item_ids[i]), "score": round(float(s), 6)}
                                     for rank, (i, s) in enumerate(zip(again, again_scores), 1) if i >= 0]
    return records


def _since_cutoff(times, cutoff_ms: int | None) -> int:
    times = np.asarray(times, dtype=np.int64)
    return int(len(times) if cutoff_ms is None else (times > cutoff_ms).sum())
