"""The job's input: the source's events read and cleaned (with what to fix when none survive), then
counted per customer and product, decayed by recency when set, and indexed for every later stage."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from batch_training.data import DataSourceError, aggregate, index_ids, pair_stats
from batch_training.datasets import load_events, source_placeholders
from models.config import Config

log = logging.getLogger("batch_training")


@dataclass
class Purchases:
    """The cleaned events and their aggregated, indexed purchase counts (cached until the job ends)."""
    events: Any
    pairs: Any
    indexed: Any
    maps: Any
    stats: dict[str, Any]
    cutoff: Any                 # the newest event's time
    count_mode: str             # how the pairs are counted ("quantity" once decayed weights are summed)
    source_count_mode: str      # data.count_mode as configured
    recency: dict[str, Any]


def read_and_clean(spark, cfg: Config, data_cfg: dict):
    """The source's cleaned events (cached) and the cleaning report; DataSourceError when Spark
    cannot read the source or no row survives cleaning."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        events, report = _load_events(spark, cfg, data_cfg)
    except (PySparkException, Py4JJavaError) as err:   # Spark cannot read the source as configured
        raise DataSourceError(f"cannot read {data_cfg.get('path')}: {_spark_error_line(err)}") from err
    events = events.cache()
    if report.clean_rows == 0:
        raise DataSourceError(f"no usable rows in {data_cfg.get('path')}: {_why_no_rows(report, data_cfg)}")
    return events, report


def count_purchases(cfg: Config, data_cfg: dict, events, report) -> Purchases:
    """Purchase counts per customer and product (weighted by ``batch.recency.half_life_days`` when
    set), their statistics, and the pairs with the ids indexed."""
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
    return Purchases(events, pairs, indexed, maps, stats, cutoff, count_mode, source_count_mode, recency)


def _load_events(spark, cfg: Config, data_cfg: dict):
    """``load_events`` with the stream's ``streaming.max_future_skew`` rule against this run's clock:
    a future-dated row would become the cutoff, and the stream ignores purchases before it."""
    from streaming.settings import duration_ms

    skew_ms = duration_ms(cfg.get_path("streaming.max_future_skew"), "streaming.max_future_skew")
    return load_events(spark, data_cfg, source_placeholders(cfg), max_future_skew_ms=skew_ms)


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
