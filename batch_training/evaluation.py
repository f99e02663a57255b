"""Offline evaluation protocol: per-customer holdout and k-fold splits, relevance, popularity baseline.

Kept apart from the models (as in benfred/implicit's evaluation module): anything that produces a
ranked ``[n_users, k]`` item array can be evaluated, and every report puts the popularity baseline,
computed on the same split, beside the model.

Data frames:
- events: ``user int, item int, quantity double, event_time timestamp (nullable)``; ``user`` and
  ``item`` are the job's dense indices of ``customer_id`` and ``product_id`` (index before
  splitting). Only purchases count: rows with a quantity <= 0 (returns) are dropped and a null
  quantity counts as 1. Events become pairs as in ``batch_training.data.aggregate``: ``count`` is
  the number of purchase rows (``count_mode="rows"``) or the summed quantity (``"quantity"``).
- pairs (implicit feedback): ``user int, item int, count double, last_time timestamp``, one row
  per (user, item) (``last_time``, the latest purchase, is null when unknown).
Test pairs carry one more column, ``repurchase boolean``: the customer also bought the item in train.

Splitting protocol (per customer, so every evaluated customer has a history to recommend from):
- ``random``: a customer with n >= 2 distinct products has round_half_up(test_fraction * n),
  clamped to [1, n - 1], of them held out, chosen by a seeded hash of (seed, user, item): the same
  seed gives the same split on any cluster and partitioning. Customers with one product stay in
  train. Held-out products are never in train, so ``repurchase`` is false.
- ``time``: a customer's events after their own (1 - test_fraction) quantile of purchase time
  (exact, interpolated) are held out. The earliest purchase is never after that quantile, so each
  customer keeps at least one event in train; customers whose purchases all share one time stay in
  train, as do events without a time. Every held-out event is strictly later than every training
  event of its customer. A held-out product may have been bought before (``repurchase``): measure
  "what will they buy next" with ``exclude_purchased=False`` and "what new product will they buy"
  with ``exclude_purchased=True``. From pairs, the unit is the pair and its ``last_time``.
- k-fold: each customer's distinct products are shuffled by the seeded hash and dealt round-robin
  (from a per-customer random start) into k folds; each pair is in exactly one test fold and
  customers with one product are always in train.
The returned DataFrames are lazy and deterministic: cache them when they are used more than once.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batch_training.metrics import PADDING, catalog_coverage, intra_list_diversity, novelty, ranking_metrics

USER, ITEM, COUNT, LAST_TIME, REPURCHASE = "user", "item", "count", "last_time", "repurchase"
QUANTITY, EVENT_TIME = "quantity", "event_time"
SPLIT_METHODS = ("random", "time")
COUNT_MODES = ("rows", "quantity")


class Csr(NamedTuple):
    """Items per user: row u holds ``indices[indptr[u]:indptr[u + 1]]`` (sorted, distinct)."""

    indptr: np.ndarray
    indices: np.ndarray


@dataclass(frozen=True)
class ItemPopularity:
    """Distinct buyers per item in the training data, and the number of customers counted."""

    buyers: np.ndarray
    n_customers: int

    def ranking(self) -> np.ndarray:
        """Item indices, most buyers first, ties by item index (a stable, reproducible order)."""
        return np.lexsort((np.arange(self.buyers.size), -self.buyers))


# ----------------------------------------------------------------------------------------- splits

def holdout_split(events_or_pairs, method: str = "random", test_fraction: float = 0.2,
                  seed: int = 42, count_mode: str = "rows"):
    """Per-customer holdout (protocol in the module docstring): ``(train_pairs, test_pairs)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r}: use one of {SPLIT_METHODS}")
    if count_mode not in COUNT_MODES:
        raise ValueError(f"unknown count_mode {count_mode!r}: use one of {COUNT_MODES}")
    kind = _frame_kind(events_or_pairs)
    if method == "random":
        pairs = _pairs_of(events_or_pairs) if kind == "pairs" \
            else _aggregate_events(_clean_events(events_or_pairs), count_mode)
        return _random_split(pairs, test_fraction, seed)
    if kind == "pairs":     # one event per pair whose quantity is its count: summing keeps counts
        return _time_split(_pairs_as_events(events_or_pairs), test_fraction, "quantity")
    return _time_split(_clean_events(events_or_pairs), test_fraction, count_mode)


