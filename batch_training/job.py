"""The batch training job: raw transactions in, a published model and top-k for every customer out.

Stages, each logged with counts: read and clean, aggregate purchase counts, index ids, split a
per-customer holdout, select hyperparameters by k-fold cross-validation, evaluate the chosen
model against the popularity baseline on the holdout, fit on all data, recommend for every
customer, write the recommendations, and publish the model through the publish gate.

``run`` is that list of stages, each a function here or in the module that does its work:
purchases.py (the input), model_choice.py (cross-validation), holdout.py (the evaluation on the
holdout), outputs.py (the lists, files and model artifact), publish.py (the gate and the publish);
job_settings.py reads and checks the settings before Spark starts.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from batch_training.candidates import PARAMETER_FREE, knn_from_config
from batch_training.evaluation import holdout_split, item_popularity
from batch_training.holdout import (
    Split,
    add_plain_als,
    evaluate_holdout,
    evaluation_sample,
    folded_final,
    indexed_events,
)
from batch_training.job_settings import LOWER_IS_BETTER, JobSettings, load_settings, metric_for_gate, split_method
from batch_training.model_choice import ModelChoice, choose_model
from batch_training.outputs import (
    build_artifact,
    buy_again_all,
    ensure_output_dir,
    item_side_of,
    jsonable,
    log_example,
    ordered_ids,
    recommend_all,
    segment_popularity_params,
    write_driver_sinks,
    write_recommendations,
)
from batch_training.per_customer import run_on_executors, seed_item_neighbours, write_sinks
from batch_training.publish import PublishRefused, build_lineage, publish, publish_files
from batch_training.purchases import Purchases, count_purchases, read_and_clean
from batch_training.report import write_report
from batch_training.train import AlsParams, Factors, PairArrays, fit_als
from models.config import Config

log = logging.getLogger("batch_training")

__all__ = ["BatchResult", "PublishRefused", "run"]     # PublishRefused: the CLI imports it from here


@dataclass
class BatchResult:
    version: str | None
    published: bool
    params: AlsParams
    model_type: str
    metrics: dict[str, Any]
    stats: dict[str, Any]
    output_dir: Path
    recommendations_written: int
    gate_reason: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)


class _Stages:
    """Wall time per stage, for the log and the benchmarks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._started = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._started = name, time.perf_counter()
        log.info("== %s", name)

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = time.perf_counter() - self._started
            log.info("   %s took %.1f s", self._name, self.seconds[self._name])
            self._name = None


@dataclass
class _Lists:
    """Every customer's lists as written to the run's version folder: on the driver path, the arrays
    (the sinks and the report read them); on the executor path, what the tasks wrote (``outputs``)."""
    artifact: Any
    output_dir: Path
    run_dir: Path
    written: int
    user_parts: list[dict] | None = None
    outputs: Any = None
    customer_ids: np.ndarray | None = None
    product_ids: np.ndarray | None = None
    item_idx: np.ndarray | None = None
    scores: np.ndarray | None = None
    strategies: list[str] | None = None
    again: tuple[np.ndarray, np.ndarray] | None = None


def run(cfg: Config, spark=None) -> BatchResult:
    """Run the whole job as configured; raises PublishRefused when the gate keeps the current model."""
    from models.spark import build_spark

    settings = load_settings(cfg)       # before Spark starts: a bad setting fails at once
    spark = spark or build_spark(cfg, "reco-batch-training", need_kafka=bool(cfg.get_path("batch.write_topic", False)))
    stages = _Stages()
    stages.start("read and clean")
    events, report = read_and_clean(spark, cfg, settings.data_cfg)
    stages.start("aggregate")
    data = count_purchases(cfg, settings.data_cfg, events, report)
    stages.start("holdout split")
    method, train, test = _split_holdout(settings, data)
    # The stage "cross-validation" when there is a choice of ALS parameters or scorers.
    choice = choose_model(settings, spark, train, data.maps.n_users, data.maps.n_items, stages.start)
    stages.start("evaluation on the holdout")
    holdout_factors, metrics = _evaluate_on_holdout(settings, data, choice, train, test, method)
    final, all_pairs, popularity = _final_model(settings, stages, data, choice, holdout_factors)   # names its stage
    stages.start(f"top-{settings.k} for every customer")
    lists = _recommend_for_everyone(settings, spark, stages, data, choice, metrics, final, all_pairs, popularity)
    stages.start("publish")
    result = _publish(settings, spark, stages, data, choice, metrics, lists)     # and the stage "sinks"
    _write_summary_and_report(settings, choice, lists, all_pairs, popularity, result)
    for table in (data.events, data.pairs, data.indexed, train, test):
        table.unpersist()
    if not result.published and cfg.get_path("batch.publish.enabled", True):
        raise PublishRefused(result.gate_reason)
    return result


