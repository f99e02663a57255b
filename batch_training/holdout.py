"""The evaluation harness: every candidate scored on a split of the purchases (the holdout, and each
cross-validation fold with the fold scorer, the race and the ranking log), on the driver or the
executors; and the final model folded in from the holdout fit."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from batch_training.candidates import (
    PARAMETER_FREE,
    Candidate,
    as_candidate,
    recommend_candidates,
    scoring_artifact,
    seed_neighbour_tables,
)
from batch_training.evaluation import evaluate, evaluation_users, format_metrics_table, item_popularity, relevant_sets
from batch_training.executor_eval import buy_again_table_on_executors, candidate_table_on_executors
from batch_training.job_settings import LOWER_IS_BETTER
from batch_training.metrics import rmse
from batch_training.train import Factors, PairArrays, Race, counts_as_ratings
from models.config import Config
from models.neighbours import KnnParams, item_neighbours

log = logging.getLogger("batch_training")


def indexed_events(events, maps):
    """The cleaned events with the customers' and products' indices, as the time split reads them."""
    return (events.join(maps.customers, "customer_id").join(maps.products, "product_id")
            .select("user", "item", "quantity", "event_time"))


def evaluation_sample(test, n_users: int, most: int | None):
    """The held-out pairs of about ``most`` customers, a fixed hash sample (the same customers in
    every run), or all of them when there are no more (``batch.holdout.max_evaluated_customers``)."""
    from pyspark.sql import functions as F

    if most is None or n_users <= most:
        return test
    per_million = max(1, int(1_000_000 * most / n_users))
    log.info("holdout metrics on a hash sample of about %s of the %s customers "
             "(batch.holdout.max_evaluated_customers)", f"{most:,}", f"{n_users:,}")
    return test.where(F.pmod(F.xxhash64("user"), F.lit(1_000_000)) < per_million)


class Split:
    """A train/test split as candidates are scored on it. On the driver path: the training counts,
    their popularity and the relevant sets, each a Spark collect done once however many candidates
    and fits are scored on the split. With ``partitions`` (the executor path, executor_eval.py):
    only the popularity; the customers stay on the executors, which return sums."""

    def __init__(self, train, test, n_users: int, n_items: int, partitions: int | None = None):
        self.train, self.test, self.n_users, self.n_items, self.partitions = train, test, n_users, n_items, partitions
        self.neighbour_tables: dict = {}     # item-kNN's by KnnParams, built once per split
        self.purchased = PairArrays.empty() if partitions else PairArrays.collect(train, n_users)
        self.popularity = item_popularity(train, n_items)
        self._relevant: dict[bool, tuple] = {}

    @property
    def on_executors(self) -> bool:
        return self.partitions is not None

    def relevant(self, exclude: bool) -> tuple:
        """``(users, relevant sets)`` of the test part; held-out purchases of new products only
        when ``exclude``."""
        if exclude not in self._relevant:
            users = evaluation_users(self.test, exclude)
            self._relevant[exclude] = (users, relevant_sets(self.test, users, exclude))
        return self._relevant[exclude]

    def artifact(self, factors: Factors, candidates: list[Candidate] = ()):
        """A throw-away artifact over the split's training counts (none on the executor path) and the
        fit, given the item-kNN tables of ``candidates`` (driver path; built once per split)."""
        artifact = scoring_artifact(factors.item_factors, self.purchased.indptr, self.purchased.indices,
                                    self.purchased.counts, self.popularity.buyers.astype(np.float64),
                                    factors.params.as_dict())
        seed_neighbour_tables(artifact, list(candidates), self.neighbour_tables, lambda params: item_neighbours(
            self.purchased.indptr, self.purchased.indices, self.purchased.counts, self.n_items, params))
        return artifact


def candidate_table(factors: Factors, split: Split, k: int, exclude: bool,
                    candidates: list[Candidate]) -> dict[str, dict]:
    """Every candidate's metrics on one split, all scored from the same training counts and fit."""
    if split.on_executors:
        return candidate_table_on_executors(split.train, split.test, split.artifact(factors), candidates, k, exclude,
                                            split.popularity, factors.item_factors, split.partitions, split.n_users,
                                            split.neighbour_tables)
    users, relevant = split.relevant(exclude)
    lists = recommend_candidates(split.artifact(factors, candidates), candidates, users, k, exclude)
    return {name: evaluate(recs, relevant, k, split.n_items, split.popularity, factors.item_factors)
            for name, recs in lists.items()}