def kfold_splits(pairs, k: int = 5, seed: int = 42) -> Iterator[tuple]:
    """Yield ``(train_pairs, test_pairs)`` for each of k folds over each customer's products."""
    from pyspark.sql import functions as F

    if k < 2:
        raise ValueError(f"k must be >= 2 folds, got {k}")
    ranked = _ranked_per_user(_pairs_of(pairs), seed)
    start = F.pmod(F.xxhash64(F.lit(seed), F.lit("fold-start"), F.col(USER)), F.lit(k))
    fold = F.when(F.col("_n") >= 2, F.pmod(F.col("_rank") - 1 + start, F.lit(k))).otherwise(F.lit(-1))
    assigned = ranked.withColumn("_fold", fold)
    for fold_no in range(k):
        train = assigned.where(F.col("_fold") != fold_no).select(*_PAIR_COLUMNS)
        test = assigned.where(F.col("_fold") == fold_no).select(*_PAIR_COLUMNS,
                                                                F.lit(False).alias(REPURCHASE))
        yield train, test


_PAIR_COLUMNS = (USER, ITEM, COUNT, LAST_TIME)


def _frame_kind(frame) -> str:
    columns = set(frame.columns)
    if {USER, ITEM, COUNT} <= columns:
        return "pairs"
    if {USER, ITEM, QUANTITY} <= columns:
        return "events"
    raise ValueError(f"expected pairs (user, item, count[, last_time]) or events (user, item, quantity, "
                     f"event_time), got columns {sorted(columns)}: index customer_id/product_id into "
                     "integer user/item columns before splitting")


def _pairs_of(pairs):
    """The pairs with the standard columns, one row per (user, item) even if the input repeats one."""
    from pyspark.sql import functions as F

    last_time = F.col(LAST_TIME) if LAST_TIME in pairs.columns else F.lit(None)
    return (pairs.select(F.col(USER).cast("int").alias(USER), F.col(ITEM).cast("int").alias(ITEM),
                         F.col(COUNT).cast("double").alias(COUNT), last_time.cast("timestamp").alias(LAST_TIME))
            .groupBy(USER, ITEM).agg(F.sum(COUNT).alias(COUNT), F.max(LAST_TIME).alias(LAST_TIME)))


def _clean_events(events):
    """Purchases only, with the standard columns (null quantity = 1, returns dropped)."""
    from pyspark.sql import functions as F

    event_time = F.col(EVENT_TIME) if EVENT_TIME in events.columns else F.lit(None)
    quantity = F.coalesce(F.col(QUANTITY).cast("double"), F.lit(1.0))
    return (events.select(F.col(USER).cast("int").alias(USER), F.col(ITEM).cast("int").alias(ITEM),
                          quantity.alias(QUANTITY), event_time.cast("timestamp").alias(EVENT_TIME))
            .where(F.col(QUANTITY) > 0))


def _pairs_as_events(pairs):
    """Pairs seen as one event each (count as quantity, last_time as time), for the time split."""
    from pyspark.sql import functions as F

    if LAST_TIME not in pairs.columns:
        raise ValueError("the time split needs event times: pass events (with event_time) or pairs with a "
                         "last_time column")
    return _pairs_of(pairs).select(USER, ITEM, F.col(COUNT).alias(QUANTITY), F.col(LAST_TIME).alias(EVENT_TIME))


