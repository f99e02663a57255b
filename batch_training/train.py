"""Spark ML ALS on purchase counts: fitting, factor export, and k-fold model selection.

Counts are implicit feedback: by default ALS runs with implicitPrefs (confidence 1 + alpha * r on
the transformed count r). Explicit mode (counts treated as ratings, RMSE) is kept only to show
what the job this product replaced did.
"""
from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from models.scaling import BM25_B, BM25_K1, IDF_FLOOR, SCALINGS, als_ratings
from models.scoring import csr_rows, top_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlsParams:
    rank: int = 64
    reg_param: float = 0.01
    alpha: float = 1.0
    scaling: str = "none"          # models.scaling.SCALINGS: how counts become ALS ratings
    scaling_k1: float = BM25_K1    # bm25 scaling: how fast repeat purchases saturate
    scaling_b: float = BM25_B      # bm25 scaling: how much a product's buyers shrink its ratings (0..1)
    max_iter: int = 10
    implicit_prefs: bool = True
    seed: int = 42
    blocks: int = 4                # user and item blocks; few suit small machines
    min_item_customers: int = 1    # products with fewer buyers in the fit's data are left out of it (implicit)

    def label(self) -> str:
        mode = f"alpha={self.alpha:g}" if self.implicit_prefs else "explicit"
        scaling = f"bm25(k1={self.scaling_k1:g},b={self.scaling_b:g})" if self.scaling == "bm25" else self.scaling
        return f"rank={self.rank} reg={self.reg_param:g} {mode} scaling={scaling}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Factors:
    """Dense factor matrices indexed by the job's integer ids (unseen ids get zero rows)."""

    user_factors: np.ndarray
    item_factors: np.ndarray
    params: AlsParams
    fit_seconds: float
    # The fit's user factors as ALS keeps them, distributed (columns id, features); with
    # ``fit_als(..., collect_users=False)`` user_factors is then empty, never gathered.
    user_factors_df: Any = field(default=None, repr=False)


def params_grid(base: AlsParams, grid: dict[str, Iterable[Any]] | None) -> list[AlsParams]:
    """Every combination of the configured grid values over ``base`` (unknown keys are errors)."""
    grid = {key: list(values) for key, values in (grid or {}).items() if values is not None}
    unknown = set(grid) - set(AlsParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown ALS grid parameter(s) {sorted(unknown)}; "
                         f"use {sorted(AlsParams.__dataclass_fields__)}")
    keys = sorted(grid)
    return [replace(base, **dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))] \
        or [base]


def with_ratings(pairs, params: AlsParams, n_items: int):
    """Add the ALS ``rating`` column from ``count`` as models.scaling.als_ratings computes it
    (the same doubles in the same order, so fit and fold-in agree); ``n_items``: the catalogue."""
    from pyspark.sql import functions as F

    if params.scaling == "none":
        return pairs.withColumn("rating", F.col("count").cast("float"))
    if params.scaling == "log":
        return pairs.withColumn("rating", F.log1p(F.col("count")).cast("float"))
    if params.scaling != "bm25":
        raise ValueError(f"unknown count scaling {params.scaling!r}: use one of {list(SCALINGS)}")
    # Two small aggregates (one row per product, one per customer) joined back: no per-pair shuffle
    # beyond what the joins need, and the mean is the same exact ratio of counts numpy takes.
    buyers = pairs.groupBy("item").agg(F.count("*").cast("double").alias("_buyers"))
    bought = pairs.groupBy("user").agg(F.count("*").cast("double").alias("_bought"))
    products_bought = buyers.count()
    mean = pairs.count() / products_bought if products_bought else 1.0
    k1, b = float(params.scaling_k1), float(params.scaling_b)
    norm = F.lit(1.0 - b) + F.lit(b) * F.col("_buyers") / F.lit(mean)
    idf = F.greatest(F.log(F.lit(float(n_items)) / (F.lit(1.0) + F.col("_bought"))), F.lit(IDF_FLOOR))
    count = F.col("count").cast("double")
    rating = count * F.lit(k1 + 1.0) / (F.lit(k1) * norm + count) * idf
    return (pairs.join(F.broadcast(buyers), "item").join(bought, "user")
            .withColumn("rating", rating.cast("float")).drop("_buyers", "_bought"))