def evaluate_holdout(factors: Factors, split: Split, k: int,
                     exclude_main: bool, candidates: list[Candidate] | None = None,
                     selected: Candidate | None = None, knn: KnnParams | None = None) -> dict[str, Any]:
    """The selected model ("model") beside every candidate and the popularity and item-kNN baselines
    (the latter with ``knn``, the first configured table, unless a candidate is one), on the same
    split, with purchased items excluded and included."""
    selected = selected or Candidate("als")
    everyone = list(candidates or [selected])
    for baseline in (Candidate("popularity"), Candidate("item_knn", knn=knn), Candidate("als")):
        if not any(c.model_type == baseline.model_type for c in everyone):
            everyone.append(baseline)
    report: dict[str, Any] = {"k": k, "exclude_purchased_main": exclude_main, "selected": selected.name}
    for exclude in (True, False):
        rows = candidate_table(factors, split, k, exclude, everyone)
        table = {"model": rows[selected.name], **rows}
        key = "exclude_purchased" if exclude else "include_purchased"
        report[key] = table
        log.info("holdout metrics, purchased items %s (%s customers); model = %s:\n%s",
                 "excluded" if exclude else "included", f"{table['model'].get('users', 0):,}", selected.name,
                 format_metrics_table(table))
    report["buy_again"] = evaluate_buy_again(factors, split, k, selected)
    if not factors.params.implicit_prefs:
        report["rmse"] = {"train": _rmse(factors, split.train), "test": _rmse(factors, split.test)}
        log.info("RMSE: train %.2f, test %.2f", report["rmse"]["train"], report["rmse"]["test"])
    return report


def add_plain_als(metrics: dict, plain: Factors, split: Split, k: int) -> None:
    """ALS at the configured parameters (``batch.als``, no CV) beside the selected model, so the
    report shows what cross-validation bought; row ``plain_als`` of both holdout tables."""
    for exclude, key in ((True, "exclude_purchased"), (False, "include_purchased")):
        metrics[key]["plain_als"] = candidate_table(plain, split, k, exclude, [Candidate("als")])["als"]
    table = {name: metrics["exclude_purchased"][name] for name in ("model", "plain_als", "popularity")}
    log.info("selected model against ALS at the configured parameters (%s), purchased items excluded:\n%s",
             plain.params.label(), format_metrics_table(table))


def evaluate_buy_again(factors: Factors, split: Split, k: int, selected: Candidate) -> dict[str, dict]:
    """The buy-again list against the held-out repurchases (only the time split has any); the
    discover list is the "exclude_purchased" table (held-out new products)."""
    from pyspark.sql import functions as F

    from models.scorers import buy_again, user_vectors

    if split.on_executors:
        table = buy_again_table_on_executors(split.train, split.test, split.artifact(factors), k, selected,
                                             split.popularity, split.partitions, split.n_users, split.neighbour_tables)
        if table:
            log.info("buy-again lists on the held-out repurchases:\n%s", format_metrics_table(table))
        return table
    repurchases = split.test.where(F.col("repurchase"))
    users = evaluation_users(repurchases, False)
    if users.size == 0:
        log.info("buy-again: no held-out repurchases on this split (the random split holds out new products only)")
        return {}
    relevant = relevant_sets(repurchases, users, False)
    scored = list(dict.fromkeys([selected, Candidate("als"), Candidate("popularity")]))
    base = split.artifact(factors, scored)
    indptr, indices, counts = base.user_items_of(users)
    vectors = user_vectors(base, indptr, indices, counts)   # one fold-in for every candidate of this fit
    table = {}
    for candidate in scored:
        lists, _ = buy_again(as_candidate(base, candidate), indptr, indices, counts, k, vectors=vectors)
        table[f"buy_again({candidate.name})"] = evaluate(lists, relevant, k, split.n_items, split.popularity)
    log.info("buy-again lists on the held-out repurchases (%s customers):\n%s", f"{users.size:,}",
             format_metrics_table(table))
    return table


