"""The batch job's per-customer outputs computed on the executors, for customer bases of any size.

On this path (``batch.topk_engine``: ``spark``, or ``auto`` from ``batch.executor_min_customers``
customers on) the driver never holds an array with a row per customer. It keeps the item side of
the model (item factors, popularity, ids: what scoring anyone needs) and ships it to the
executors once. Over partitions of ``batch.customers_per_partition`` customers, the tasks:

1. write their part of the model's user side (ids, trained counts, factors) to the model store
   (``ModelStore.write_user_part``); the driver lists the parts in the version's metadata;
2. score their customers with the scoring code both jobs share (top-k with the final fit's
   factors, or ``models.scorers`` from the counts; the buy-again list), giving the lists the
   driver path gives (tests/integration/test_per_customer.py);
3. then Spark writes the lists as files (folders of part files), to the topic (its Kafka sink)
   and to the table (newest-wins conditional puts from every task, riding out an outage).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.config import Config

log = logging.getLogger("batch_training")

# One row per customer, as the tasks score them.
CUSTOMER_COLUMNS = ("customer_id", "items", "counts", "factors", "last_event_ms")
SCORED_SCHEMA = ("customer_id string, recommendations array<string>, scores array<double>, "
                 "buy_again array<string>, buy_again_scores array<double>, strategy string, last_event_ms long")
PART_SCHEMA = "name string, size long, sha256 string, rows long"


def use_executors(cfg: Config, n_users: int) -> bool:
    """Whether the per-customer work runs on the executors (``batch.topk_engine``)."""
    engine = str(cfg.get_path("batch.topk_engine"))
    if engine == "auto":
        return n_users >= int(cfg.get_path("batch.executor_min_customers"))
    if engine not in ("driver", "spark"):
        raise ValueError(f"batch.topk_engine {engine!r}: use auto, driver or spark")
    return engine == "spark"


def partitions_for(n_users: int, per_partition: int, spark=None) -> int:
    """Enough partitions that a task never holds more than ``per_partition`` customers, and, given
    the session, at least two per core (fewer left cores idle: one task scored a small base alone)."""
    cores = 2 * spark.sparkContext.defaultParallelism if spark is not None else 1
    return max(1, cores, math.ceil(n_users / max(1, per_partition)))


def customer_frame(indexed, customers, partitions: int, user_factors=None):
    """One row per customer: ids, trained counts (items ascending), the final fit's factors (None
    without), the newest purchase time; hash-partitioned by customer and sorted within each
    partition, so a retried task sees the same rows in the same order and writes the same part."""
    from pyspark.sql import functions as F

    grouped = indexed.groupBy("user").agg(F.sort_array(F.collect_list(F.struct("item", "count"))).alias("_pairs"),
                                          F.max("last_time").alias("_last"))
    frame = grouped.join(customers, "user").select(
        "user", "customer_id", F.col("_pairs.item").cast("array<int>").alias("items"),
        F.col("_pairs.count").cast("array<float>").alias("counts"),
        F.unix_millis(F.col("_last")).alias("last_event_ms"))
    if user_factors is not None:
        frame = frame.join(user_factors.select(F.col("id").alias("user"),
                                               F.col("features").cast("array<float>").alias("factors")), "user", "left")
    else:
        frame = frame.withColumn("factors", F.lit(None).cast("array<float>"))
    return frame.select(*CUSTOMER_COLUMNS).repartition(partitions, "customer_id").sortWithinPartitions("customer_id")


@dataclass(frozen=True)
class TaskSettings:
    """What the tasks need, and no more; ``connections`` stays out of the repr (credentials)."""

    version: str
    k: int
    exclude_purchased: bool
    use_factors: bool                 # ALS lists from the final fit's factors (else from the counts)
    outage_tolerance_ms: int
    computed_at_ms: int               # one time for every record of the run, in the table as on the topic
    connections: dict = field(hash=False, repr=False)

    @property
    def config(self) -> Config:
        return Config(dict(self.connections))


def partition_csr(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frame's trained counts as CSR (indptr, indices, counts), one row per customer."""
    lengths = frame["items"].map(len).to_numpy(np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([np.asarray(v, dtype=np.int64) for v in frame["items"]]) if len(frame) else \
        np.zeros(0, dtype=np.int64)
    counts = np.concatenate([np.asarray(v, dtype=np.float32) for v in frame["counts"]]) if len(frame) else \
        np.zeros(0, dtype=np.float32)
    return indptr, indices, counts


def score_partition(model, frame: pd.DataFrame, settings: TaskSettings, rules=None) -> pd.DataFrame:
    """The lists of one partition's customers (``SCORED_SCHEMA``), as the driver path computes them
    (``rules``: the business rules, models.business_rules)."""
    from models import scorers

    indptr, indices, counts = partition_csr(frame)
    k = settings.k
    if settings.use_factors:
        vectors = np.stack([np.asarray(v, dtype=np.float32) for v in frame["factors"]]) if len(frame) else \
            np.zeros((0, model.rank), dtype=np.float32)
        item_idx, scores = scorers.rank_vectors(model, vectors, k, rules=rules,
                                                exclude=(indptr, indices) if settings.exclude_purchased else None)
        strategies = [scorers.PERSONALIZED] * len(frame)
    else:
        item_idx, scores, strategies = scorers.recommend_from_counts(model, indptr, indices, counts, k,
                                                                     settings.exclude_purchased, rules=rules)
    again_idx, again_scores = scorers.buy_again(model, indptr, indices, counts, k, rules=rules)
    return pd.DataFrame({
        "customer_id": frame["customer_id"].astype(str).to_numpy(),
        "recommendations": _ids(model.item_ids, item_idx), "scores": _rounded(scores, item_idx),
        "buy_again": _ids(model.item_ids, again_idx), "buy_again_scores": _rounded(again_scores, again_idx),
        "strategy": list(strategies), "last_event_ms": frame["last_event_ms"].to_numpy()})


def _ids(item_ids: np.ndarray, idx: np.ndarray) -> list[list[str]]:
    return [[str(item_ids[i]) for i in row if i >= 0] for row in idx]


def _rounded(scores: np.ndarray, idx: np.ndarray) -> list[list[float]]:
    return [[round(float(s), 6) for s, i in zip(srow, row) if i >= 0] for srow, row in zip(scores, idx)]


def _whole_partition(frames: Iterator[pd.DataFrame]) -> pd.DataFrame:
    """A task's rows as one frame (partitions are sized to fit a task's memory)."""
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CUSTOMER_COLUMNS))