def _aggregate_events(events, count_mode: str):
    """One pair per (user, item): purchase rows or summed quantity, and the latest purchase time."""
    from pyspark.sql import functions as F

    count = F.count(F.lit(1)) if count_mode == "rows" else F.sum(QUANTITY)
    return events.groupBy(USER, ITEM).agg(count.cast("double").alias(COUNT), F.max(EVENT_TIME).alias(LAST_TIME))


def _ranked_per_user(pairs, seed: int):
    """Pairs with ``_n`` (the user's distinct products) and ``_rank`` (1.. in a seeded random order)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    per_user = Window.partitionBy(USER)
    shuffled = per_user.orderBy(F.xxhash64(F.lit(seed), F.col(USER), F.col(ITEM)), F.col(ITEM))
    return (pairs.withColumn("_n", F.count(F.lit(1)).over(per_user))
            .withColumn("_rank", F.row_number().over(shuffled)))


def _random_split(pairs, test_fraction: float, seed: int):
    from pyspark.sql import functions as F

    ranked = _ranked_per_user(pairs, seed)
    n = F.col("_n")
    n_test = F.when(n >= 2, F.least(n - 1, F.greatest(F.lit(1), F.round(n * F.lit(test_fraction)))))
    flagged = ranked.withColumn("_test", F.col("_rank") <= F.coalesce(n_test, F.lit(0)))
    train = flagged.where(~F.col("_test")).select(*_PAIR_COLUMNS)
    test = flagged.where(F.col("_test")).select(*_PAIR_COLUMNS, F.lit(False).alias(REPURCHASE))
    return train, test


def _time_split(events, test_fraction: float, count_mode: str):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    micros = F.unix_micros(F.col(EVENT_TIME))
    cutoff = F.percentile(micros, F.lit(1.0 - test_fraction)).over(Window.partitionBy(USER))
    flagged = events.withColumn("_test", F.coalesce(micros > cutoff, F.lit(False)))
    train = _aggregate_events(flagged.where(~F.col("_test")), count_mode)
    bought_in_train = train.select(USER, ITEM, F.lit(True).alias(REPURCHASE))
    test = (_aggregate_events(flagged.where(F.col("_test")), count_mode)
            .join(bought_in_train, [USER, ITEM], "left")
            .select(*_PAIR_COLUMNS, F.coalesce(F.col(REPURCHASE), F.lit(False)).alias(REPURCHASE)))
    return train, test


# -------------------------------------------------------------------------- relevance and baseline

def evaluation_users(test_pairs, exclude_purchased: bool) -> np.ndarray:
    """Sorted users with at least one relevant test item (the users worth recommending to)."""
    frame = _relevant_rows(test_pairs, exclude_purchased).select(USER).distinct()
    return np.sort(_collect(frame)[USER].to_numpy(np.int64))


def relevant_sets(test_pairs, users: np.ndarray, exclude_purchased: bool) -> Csr:
    """The held-out items of each user in ``users`` (CSR rows in that order).

    With ``exclude_purchased`` an item the user also bought in train is not relevant: the model is
    then asked for new products only (and must exclude train items from its lists too).
    """
    users = _user_array(users)
    frame = _only_users(_relevant_rows(test_pairs, exclude_purchased), users)
    collected = _collect(frame.select(USER, ITEM))
    return _csr_for_users(users, collected[USER].to_numpy(np.int64), collected[ITEM].to_numpy(np.int64))


def item_popularity(train_pairs, n_items: int) -> ItemPopularity:
    """Distinct buyers per item (length ``n_items``) and the number of customers in ``train_pairs``."""
    from pyspark.sql import functions as F

    per_item = _collect(train_pairs.groupBy(ITEM).agg(F.countDistinct(USER).alias("buyers")))
    items = per_item[ITEM].to_numpy(np.int64)
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"train_pairs hold item indices in [{items.min()}, {items.max()}], outside the "
                         f"catalogue of n_items={n_items}: pass the size of the item index")
    buyers = np.zeros(n_items, dtype=np.int64)
    buyers[items] = per_item["buyers"].to_numpy(np.int64)
    n_customers = train_pairs.select(USER).distinct().count()
    return ItemPopularity(buyers=buyers, n_customers=int(n_customers))


def popularity_recommendations(train_pairs, users: np.ndarray, n_items: int, k: int,
                               exclude_purchased: bool,
                               popularity: ItemPopularity | None = None) -> np.ndarray:
    """The baseline: the k items with most distinct buyers in train (ties by item index), per user.

    With ``exclude_purchased`` each user's own training items are skipped (the train pairs of
    ``users`` are collected for that). Rows follow ``users``; ``-1`` pads when the catalogue runs out.
    """
    users = _user_array(users)
    if popularity is None:
        popularity = item_popularity(train_pairs, n_items)
    order = popularity.ranking()
    if not exclude_purchased:
        return np.tile(_padded(order[:k], k), (users.size, 1))
    purchased_rows = _collect(_only_users(train_pairs, users).select(USER, ITEM))
    purchased = _csr_for_users(users, purchased_rows[USER].to_numpy(np.int64),
                               purchased_rows[ITEM].to_numpy(np.int64))
    return first_k_unpurchased(order, purchased, k)


def first_k_unpurchased(order: np.ndarray, purchased: Csr, k: int) -> np.ndarray:
    """Per row, the first k items of the global ``order`` not in that row's ``purchased`` items.

    Vectorised without a per-user loop: with a row's purchased items at sorted positions e_0 < e_1 <
    ... of ``order``, g_t = e_t - t is the number of free positions before e_t, and the j-th free
    position is j + #{t : g_t <= j}, counted for all rows at once by a searchsorted over
    (row, g) keys.
    """
    n_items, n_rows = order.size, purchased.indptr.size - 1
    position = np.empty(n_items, dtype=np.int64)
    position[order] = np.arange(n_items)
    lengths = np.diff(purchased.indptr)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    positions = position[purchased.indices]
    positions = positions[np.lexsort((positions, rows))]
    within_row = np.arange(positions.size) - purchased.indptr[:-1][rows]
    width = max(n_items, k) + 1
    keys = rows * width + (positions - within_row)
    slots = np.arange(k, dtype=np.int64)
    queries = np.arange(n_rows, dtype=np.int64)[:, None] * width + slots[None, :]
    skipped = np.searchsorted(keys, queries, side="right") - purchased.indptr[:-1][:, None]
    free = slots[None, :] + skipped
    return np.where(free < n_items, order[np.minimum(free, n_items - 1)], PADDING)


# ---------------------------------------------------------------------------------------- metrics

def evaluate(recommended: np.ndarray, relevant: Csr, k: int, n_items: int, popularity: ItemPopularity,
             item_factors: np.ndarray | None = None) -> dict[str, float]:
    """Ranking metrics at k plus coverage, novelty and (with item factors) intra-list diversity.

    Coverage, novelty and diversity are taken over all rows of ``recommended``; the ranking metrics
    over the rows with relevant items.
    """
    top = np.asarray(recommended)[:, :k]
    result: dict[str, float] = {"k": k, **ranking_metrics(top, relevant.indptr, relevant.indices, k)}
    result["coverage"] = catalog_coverage(top, n_items)
    result["novelty"] = novelty(top, popularity.buyers, popularity.n_customers)
    if item_factors is not None:
        result["diversity"] = intra_list_diversity(top, item_factors)
    return result


def evaluate_with_baseline(model_recommended: np.ndarray, train_pairs, test_pairs, users: np.ndarray,
                           n_items: int, k: int, exclude_purchased: bool,
                           item_factors: np.ndarray | None = None,
                           model_name: str = "model") -> dict[str, dict[str, float]]:
    """The model's metrics and the popularity baseline's, on the same split and users.

    ``model_recommended`` rows follow ``users``; when ``exclude_purchased`` the model should have
    left each user's train items out of its lists too, or the comparison favours the baseline.
    """
    users = _user_array(users)
    if np.asarray(model_recommended).shape[0] != users.size:
        raise ValueError(f"model_recommended has {np.asarray(model_recommended).shape[0]} rows for "
                         f"{users.size} users: give one row per user, in the order of users")
    relevant = relevant_sets(test_pairs, users, exclude_purchased)
    popularity = item_popularity(train_pairs, n_items)
    baseline = popularity_recommendations(train_pairs, users, n_items, k, exclude_purchased, popularity)
    return {model_name: evaluate(model_recommended, relevant, k, n_items, popularity, item_factors),
            "popularity": evaluate(baseline, relevant, k, n_items, popularity, item_factors)}


TABLE_COLUMNS = ("users", "precision", "recall", "map", "ndcg", "coverage", "novelty", "diversity")
_AT_K = {"precision", "recall", "map", "ndcg"}


def format_metrics_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, one row per recommender (e.g. model and popularity), aligned columns."""
    columns = [c for c in TABLE_COLUMNS if any(c in metrics for metrics in results.values())]
    k = next((metrics["k"] for metrics in results.values() if "k" in metrics), None)
    headers = ["recommender"] + [f"{c}@{k}" if c in _AT_K and k is not None else c for c in columns]
    rows = [[name] + [_format_value(metrics.get(c)) for c in columns] for name, metrics in results.items()]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

    return "\n".join(line(cells) for cells in [headers, *rows])