def frequent_items(ratings, min_customers: int):
    """The ratings of products at least ``min_customers`` customers bought (pairs are distinct).

    Why: Spark solves one rank x rank system per product and iteration, however few its buyers, so
    a long tail of products bought once or twice costs much of a fit and teaches it little (at
    factor 1, dropping the 37 % of products with fewer than 3 buyers cut a rank-128 fit by 28 %
    with MAP@10 unchanged, BENCHMARKS.md). Left-out products get zero factors: ALS never
    recommends them, the fold-in ignores them, as Spark's own user step would; popularity,
    item-kNN and the buy-again list still see every product.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if min_customers <= 1:
        return ratings
    buyers = F.count(F.lit(1)).over(Window.partitionBy("item"))
    return ratings.withColumn("_buyers", buyers).where(F.col("_buyers") >= min_customers).drop("_buyers")


def fit_als(pairs, params: AlsParams, n_users: int, n_items: int, collect_users: bool = True) -> Factors:
    """Fit ALS on pairs (user, item, count) and export dense factor matrices; the user factors
    stay distributed (``Factors.user_factors_df``) unless ``collect_users``."""
    from pyspark.ml.recommendation import ALS

    started = time.perf_counter()
    als = ALS(rank=params.rank, maxIter=params.max_iter, regParam=params.reg_param,
              implicitPrefs=params.implicit_prefs, alpha=params.alpha, seed=params.seed,
              numUserBlocks=params.blocks, numItemBlocks=params.blocks, checkpointInterval=5,
              userCol="user", itemCol="item", ratingCol="rating", coldStartStrategy="drop")
    ratings = with_ratings(pairs.select("user", "item", "count"), params, n_items)
    # Explicit mode reproduces the old job, which fitted every product (and its RMSE counts each).
    model = als.fit(frequent_items(ratings, params.min_item_customers) if params.implicit_prefs else ratings)
    users = _dense(model.userFactors, n_users, params.rank) if collect_users else \
        np.zeros((0, params.rank), dtype=np.float32)
    factors = Factors(user_factors=users, item_factors=_dense(model.itemFactors, n_items, params.rank),
                      params=params, fit_seconds=time.perf_counter() - started, user_factors_df=model.userFactors)
    log.info("ALS %s fitted in %.1f s", params.label(), factors.fit_seconds)
    return factors


def _dense(factor_df, n_rows: int, rank: int) -> np.ndarray:
    frame = factor_df.toPandas()
    dense = np.zeros((n_rows, rank), dtype=np.float32)
    if len(frame):
        dense[frame["id"].to_numpy()] = np.stack(frame["features"].to_numpy()).astype(np.float32)
    return dense


@dataclass
class PairArrays:
    """A pairs DataFrame collected to the driver as CSR per user (for exclusion and relevance)."""

    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray

    @classmethod
    def collect(cls, pairs, n_users: int) -> PairArrays:
        frame = pairs.select("user", "item", "count").toPandas().sort_values(["user", "item"])
        users = frame["user"].to_numpy(np.int64)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.add.at(indptr, users + 1, 1)
        return cls(np.cumsum(indptr), frame["item"].to_numpy(np.int32), frame["count"].to_numpy(np.float32))

    @classmethod
    def empty(cls) -> PairArrays:
        """No customer at all (the item side of a model whose users the executors hold)."""
        return cls(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32))

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The CSR (indptr, indices) restricted to ``users``, in their order."""
        return csr_rows(self.indptr, users, self.indices)


