"""Which model the job trains, and where its per-customer work runs: the scorer and ALS parameters
k-fold cross-validation chooses on the training part, or the configured ones when there is no choice."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from batch_training.candidates import Candidate, select_model
from batch_training.evaluation import kfold_splits
from batch_training.holdout import cv_race, fold_scorer, log_cv
from batch_training.job_settings import LOWER_IS_BETTER, JobSettings, grid_for_catalogue, scorer_candidates
from batch_training.per_customer import partitions_for, use_executors
from batch_training.train import AlsParams, cross_validate, params_grid
from models.scorers import needs_vectors

log = logging.getLogger("batch_training")


@dataclass
class ModelChoice:
    """The chosen scorer and ALS parameters, and how the per-customer work is done."""
    scorers: list[Candidate]        # the candidates, the configured one first
    on_executors: bool              # per-customer work on the executors (else the driver)
    partitions: int | None          # the executor path's partitions
    most_evaluated: int | None      # batch.holdout.max_evaluated_customers
    folds_k: int                    # batch.cv_folds
    chosen: AlsParams
    selected: Candidate
    cv_summary: list[dict]          # the cross-validation ranking, best first ([] without)


def choose_model(settings: JobSettings, spark, train, n_users: int, n_items: int,
                 start_stage: Callable[[str], None]) -> ModelChoice:
    """Where the per-customer work runs, then, when there is a choice of ALS parameters or scorers
    and ``batch.cv_folds`` >= 2, the stage "cross-validation" on ``train``; else the configured model."""
    cfg, k, metric, base = settings.cfg, settings.k, settings.metric, settings.base
    scorers = scorer_candidates(cfg, metric)
    on_executors = use_executors(cfg, n_users)
    log.info("per-customer work on the %s (batch.topk_engine=%s, %s customers; batch.executor_min_customers=%s)",
             "executors" if on_executors else "driver", cfg.get_path("batch.topk_engine"), f"{n_users:,}",
             f"{int(cfg.get_path('batch.executor_min_customers')):,}")
    partitions = partitions_for(n_users, int(cfg.get_path("batch.customers_per_partition")), spark) \
        if on_executors else None
    most_evaluated = cfg.get_path("batch.holdout.max_evaluated_customers")
    chosen, selected, cv_summary = base, scorers[0], []
    folds_k = int(cfg.get_path("batch.cv_folds"))
    grid = params_grid(base, grid_for_catalogue(cfg, n_items))
    if folds_k >= 2 and (len(grid) > 1 or len(scorers) > 1):
        start_stage(f"cross-validation ({folds_k} folds x {len(grid)} ALS candidates x {len(scorers)} scorers)")
        score_fold = fold_scorer(k, settings.exclude, metric, n_users, n_items, scorers, partitions, most_evaluated)
        results = cross_validate(list(kfold_splits(train, folds_k, seed=base.seed)), grid, n_users, n_items,
                                 score_fold, metric, collect_users=metric == "rmse" or not on_executors,
                                 race=cv_race(cfg, metric, scorers))
        chosen, selected, rows = select_model(results, scorers, metric,
                                              float(cfg.get_path("batch.publish.min_lift_over_popularity", 0.1)),
                                              lower_is_better=metric in LOWER_IS_BETTER)
        cv_summary = log_cv(rows, metric, k, folds_k)
    else:
        log.info("no cross-validation (batch.cv_folds=%d): the configured model %s with %s", folds_k,
                 selected.name, base.label())
    if needs_vectors(selected.model_type):
        log.info("selected model: %s with ALS %s", selected.name, chosen.label())
    else:   # popularity, item-kNN: the ALS parameters play no part in its lists
        log.info("selected model: %s (no ALS factors in its scores)", selected.name)
    return ModelChoice(scorers, on_executors, partitions, most_evaluated, folds_k, chosen, selected, cv_summary)