def _split_holdout(settings: JobSettings, data: Purchases):
    """``(method, train, test)``: each customer's pairs split, by time when the data has one."""
    cfg = settings.cfg
    method = split_method(cfg, settings.data_cfg)
    split_input = data.indexed if method == "random" else indexed_events(data.events, data.maps)
    train, test = holdout_split(split_input, method=method,
                                test_fraction=float(cfg.get_path("batch.holdout.test_fraction", 0.2)),
                                seed=int(cfg.get_path("batch.holdout.seed", 42)),
                                count_mode=data.count_mode)
    train, test = train.cache(), test.cache()
    log.info("holdout (%s): train %s pairs, test %s pairs", method, f"{train.count():,}", f"{test.count():,}")
    return method, train, test


def _evaluate_on_holdout(settings: JobSettings, data: Purchases, choice: ModelChoice, train, test,
                         method: str) -> tuple[Factors, dict[str, Any]]:
    """The chosen model fitted on ``train``, and its metrics on ``test`` beside every candidate and
    baseline: ``(the holdout fit, the metrics)``."""
    n_users, n_items, on_executors = data.maps.n_users, data.maps.n_items, choice.on_executors
    chosen, selected, base, k = choice.chosen, choice.selected, settings.base, settings.k
    explicit = not base.implicit_prefs    # its RMSE needs the user factors on the driver
    holdout_factors = fit_als(train, chosen, n_users, n_items, collect_users=explicit or not on_executors)
    holdout = Split(train, evaluation_sample(test, n_users, choice.most_evaluated), n_users, n_items, choice.partitions)
    metrics = evaluate_holdout(holdout_factors, holdout, k, settings.exclude, choice.scorers, selected,
                               knn_from_config(settings.cfg)[0])
    if chosen != base and settings.metric not in LOWER_IS_BETTER:
        add_plain_als(metrics, fit_als(train, base, n_users, n_items, collect_users=not on_executors), holdout, k)
    metrics["split"] = method
    metrics["cross_validation"] = choice.cv_summary
    metrics["selection"] = {"selected": selected.name, "model_type": selected.model_type,
                            "blend_weight": selected.blend_weight, "metric": settings.metric,
                            "params": chosen.as_dict(), "by": f"{choice.folds_k}-fold cross-validation"
                            if choice.cv_summary else "configuration (no cross-validation)"}
    return holdout_factors, metrics


def _final_model(settings: JobSettings, stages: _Stages, data: Purchases, choice: ModelChoice,
                 holdout_factors: Factors):
    """The stage "final fit on all data" (``batch.final_fit: refit``) or every customer folded into
    the holdout fit (``fold_in``): ``(final factors, every customer's counts on the driver, popularity)``."""
    n_users, n_items, on_executors = data.maps.n_users, data.maps.n_items, choice.on_executors
    final_mode = str(settings.cfg.get_path("batch.final_fit", "refit"))
    if final_mode == "refit" and choice.selected.model_type in PARAMETER_FREE:
        # Its lists do not use the factors; the artifact keeps the holdout fit's for ALS-only readers.
        log.info("final fit skipped: the selected %s does not score with the ALS factors; the model keeps "
                 "the holdout fit's item factors, every customer folded in", choice.selected.name)
        final_mode = "fold_in"
    all_pairs = None if on_executors else PairArrays.collect(data.indexed, n_users)
    popularity = item_popularity(data.indexed, n_items)
    if final_mode == "refit":
        stages.start("final fit on all data")
        final = fit_als(data.indexed, choice.chosen, n_users, n_items, collect_users=not on_executors)
    elif final_mode == "fold_in":
        stages.start("final model: every customer folded into the holdout fit")
        # On the executors each task folds its customers in (per_customer.py).
        final = replace(holdout_factors, user_factors_df=None) if on_executors else \
            folded_final(holdout_factors, all_pairs, popularity.buyers)
    else:
        raise ValueError(f"batch.final_fit {final_mode!r}: use 'refit' (a second ALS fit on all data) or "
                         "'fold_in' (every customer's full history folded into the holdout fit's item factors)")
    return final, all_pairs, popularity