def recommend_users(factors: Factors, users: np.ndarray, k: int,
                    exclude: PairArrays | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for ``users`` from the fitted factors, excluding their training items when asked."""
    excluded = exclude.rows(users) if exclude is not None else None
    return top_k(factors.user_factors[users], factors.item_factors, k, exclude=excluded)


@dataclass
class CandidateResult:
    """One ALS parameter set across the folds: per fold, every scorer's metrics (by scorer name)."""

    params: AlsParams
    fold_metrics: list[dict[str, dict]] = field(default_factory=list)

    def mean(self, metric: str, scorer: str = "als") -> float:
        values = self._values(metric, scorer)
        return float(np.mean(values)) if values else float("nan")

    def sd(self, metric: str, scorer: str = "als") -> float:
        values = self._values(metric, scorer)
        return float(np.std(values)) if values else float("nan")

    def _values(self, metric: str, scorer: str) -> list[float]:
        return [fold[scorer][metric] for fold in self.fold_metrics if scorer in fold]

    def scorers(self) -> list[str]:
        return list(self.fold_metrics[0]) if self.fold_metrics else []


FoldScorer = Callable[[int, Factors, Any, Any], dict[str, dict]]


def cross_validate(folds: list[tuple[Any, Any]], candidates: list[AlsParams], n_users: int, n_items: int,
                   score_fold: FoldScorer, metric: str, collect_users: bool = True,
                   race: Race | None = None) -> list[CandidateResult]:
    """Fit every ALS candidate on every fold's train part; ``score_fold(fold_no, factors, train, test)``
    returns each scorer's metrics on the fold's test part (ALS alone, or the whole scorer family).
    ``collect_users`` as ``fit_als``'s: off when the folds are scored on the executors. With a
    ``race``, candidates it drops after a fold are not fitted on the later folds."""
    results = [CandidateResult(params) for params in candidates]
    running = list(results)
    progress = CvProgress(len(folds) * len(candidates), len(folds), metric)
    try:
        for fold_no, (train, test) in enumerate(folds, 1):
            train, test = train.cache(), test.cache()
            for result in running:
                factors = fit_als(train, result.params, n_users, n_items, collect_users=collect_users)
                by_scorer = score_fold(fold_no, factors, train, test)
                result.fold_metrics.append(by_scorer)
                progress.fitted(fold_no, result.params.label(), by_scorer)
            train.unpersist()
            test.unpersist()
            if race is not None and fold_no < len(folds):
                kept = race.survivors(running, fold_no)
                progress.skipped((len(running) - len(kept)) * (len(folds) - fold_no))
                running = kept
    finally:
        progress.close()
    return results


@dataclass(frozen=True)
class Race:
    """Racing over the folds: after each fold, an ALS parameter set whose best scorer's running mean
    trails the leader's by more than ``tolerance`` (relative) is not fitted on the later folds.

    Why: most of a CV's time goes to fits of parameter sets that lose by far more than the folds
    disagree (at factor 1 the leader's fold-to-fold sd was 1.4 % of its mean; the configured
    rank 64 / alpha 1 trailed by 15 %). Only ``dependent`` scorers race: the parameter-free ones are
    the same under every fit. Selection then only considers the sets that ran every fold.
    """

    metric: str
    tolerance: float
    is_dependent: Callable[[str], bool]
    lower_is_better: bool = False

    def score(self, result: CandidateResult) -> float:
        means = [result.mean(self.metric, name) for name in result.scorers() if self.is_dependent(name)]
        means = [m for m in means if np.isfinite(m)]
        if not means:
            return float("nan")
        return min(means) if self.lower_is_better else max(means)

    def survivors(self, running: list[CandidateResult], fold_no: int) -> list[CandidateResult]:
        scores = [self.score(result) for result in running]
        finite = [s for s in scores if np.isfinite(s)]
        if not finite:
            return running
        leader = min(finite) if self.lower_is_better else max(finite)
        bound = leader * (1 + self.tolerance) if self.lower_is_better else leader * (1 - self.tolerance)
        kept = []
        for result, score in zip(running, scores):
            if not np.isfinite(score) or (score <= bound if self.lower_is_better else score >= bound):
                kept.append(result)
            else:
                log.info("CV race after fold %d: %s stops (%s@k %.4f, %.1f%% %s the leader's %.4f; "
                         "batch.cv_race_tolerance %.0f%%)", fold_no, result.params.label(), self.metric, score,
                         abs(score / leader - 1) * 100, "above" if self.lower_is_better else "below", leader,
                         self.tolerance * 100)
        return kept


class CvProgress:
    """The CV's progress, one step per (fold, candidate) fit: a tqdm bar when ``stream`` (stderr)
    is a terminal, else one log line per fit with the time left, as a scheduler's log wants."""

    def __init__(self, total: int, n_folds: int, metric: str, stream=None):
        self.total, self.n_folds, self.metric = total, n_folds, metric
        self.done = 0
        self.started = time.perf_counter()
        stream = stream if stream is not None else sys.stderr
        self.bar = self._redirect = None
        if getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, desc="cross-validation", unit="fit", file=stream, dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()     # the job's other log lines print above the bar
            self._redirect.__enter__()

    def skipped(self, fits: int) -> None:
        """Fits the race dropped: the total shrinks, the time left with it."""
        self.total -= fits
        if self.bar is not None and fits:
            self.bar.total = self.total
            self.bar.refresh()

    def fitted(self, fold_no: int, label: str, by_scorer: dict) -> None:
        self.done += 1
        best = max(by_scorer, key=lambda name: np.nan_to_num(float(by_scorer[name][self.metric]), nan=-np.inf))
        als = by_scorer.get("als", {}).get(self.metric, float("nan"))
        if self.bar is not None:
            score = by_scorer[best][self.metric]
            self.bar.set_postfix_str(f"fold {fold_no}/{self.n_folds} {label}: best {best} {score:.4f}", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        log.info("CV fold %d/%d candidate %s: %s@k ALS %.4f, best %s %.4f  [%d/%d fits, %.0f s elapsed, "
                 "~%.0f s left]", fold_no, self.n_folds, label, self.metric, als, best, by_scorer[best][self.metric],
                 self.done, self.total, elapsed, elapsed / self.done * (self.total - self.done))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)


def counts_as_ratings(pairs: PairArrays, params: AlsParams, buyers: np.ndarray) -> np.ndarray:
    """The rating values ALS saw, for fold-in (same transform as ``with_ratings``); ``buyers``:
    distinct buyers per product in the fit's data."""
    return als_ratings(params.as_dict(), pairs.indptr, pairs.indices, pairs.counts, buyers)