def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.4f}"


# -------------------------------------------------------------------------------------- internals

def _relevant_rows(test_pairs, exclude_purchased: bool):
    from pyspark.sql import functions as F

    if not exclude_purchased:
        return test_pairs
    if REPURCHASE not in test_pairs.columns:
        raise ValueError("exclude_purchased=True needs the test pairs' 'repurchase' column: pass test pairs "
                         "from holdout_split/kfold_splits, or exclude_purchased=False")
    return test_pairs.where(~F.col(REPURCHASE))


def _user_array(users) -> np.ndarray:
    users = np.asarray(users)
    if users.ndim != 1 or not (users.size == 0 or np.issubdtype(users.dtype, np.integer)):
        raise ValueError(f"users must be a 1-d array of user indices, got {users.dtype} of shape {users.shape}")
    users = users.astype(np.int64, copy=False)
    if np.unique(users).size != users.size:
        raise ValueError("users must not repeat a user: each user is one row of the results")
    return users


def _only_users(frame, users: np.ndarray):
    """``frame`` restricted to ``users`` (a broadcast join: the collected data stays small)."""
    import pandas as pd
    from pyspark.sql import functions as F

    wanted = frame.sparkSession.createDataFrame(pd.DataFrame({USER: users.astype(np.int32)}),
                                                schema=f"{USER} int")
    return frame.join(F.broadcast(wanted), USER)


def _collect(frame):
    """A small DataFrame on the driver as pandas (through Arrow)."""
    return frame.toPandas()


def _csr_for_users(users: np.ndarray, row_users: np.ndarray, row_items: np.ndarray) -> Csr:
    """CSR over ``users`` (in their order) of (user, item) rows; rows of other users are dropped."""
    if users.size == 0:
        return Csr(indptr=np.zeros(1, dtype=np.int64), indices=np.zeros(0, dtype=np.int64))
    sorter = np.argsort(users, kind="stable")
    sorted_users = users[sorter]
    found = np.minimum(np.searchsorted(sorted_users, row_users), users.size - 1)
    known = sorted_users[found] == row_users
    row_of = sorter[found[known]]
    items = row_items[known]
    width = int(items.max(initial=0)) + 1
    keys = np.unique(row_of * width + items)
    rows, items = keys // width, keys % width
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=users.size))]).astype(np.int64)
    return Csr(indptr=indptr, indices=items.astype(np.int64))


def _padded(items: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([items, np.full(k - items.size, PADDING, dtype=items.dtype)]) if items.size < k \
        else items