def scorer(model_broadcast, settings: TaskSettings, rules_broadcast=None):
    """mapInPandas: a partition's customers in, their lists out (``SCORED_SCHEMA``); the business
    rules, parsed once on the driver, come broadcast like the model (None: no rules)."""

    def score(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        frame = _whole_partition(frames)
        if len(frame):
            rules = rules_broadcast.value if rules_broadcast is not None else None
            yield score_partition(model_broadcast.value, frame, settings, rules)

    return score


def part_writer(model_broadcast, settings: TaskSettings):
    """mapInPandas: a partition's customers in, their part of the model's user side written to the
    store, its entry (``PART_SCHEMA``) out. Without a final fit's factors (``batch.final_fit:
    fold_in``) the part holds the customers' folded-in vectors, as the driver path stores them."""

    def write(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import TaskContext

        from models.scorers import user_vectors
        from models.store import ModelStore

        frame = _whole_partition(frames)
        if not len(frame):
            return
        part = frame[["customer_id", "items", "counts", "factors"]].copy()
        if part["factors"].isna().any():
            vectors = user_vectors(model_broadcast.value, *partition_csr(frame))
            part["factors"] = [list(v) for v in vectors]
        else:
            part["factors"] = [list(v) for v in part["factors"]]
        entry = ModelStore.from_config(settings.config).write_user_part(
            settings.version, TaskContext.get().partitionId(), part)
        yield pd.DataFrame([entry])[["name", "size", "sha256", "rows"]]

    return write


def table_writer(settings: TaskSettings, written, skipped):
    """foreachPartition: a partition's lists to the DynamoDB table (newest-wins puts, an outage
    ridden out up to ``batch.sink_outage_tolerance``); ``written``/``skipped``: accumulators."""

    def write(rows) -> None:
        from models.records import RecordWriter

        records = [record_from_row(row.asDict(), settings.version, settings.computed_at_ms) for row in rows]
        if not records:
            return
        writer = RecordWriter(settings.config, to_topic=False, to_table=True)
        try:
            summary = writer.write(records, outage_tolerance_s=settings.outage_tolerance_ms / 1000,
                                   label="batch job table", tolerance_setting="batch.sink_outage_tolerance")
        finally:
            writer.close()
        written.add(summary.table_written)
        skipped.add(summary.table_skipped_stale)

    return write


def record_from_row(row: dict, version: str, computed_at_ms: int):
    """The output record of one scored row (``SCORED_SCHEMA``), as the driver path builds it."""
    from models.records import RecommendationRecord

    last = row.get("last_event_ms")
    record = RecommendationRecord(
        customer_id=str(row["customer_id"]), product_ids=[str(p) for p in _listed(row["recommendations"])],
        scores=[float(s) for s in _listed(row["scores"])], model_version=version, strategy=str(row["strategy"]),
        last_event_ms=None if last is None or last != last else int(last),
        computed_at_ms=computed_at_ms, source="batch")
    record.extra["buy_again"] = [{"rank": rank, "product_id": str(p), "score": round(float(s), 6)}
                                 for rank, (p, s) in enumerate(zip(_listed(row["buy_again"]),
                                                                   _listed(row["buy_again_scores"])), 1)]
    return record


def _listed(value) -> list:
    """An array cell as a list: Spark rows give lists, Arrow frames numpy arrays, null None."""
    return [] if value is None else list(value)


def kafka_rows(settings: TaskSettings):
    """mapInPandas: scored rows in, the topic's (key, value) rows out, for Spark's Kafka sink."""

    def convert(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in frames:
            records = [record_from_row(row, settings.version, settings.computed_at_ms)
                       for row in frame.to_dict("records")]
            yield pd.DataFrame({"key": [r.customer_id.encode() for r in records],
                                "value": [r.to_json_bytes() for r in records]})

    return convert


# -- the driver's side: O(partitions) work, whatever the number of customers ---------------------
@dataclass
class ExecutorOutputs:
    scored: Any                  # the cached DataFrame of SCORED_SCHEMA rows (the sinks read it again)
    user_parts: list[dict]       # the store entries of the user side's parts, for the metadata
    settings: TaskSettings
    written: int


def run_on_executors(spark, cfg: Config, indexed, maps, artifact, user_factors_df, k: int, exclude: bool,
                     run_dir: Path, rules=None) -> ExecutorOutputs:
    """Steps 1 to 3 of the module docstring up to the files; the sinks wait for the gate
    (``write_sinks``). ``artifact`` is the item side of the version being written;
    ``user_factors_df`` the final fit's (ALS ``userFactors``), None with ``batch.final_fit: fold_in``;
    ``rules`` the business rules (models.business_rules), None for none."""
    from models.clients import executor_connections
    from models.records import now_ms
    from streaming.settings import duration_ms

    partitions = partitions_for(maps.n_users, int(cfg.get_path("batch.customers_per_partition")), spark)
    settings = TaskSettings(version=artifact.version, k=k, exclude_purchased=exclude,
                            use_factors=user_factors_df is not None and artifact.model_type == "als",
                            outage_tolerance_ms=duration_ms(cfg.get_path("batch.sink_outage_tolerance"),
                                                            "batch.sink_outage_tolerance"),
                            computed_at_ms=now_ms(), connections=executor_connections(cfg))
    rows = customer_frame(indexed, maps.customers, partitions, user_factors_df).cache()
    model = spark.sparkContext.broadcast(artifact)
    started = time.perf_counter()
    parts = sorted((row.asDict() for row in rows.mapInPandas(part_writer(model, settings), PART_SCHEMA).collect()),
                   key=lambda entry: entry["name"])
    log.info("the model's user side: %s customers in %d parts written by the executors in %.1f s",
             f"{sum(p['rows'] for p in parts):,}", len(parts), time.perf_counter() - started)
    rules_broadcast = spark.sparkContext.broadcast(rules) if rules is not None else None
    scored = rows.mapInPandas(scorer(model, settings, rules_broadcast), SCORED_SCHEMA).cache()
    started = time.perf_counter()
    write_files(scored, run_dir)
    written = scored.count()
    log.info("top-%d and buy-again lists of %s customers scored and written by the executors (%d partitions) "
             "in %.1f s", k, f"{written:,}", partitions, time.perf_counter() - started)
    rows.unpersist()
    return ExecutorOutputs(scored=scored, user_parts=parts, settings=settings, written=written)


def seed_item_neighbours(artifact, indexed, n_users: int) -> None:
    """The item-kNN neighbour table of every customer's purchases, built by Spark
    (``executor_eval.item_neighbours_on_executors``), set on the artifact before it is shipped and
    stored: the tasks score with it as the driver path does with the table it builds."""
    from batch_training.executor_eval import item_neighbours_on_executors
    from models.scorers import knn_params

    artifact.item_neighbours = item_neighbours_on_executors(indexed, n_users, artifact.n_items, knn_params(artifact))


def write_files(scored, folder: Path) -> None:
    """recommendations.parquet and recommendations.csv as folders of part files (any Parquet or
    CSV reader takes the folder as one table), with the driver path's columns."""
    from pyspark.sql import functions as F

    scored.select("customer_id", "recommendations", "scores", "buy_again", "buy_again_scores") \
        .write.mode("overwrite").parquet(str(folder / "recommendations.parquet"))
    six_places = F.transform("scores", lambda s: F.format_string("%.6f", s))
    scored.select("customer_id", F.concat_ws(" ", "recommendations").alias("recommendations"),
                  F.concat_ws(" ", six_places).alias("scores")) \
        .write.mode("overwrite").option("header", True).csv(str(folder / "recommendations.csv"))


def write_sinks(spark, cfg: Config, outputs: ExecutorOutputs) -> None:
    """Every customer's list to the topic (Spark's Kafka sink) and/or the table (from the tasks)."""
    from models.clients import ensure_table, ensure_topics, spark_kafka_sink_options

    settings = outputs.settings
    to_topic, to_table = bool(cfg.get_path("batch.write_topic")), bool(cfg.get_path("batch.write_table"))
    # Created as the contract says (a compacted topic, the keyed table): a missing table would
    # otherwise look like an outage and be retried for the whole tolerance.
    if to_topic:
        ensure_topics(cfg)
        (outputs.scored.mapInPandas(kafka_rows(settings), "key binary, value binary")
         .write.format("kafka").options(**spark_kafka_sink_options(cfg, settings.outage_tolerance_ms)).save())
        log.info("sinks: %s records to the topic %s", f"{outputs.written:,}",
                 cfg.get_path("kafka.topics.recommendations"))
    if to_table:
        ensure_table(cfg)
        written, skipped = spark.sparkContext.accumulator(0), spark.sparkContext.accumulator(0)
        outputs.scored.foreachPartition(table_writer(settings, written, skipped))
        log.info("sinks: %s table items written, %s skipped as older than the stored one", f"{written.value:,}",
                 f"{skipped.value:,}")
