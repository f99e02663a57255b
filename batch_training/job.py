"""The batch training job: raw transactions in, a published model and top-k for every customer out.

Stages, each logged with counts: read and clean, aggregate purchase counts, index ids, split a
per-customer holdout, select hyperparameters by k-fold cross-validation, evaluate the chosen
model against the popularity baseline on the holdout, fit on all data, recommend for every
customer, write the recommendations, and publish the model through the publish gate.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from batch_training.candidates import (
    PARAMETER_FREE,
    knn_from_config,
    select_model,
)
from batch_training.data import DataSourceError, aggregate, index_ids, pair_stats
from batch_training.datasets import load_events, source_placeholders
from batch_training.evaluation import (
    holdout_split,
    item_popularity,
    kfold_splits,
)
from batch_training.holdout import (
    Split,
    add_plain_als,
    cv_race,
    evaluate_holdout,
    evaluation_sample,
    fold_scorer,
    folded_final,
    indexed_events,
    log_cv,
)
from batch_training.job_settings import (
    LOWER_IS_BETTER,
    check_settings,
    grid_for_catalogue,
    metric_for_gate,
    scorer_candidates,
    split_method,
)
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
from batch_training.per_customer import (
    partitions_for,
    run_on_executors,
    seed_item_neighbours,
    use_executors,
    write_sinks,
)
from batch_training.publish import PublishRefused, build_lineage, publish, publish_files
from batch_training.report import write_report
from batch_training.train import (
    AlsParams,
    PairArrays,
    cross_validate,
    fit_als,
    params_grid,
)
from models.business_rules import RulesConfig, load_rules
from models.config import Config
from models.scorers import needs_vectors

log = logging.getLogger("batch_training")


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


def _load_events(spark, cfg: Config, data_cfg: dict):
    """``load_events`` with the stream's ``streaming.max_future_skew`` rule against this run's clock:
    a future-dated row would become the cutoff, and the stream ignores purchases before it."""
    from streaming.settings import duration_ms

    skew_ms = duration_ms(cfg.get_path("streaming.max_future_skew"), "streaming.max_future_skew")
    return load_events(spark, data_cfg, source_placeholders(cfg), max_future_skew_ms=skew_ms)


def run(cfg: Config, spark=None) -> BatchResult:
    """Run the whole job as configured; raises PublishRefused when the gate keeps the current model."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    from models.spark import build_spark

    base = check_settings(cfg)      # before Spark starts: a bad setting fails at once
    rules = load_rules(RulesConfig.from_config(cfg))     # so does a bad attributes file
    if rules is not None:
        log.info("business rules: %s", rules.summary())
    spark = spark or build_spark(cfg, "reco-batch-training", need_kafka=bool(cfg.get_path("batch.write_topic", False)))
    stages = _Stages()
    k = int(cfg.get_path("batch.k", 10))
    exclude = bool(cfg.get_path("batch.exclude_purchased", True))
    metric = str(cfg.get_path("batch.selection_metric", "map" if base.implicit_prefs else "rmse"))

    stages.start("read and clean")
    data_cfg = cfg.get_path("data")
    try:
        events, report = _load_events(spark, cfg, data_cfg)
    except (PySparkException, Py4JJavaError) as err:   # Spark cannot read the source as configured
        raise DataSourceError(f"cannot read {data_cfg.get('path')}: {_spark_error_line(err)}") from err
    events = events.cache()
    if report.clean_rows == 0:
        raise DataSourceError(f"no usable rows in {data_cfg.get('path')}: {_why_no_rows(report, data_cfg)}")

    stages.start("aggregate")
    count_mode = source_count_mode = str(data_cfg.get("count_mode", "rows"))
    cutoff = events.agg({"event_time": "max"}).first()[0]
    half_life = cfg.get_path("batch.recency.half_life_days", None)
    recency = {}
    if half_life is not None and cutoff is not None:
        from models.recency import weighted_events

        reference_ms = int(cutoff.timestamp() * 1000)
        events = weighted_events(events, reference_ms, float(half_life), count_mode).cache()
        count_mode = "quantity"     # the decayed weights are summed
        recency = {"recency_half_life_days": float(half_life), "recency_reference_ms": reference_ms}
        log.info("purchase counts decay with a half-life of %g days before %s", float(half_life), cutoff)
    pairs = aggregate(events, count_mode).cache()
    stats = pair_stats(pairs)
    stats.update(raw_rows=report.raw_rows, clean_rows=report.clean_rows, dropped=report.dropped_by_reason)
    log.info("%s customer-product pairs, %s customers, %s products", f"{stats['pairs']:,}",
             f"{stats['customers']:,}", f"{stats['products']:,}")
    log.info("purchase counts per pair: mean %.2f, sd %.2f, max %s", stats["count_mean"], stats["count_sd"],
             f"{stats['count_max']:,.0f}")
    indexed, maps = index_ids(pairs)
    indexed = indexed.cache()
    n_users, n_items = maps.n_users, maps.n_items

    stages.start("holdout split")
    method = split_method(cfg, data_cfg)
    split_input = indexed if method == "random" else indexed_events(events, maps)
    train, test = holdout_split(split_input, method=method,
                                test_fraction=float(cfg.get_path("batch.holdout.test_fraction", 0.2)),
                                seed=int(cfg.get_path("batch.holdout.seed", 42)),
                                count_mode=count_mode)
    train, test = train.cache(), test.cache()
    log.info("holdout (%s): train %s pairs, test %s pairs", method, f"{train.count():,}", f"{test.count():,}")

    scorers = scorer_candidates(cfg, metric, n_items)
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
        stages.start(f"cross-validation ({folds_k} folds x {len(grid)} ALS candidates x {len(scorers)} scorers)")
        score_fold = fold_scorer(k, exclude, metric, n_users, n_items, scorers, partitions, most_evaluated)
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

    stages.start("evaluation on the holdout")
    explicit = not base.implicit_prefs    # its RMSE needs the user factors on the driver
    holdout_factors = fit_als(train, chosen, n_users, n_items, collect_users=explicit or not on_executors)
    holdout = Split(train, evaluation_sample(test, n_users, most_evaluated), n_users, n_items, partitions)
    metrics = evaluate_holdout(holdout_factors, holdout, k, exclude, scorers, selected,
                                knn_from_config(cfg)[0])
    if chosen != base and metric not in LOWER_IS_BETTER:
        add_plain_als(metrics, fit_als(train, base, n_users, n_items, collect_users=not on_executors), holdout, k)
    metrics["split"] = method
    metrics["cross_validation"] = cv_summary
    metrics["selection"] = {"selected": selected.name, "model_type": selected.model_type,
                            "blend_weight": selected.blend_weight, "metric": metric,
                            "params": chosen.as_dict(), "by": f"{folds_k}-fold cross-validation" if cv_summary
                            else "configuration (no cross-validation)"}

    final_mode = str(cfg.get_path("batch.final_fit", "refit"))
    if final_mode == "refit" and selected.model_type in PARAMETER_FREE:
        # Its lists do not use the factors; the artifact keeps the holdout fit's for ALS-only readers.
        log.info("final fit skipped: the selected %s does not score with the ALS factors; the model keeps "
                 "the holdout fit's item factors, every customer folded in", selected.name)
        final_mode = "fold_in"
    all_pairs = None if on_executors else PairArrays.collect(indexed, n_users)
    popularity = item_popularity(indexed, n_items)
    if final_mode == "refit":
        stages.start("final fit on all data")
        final = fit_als(indexed, chosen, n_users, n_items, collect_users=not on_executors)
    elif final_mode == "fold_in":
        stages.start("final model: every customer folded into the holdout fit")
        # On the executors each task folds its customers in (per_customer.py).
        final = replace(holdout_factors, user_factors_df=None) if on_executors else \
            folded_final(holdout_factors, all_pairs, popularity.buyers)
    else:
        raise ValueError(f"batch.final_fit {final_mode!r}: use 'refit' (a second ALS fit on all data) or "
                         "'fold_in' (every customer's full history folded into the holdout fit's item factors)")

    stages.start(f"top-{k} for every customer")
    product_ids = ordered_ids(maps.products, "product_id", "item", n_items)
    segments = segment_popularity_params(spark, cfg, maps, indexed)
    params = {"count_mode": source_count_mode, **recency, **segments,
              **({"business_rules": rules.summary()} if rules is not None else {})}
    # Each run writes into its own version folder; the top-level files are the published model's.
    output_dir = ensure_output_dir(cfg)
    if on_executors:
        artifact = build_artifact(chosen, item_side_of(final), np.zeros(0, dtype=str), product_ids, popularity.buyers,
                             PairArrays.empty(), cutoff, stats, metrics, selected, params)
        artifact.lineage = build_lineage(cfg, stats, chosen.as_dict())
        if artifact.model_type == "item_knn":       # its neighbour table, from every customer's counts on Spark
            seed_item_neighbours(artifact, indexed, n_users)
        run_dir = output_dir / "versions" / artifact.version
        run_dir.mkdir(parents=True, exist_ok=True)
        stages.start("top-10 and the model's user side on the executors")
        outputs = run_on_executors(spark, cfg, indexed, maps, artifact, final.user_factors_df, k, exclude, run_dir,
                                   rules=rules)
        written, user_parts = outputs.written, outputs.user_parts
    else:
        customer_ids = ordered_ids(maps.customers, "customer_id", "user", n_users)
        artifact = build_artifact(chosen, final, customer_ids, product_ids, popularity.buyers, all_pairs, cutoff,
                             stats, metrics, selected, params)
        artifact.lineage = build_lineage(cfg, stats, chosen.as_dict())
        item_idx, scores, strategies = recommend_all(artifact, all_pairs, exclude, k, final, rules)
        stages.start("write recommendations")
        run_dir = output_dir / "versions" / artifact.version
        run_dir.mkdir(parents=True, exist_ok=True)
        again_idx, again_scores = buy_again_all(artifact, all_pairs, k, rules)
        written = write_recommendations(run_dir, customer_ids, product_ids, item_idx, scores, again_idx,
                                         again_scores)
        user_parts = None
        log_example(customer_ids, product_ids, item_idx, scores)
    log.info("recommendations written for %s customers to %s", f"{written:,}", run_dir)

    stages.start("publish")
    result = BatchResult(version=artifact.version, published=False, params=chosen,
                         model_type=artifact.model_type, metrics=metrics,
                         stats=stats, output_dir=output_dir, recommendations_written=written)
    published, reason = publish(cfg, artifact, metrics, metric_for_gate(cfg, base), exclude, user_parts)
    result.published, result.gate_reason = published, reason
    if published and (cfg.get_path("batch.write_table", False) or cfg.get_path("batch.write_topic", False)):
        stages.start("sinks")
        if on_executors:
            write_sinks(spark, cfg, outputs)
        else:
            write_driver_sinks(cfg, artifact, customer_ids, product_ids, item_idx, scores, strategies, indexed,
                         (again_idx, again_scores))
    stages.stop()
    result.stage_seconds = stages.seconds
    (run_dir / "run_summary.json").write_text(json.dumps(
        {"version": artifact.version, "published": published, "gate": reason, "model_type": artifact.model_type,
         "params": artifact.params, "business_rules": rules.summary() if rules is not None else None,
         "per_customer_work": "executors" if on_executors else "driver",
         "stats": jsonable(stats), "metrics": jsonable(metrics), "stage_seconds": stages.seconds}, indent=2))
    if on_executors:
        log.info("training report: not written on the executor path (it reads every customer's counts on the driver)")
        outputs.scored.unpersist()
    else:
        report = write_report(run_dir, all_pairs.indptr, all_pairs.indices, all_pairs.counts, item_idx,
                              popularity.buyers)
        if report is not None:
            log.info("training report: %s", report)
    if published:
        publish_files(run_dir, output_dir)
    for table in (events, pairs, indexed, train, test):
        table.unpersist()
    if not published and cfg.get_path("batch.publish.enabled", True):
        raise PublishRefused(reason)
    return result


def _spark_error_line(err: Exception) -> str:
    """The first line of what Spark reports (the Java exception's, not py4j's "An error occurred")."""
    java = getattr(err, "java_exception", None)
    text = str(java) if java is not None else str(err)
    return (text.strip().splitlines() or [type(err).__name__])[0]


def _why_no_rows(report, data_cfg: dict) -> str:
    """What to fix when no row survived cleaning: the commonest drop reason, with the setting."""
    from batch_training.data import UNPARSEABLE_TIME

    if not report.dropped_by_reason:
        return "check data.columns and the file"
    reason, count = max(report.dropped_by_reason.items(), key=lambda item: item[1])
    if reason == UNPARSEABLE_TIME:
        column = (data_cfg.get("columns") or {}).get("event_time")
        fmt = (data_cfg.get("columns") or {}).get("time_format")
        return (f"the time in column {column!r} did not parse in {count:,} of {report.raw_rows:,} rows "
                f"(data.columns.time_format is {fmt!r}): set data.columns.time_format to a Spark datetime "
                "pattern such as 'dd/MM/yyyy HH:mm', or to epoch_seconds / epoch_millis for numbers")
    return f"{count:,} of {report.raw_rows:,} rows were dropped as {reason}: check data.columns and the file"