def _rmse(factors: Factors, pairs) -> float:
    frame = pairs.select("user", "item", "count").toPandas()
    users, items = frame["user"].to_numpy(), frame["item"].to_numpy()
    predicted = np.einsum("ij,ij->i", factors.user_factors[users], factors.item_factors[items])
    return rmse(predicted, frame["count"].to_numpy(np.float64))


def fold_scorer(k: int, exclude: bool, metric: str, n_users: int, n_items: int, scorers: list[Candidate],
                partitions: int | None = None, most_evaluated: int | None = None):
    """Each scorer's metrics on a fold. Popularity and item-kNN do not depend on the ALS parameters,
    so they are computed once per fold. With ``partitions``, on the executors as the holdout is,
    over the same hash sample of customers (``batch.holdout.max_evaluated_customers``)."""
    independent = [c for c in scorers if c.model_type in PARAMETER_FREE]
    dependent = [c for c in scorers if c not in independent]
    current: dict[str, Any] = {"fold": None}     # the fold being scored: its split and parameter-free rows

    def score(fold_no: int, factors: Factors, train, test) -> dict[str, dict]:
        if metric == "rmse":
            return {"als": {"rmse": _rmse(factors, test)}}
        first = current["fold"] != fold_no
        if first:
            current.update(fold=fold_no, independent={}, split=Split(
                train, evaluation_sample(test, n_users, most_evaluated), n_users, n_items, partitions))
        table = candidate_table(factors, current["split"], k, exclude, dependent + (independent if first else []))
        if first:
            current["independent"] = {c.name: table[c.name] for c in independent}
        return {c.name: table[c.name] if c.name in table else current["independent"][c.name] for c in scorers}
    return score


def cv_race(cfg: Config, metric: str, scorers: list[Candidate]) -> Race | None:
    """The CV race of ``batch.cv_race_tolerance`` (null: every candidate on every fold)."""
    tolerance = cfg.get_path("batch.cv_race_tolerance")
    if tolerance is None:
        return None
    free = {c.name for c in scorers if c.model_type in PARAMETER_FREE}
    return Race(metric, float(tolerance), lambda name: name not in free, lower_is_better=metric in LOWER_IS_BETTER)


def log_cv(rows: list[dict], metric: str, k: int, folds: int) -> list[dict]:
    """Log the cross-validation ranking (best first) and return it for the report."""
    lines = [f"{'model':<22} {'ALS parameters':<44} {f'mean {metric}@{k}':>12} {'sd':>8} {'folds':>6}"]
    lines += [f"{row['candidate'].name:<22} "
              f"{'(no ALS)' if row['candidate'].model_type in PARAMETER_FREE else row['params'].label():<44} "
              f"{row['mean']:>12.4f} {row['sd']:>8.4f} {row['folds']:>6}" for row in rows]
    log.info("%d-fold cross-validation, best first (fewer folds: stopped by the race):\n%s", folds,
             "\n".join(lines))
    return [{"model": row["candidate"].name, f"mean_{metric}": row["mean"],
             "params": None if row["candidate"].model_type in PARAMETER_FREE else row["params"].as_dict(),
             f"sd_{metric}": row["sd"], "folds": row["folds"]} for row in rows]


def folded_final(holdout: Factors, all_pairs: PairArrays, buyers: np.ndarray) -> Factors:
    """The final model without a second fit: the holdout fit's item factors, and every customer's
    vector folded in from their full history (the half-step ALS itself ends on)."""
    from models.scoring import fold_in

    started = time.perf_counter()
    params = holdout.params
    users = fold_in(holdout.item_factors, all_pairs.indptr, all_pairs.indices,
                    counts_as_ratings(all_pairs, params, buyers), params.reg_param, params.alpha,
                    implicit=params.implicit_prefs)
    seconds = time.perf_counter() - started
    log.info("folded %s customers into the holdout fit's item factors in %.1f s", f"{users.shape[0]:,}", seconds)
    return replace(holdout, user_factors=users, fit_seconds=seconds)