def _recommend_for_everyone(settings: JobSettings, spark, stages: _Stages, data: Purchases, choice: ModelChoice,
                            metrics: dict, final: Factors, all_pairs: PairArrays | None, popularity) -> _Lists:
    """The model to publish and every customer's lists, written into the run's own version folder
    (the top-level files are the published model's); the writing is a stage of its own."""
    cfg, k, maps, rules, chosen = settings.cfg, settings.k, data.maps, settings.rules, choice.chosen
    product_ids = ordered_ids(maps.products, "product_id", "item", maps.n_items)
    segments = segment_popularity_params(spark, cfg, maps, data.indexed)
    params = {"count_mode": data.source_count_mode, **data.recency, **segments,
              **({"business_rules": rules.summary()} if rules is not None else {})}
    output_dir = ensure_output_dir(cfg)
    if choice.on_executors:
        artifact = build_artifact(chosen, item_side_of(final), np.zeros(0, dtype=str), product_ids, popularity.buyers,
                                  PairArrays.empty(), data.cutoff, data.stats, metrics, choice.selected, params)
        artifact.lineage = build_lineage(cfg, data.stats, chosen.as_dict())
        if artifact.model_type == "item_knn":       # its neighbour table, from every customer's counts on Spark
            seed_item_neighbours(artifact, data.indexed, maps.n_users)
        run_dir = output_dir / "versions" / artifact.version
        run_dir.mkdir(parents=True, exist_ok=True)
        stages.start("top-10 and the model's user side on the executors")
        outputs = run_on_executors(spark, cfg, data.indexed, maps, artifact, final.user_factors_df, k,
                                   settings.exclude, run_dir, rules=rules)
        lists = _Lists(artifact, output_dir, run_dir, outputs.written, outputs.user_parts, outputs=outputs)
    else:
        customer_ids = ordered_ids(maps.customers, "customer_id", "user", maps.n_users)
        artifact = build_artifact(chosen, final, customer_ids, product_ids, popularity.buyers, all_pairs,
                                  data.cutoff, data.stats, metrics, choice.selected, params)
        artifact.lineage = build_lineage(cfg, data.stats, chosen.as_dict())
        item_idx, scores, strategies = recommend_all(artifact, all_pairs, settings.exclude, k, final, rules)
        stages.start("write recommendations")
        run_dir = output_dir / "versions" / artifact.version
        run_dir.mkdir(parents=True, exist_ok=True)
        again_idx, again_scores = buy_again_all(artifact, all_pairs, k, rules)
        written = write_recommendations(run_dir, customer_ids, product_ids, item_idx, scores, again_idx,
                                        again_scores)
        log_example(customer_ids, product_ids, item_idx, scores)
        lists = _Lists(artifact, output_dir, run_dir, written, customer_ids=customer_ids, product_ids=product_ids,
                       item_idx=item_idx, scores=scores, strategies=strategies, again=(again_idx, again_scores))
    log.info("recommendations written for %s customers to %s", f"{lists.written:,}", lists.run_dir)
    return lists


def _publish(settings: JobSettings, spark, stages: _Stages, data: Purchases, choice: ModelChoice,
             metrics: dict, lists: _Lists) -> BatchResult:
    """The model through the publish gate; then the stage "sinks" (table, topic) when it was published."""
    cfg, artifact = settings.cfg, lists.artifact
    result = BatchResult(version=artifact.version, published=False, params=choice.chosen,
                         model_type=artifact.model_type, metrics=metrics,
                         stats=data.stats, output_dir=lists.output_dir, recommendations_written=lists.written)
    published, reason = publish(cfg, artifact, metrics, metric_for_gate(cfg, settings.base), settings.exclude,
                                lists.user_parts)
    result.published, result.gate_reason = published, reason
    if published and (cfg.get_path("batch.write_table", False) or cfg.get_path("batch.write_topic", False)):
        stages.start("sinks")
        if choice.on_executors:
            write_sinks(spark, cfg, lists.outputs)
        else:
            write_driver_sinks(cfg, artifact, lists.customer_ids, lists.product_ids, lists.item_idx, lists.scores,
                               lists.strategies, data.indexed, lists.again)
    stages.stop()
    result.stage_seconds = stages.seconds
    return result


def _write_summary_and_report(settings: JobSettings, choice: ModelChoice, lists: _Lists, all_pairs: PairArrays | None,
                              popularity, result: BatchResult) -> None:
    """run_summary.json and the training report in the version folder, and over the top-level files
    when the model was published."""
    run_dir, artifact, rules = lists.run_dir, lists.artifact, settings.rules
    (run_dir / "run_summary.json").write_text(json.dumps(
        {"version": artifact.version, "published": result.published, "gate": result.gate_reason,
         "model_type": artifact.model_type, "params": artifact.params,
         "business_rules": rules.summary() if rules is not None else None,
         "per_customer_work": "executors" if choice.on_executors else "driver",
         "stats": jsonable(result.stats), "metrics": jsonable(result.metrics), "stage_seconds": result.stage_seconds},
        indent=2))
    if choice.on_executors:
        log.info("training report: not written on the executor path (it reads every customer's counts on the driver)")
        lists.outputs.scored.unpersist()
    else:
        report = write_report(run_dir, all_pairs.indptr, all_pairs.indices, all_pairs.counts, lists.item_idx,
                              popularity.buyers)
        if report is not None:
            log.info("training report: %s", report)
    if result.published:
        publish_files(run_dir, lists.output_dir)
