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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np

from models.scoring import csr_rows, top_k, transform_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlsParams:
    rank: int = 64
    reg_param: float = 0.01
    alpha: float = 1.0
    scaling: str = "none"          # "none" | "log": how counts become ALS ratings
    max_iter: int = 10
    implicit_prefs: bool = True
    seed: int = 42
    blocks: int = 4                # user and item blocks; few suit small machines

    def label(self) -> str:
        mode = f"alpha={self.alpha:g}" if self.implicit_prefs else "explicit"
        return f"rank={self.rank} reg={self.reg_param:g} {mode} scaling={self.scaling}"

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


def with_ratings(pairs, scaling: str):
    """Add the ALS ``rating`` column from ``count`` the same way models.scoring.transform_counts does."""
    from pyspark.sql import functions as F

    if scaling == "none":
        return pairs.withColumn("rating", F.col("count").cast("float"))
    if scaling == "log":
        return pairs.withColumn("rating", F.log1p(F.col("count")).cast("float"))
    raise ValueError(f"unknown count scaling {scaling!r}: use 'none' or 'log'")


def fit_als(pairs, params: AlsParams, n_users: int, n_items: int, collect_users: bool = True) -> Factors:
    """Fit ALS on pairs (user, item, count) and export dense factor matrices; the user factors
    stay distributed (``Factors.user_factors_df``) unless ``collect_users``."""
    from pyspark.ml.recommendation import ALS

    started = time.perf_counter()
    als = ALS(rank=params.rank, maxIter=params.max_iter, regParam=params.reg_param,
              implicitPrefs=params.implicit_prefs, alpha=params.alpha, seed=params.seed,
              numUserBlocks=params.blocks, numItemBlocks=params.blocks, checkpointInterval=5,
              userCol="user", itemCol="item", ratingCol="rating", coldStartStrategy="drop")
    model = als.fit(with_ratings(pairs.select("user", "item", "count"), params.scaling))
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
    def collect(cls, pairs, n_users: int) -> "PairArrays":
        frame = pairs.select("user", "item", "count").toPandas().sort_values(["user", "item"])
        users = frame["user"].to_numpy(np.int64)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.add.at(indptr, users + 1, 1)
        return cls(np.cumsum(indptr), frame["item"].to_numpy(np.int32), frame["count"].to_numpy(np.float32))

    @classmethod
    def empty(cls) -> "PairArrays":
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
                   score_fold: FoldScorer, metric: str, collect_users: bool = True) -> list[CandidateResult]:
    """Fit every ALS candidate on every fold's train part; ``score_fold(fold_no, factors, train, test)``
    returns each scorer's metrics on the fold's test part (ALS alone, or the whole scorer family).
    ``collect_users`` as ``fit_als``'s: off when the folds are scored on the executors."""
    results = [CandidateResult(params) for params in candidates]
    progress = CvProgress(len(folds) * len(candidates), len(folds), metric)
    try:
        for fold_no, (train, test) in enumerate(folds, 1):
            train, test = train.cache(), test.cache()
            for result in results:
                factors = fit_als(train, result.params, n_users, n_items, collect_users=collect_users)
                by_scorer = score_fold(fold_no, factors, train, test)
                result.fold_metrics.append(by_scorer)
                progress.fitted(fold_no, result.params.label(), by_scorer)
            train.unpersist()
            test.unpersist()
    finally:
        progress.close()
    return results


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


def counts_as_ratings(counts: np.ndarray, params: AlsParams) -> np.ndarray:
    """The rating values ALS saw, for fold-in (same transform as ``with_ratings``)."""
    return transform_counts(counts, params.scaling)
