"""What the batch job puts out: the model artifact it publishes, and on the driver path every
customer's top-k and buy-again lists, the recommendation files and the sinks (table, topic)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from batch_training.candidates import Candidate
from batch_training.datasets import source_placeholders
from batch_training.train import AlsParams, Factors, PairArrays
from models.config import Config

log = logging.getLogger("batch_training")


def recommend_all(artifact, all_pairs: PairArrays, exclude_purchased: bool, k: int, factors: Factors,
                  rules=None):
    """Top-k for every customer on the driver: ``(item_idx, scores, strategies)``.

    ALS lists come from the final fit's factors (blocked products, not recommendForAllUsers),
    ranked as models.scorers ranks an ALS model (popularity penalty, business rules); the other
    model types are scored by models.scorers from the counts, as the stream scores them. The
    executor path (per_customer.py) gives the same lists. ``rules``: models.business_rules.
    """
    from models.scorers import rank_vectors, recommend_from_counts

    if artifact.model_type != "als":
        return recommend_from_counts(artifact, all_pairs.indptr, all_pairs.indices, all_pairs.counts, k,
                                     exclude_purchased, rules=rules)
    users = np.arange(factors.user_factors.shape[0])
    item_idx, scores = rank_vectors(artifact, factors.user_factors, k,
                                    exclude=all_pairs.rows(users) if exclude_purchased else None, rules=rules)
    return item_idx, scores, ["personalized"] * len(item_idx)


def buy_again_all(artifact, pairs: PairArrays, k: int, rules=None) -> tuple[np.ndarray, np.ndarray]:
    from models.scorers import buy_again

    return buy_again(artifact, pairs.indptr, pairs.indices, pairs.counts, k, rules=rules)


def ordered_ids(frame, id_column: str, index_column: str, size: int) -> np.ndarray:
    mapping = frame.toPandas()
    ids = np.empty(size, dtype=object)
    ids[mapping[index_column].to_numpy()] = mapping[id_column].astype(str).to_numpy()
    return ids.astype(str)


def segment_popularity_params(spark, cfg: Config, maps, indexed, top_n: int = 100) -> dict:
    """``params`` entries with each segment's best sellers (``data.columns.segment``, e.g. a country),
    for customers who have no known purchase yet; {} without a segment column. A customer's segment
    is the one most of their rows carry (ties by name). Aggregated by Spark, so only the table
    (segments x ``top_n``) reaches the driver; the same table as models.scorers.segment_popularity."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from batch_training.data import ColumnMapping, _id_text
    from batch_training.datasets import load_source

    data_cfg = cfg.get_path("data")
    mapping = ColumnMapping.from_config(data_cfg.get("columns") or {})
    if not mapping.segment:
        return {}
    raw = load_source(spark, data_cfg, source_placeholders(cfg))
    rows = (raw.select(_id_text(mapping.customer_id, dict(raw.dtypes)[mapping.customer_id]).alias("customer_id"),
                       F.col(mapping.segment).cast("string").alias("segment"))
            .where(F.col("segment").isNotNull() & (F.col("segment") != "")).groupBy("customer_id", "segment").count())
    best = Window.partitionBy("customer_id").orderBy(F.desc("count"), "segment")
    user_segment = (rows.withColumn("_rank", F.row_number().over(best)).where("_rank = 1")
                    .join(maps.customers, "customer_id").select("user", "segment"))
    buyers = (indexed.select("user", "item").join(user_segment, "user").groupBy("segment", "item")
              .agg(F.count("*").cast("double").alias("buyers")))
    order = Window.partitionBy("segment").orderBy(F.desc("buyers"), "item")
    top = (buyers.withColumn("_rank", F.row_number().over(order)).where(F.col("_rank") <= top_n)
           .orderBy("segment", "_rank").toPandas())
    table = {str(name): {"items": group["item"].astype(int).tolist(), "buyers": group["buyers"].tolist()}
             for name, group in top.groupby("segment", sort=True)}
    log.info("segment popularity (%s): %d segments", mapping.segment, len(table))
    return {"segment_column": mapping.segment, "segment_popularity": table}


def build_artifact(params: AlsParams, factors: Factors, customer_ids, product_ids, buyers, pairs: PairArrays,
                   cutoff, stats: dict, metrics: dict, selected: Candidate | None = None, recency: dict | None = None):
    """The model to publish. Every type keeps the ALS factors, so a scorer that only knows ALS can
    still load it (and the blend needs them)."""
    from models.artifact import ModelArtifact, new_version
    from models.scorers import item_neighbours_of

    selected = selected or Candidate("als")
    cutoff_iso = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" if cutoff is not None else None
    artifact = ModelArtifact(
        version=new_version(), model_type=selected.model_type, item_ids=product_ids,
        item_factors=factors.item_factors,
        user_ids=customer_ids, user_factors=factors.user_factors, popularity=buyers.astype(np.float64),
        user_items_indptr=pairs.indptr, user_items_indices=pairs.indices, user_items_counts=pairs.counts,
        params={**params.as_dict(), **selected.params(), **(recency or {})}, cutoff_time=cutoff_iso,
        stats=jsonable(stats),
        metrics=jsonable(metrics))
    if artifact.model_type == "item_knn" and artifact.n_users:
        artifact.item_neighbours = item_neighbours_of(artifact)   # stored: the stream never rebuilds it
    artifact.validate()
    return artifact


def item_side_of(factors: Factors) -> Factors:
    """The factors without any user row: the executor path never gathers them."""
    return replace(factors, user_factors=np.zeros((0, factors.item_factors.shape[1]), dtype=np.float32),
                   user_factors_df=None)


def ensure_output_dir(cfg: Config) -> Path:
    path = cfg.path("batch.output_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_recommendations(output_dir: Path, customer_ids: np.ndarray, product_ids: np.ndarray,
                          item_idx: np.ndarray, scores: np.ndarray, again_idx: np.ndarray | None = None,
                          again_scores: np.ndarray | None = None) -> int:
    """recommendations.csv (one row per customer, like the original) and recommendations.parquet
    (which also holds the buy-again list: products the customer bought before)."""
    import pandas as pd

    lists = [[product_ids[i] for i in row if i >= 0] for row in item_idx]
    score_lists = [[round(float(s), 6) for s, i in zip(srow, row) if i >= 0] for srow, row in zip(scores, item_idx)]
    frame = pd.DataFrame({"customer_id": customer_ids, "recommendations": lists, "scores": score_lists})
    extended = frame
    if again_idx is not None:
        extended = frame.assign(buy_again=[[product_ids[i] for i in row if i >= 0] for row in again_idx],
                                buy_again_scores=[[round(float(s), 6) for s, i in zip(srow, row) if i >= 0]
                                                  for srow, row in zip(again_scores, again_idx)])
    extended.to_parquet(output_dir / "recommendations.parquet", index=False)
    csv = frame.assign(recommendations=[" ".join(x) for x in lists],
                       scores=[" ".join(f"{s:.6f}" for s in x) for x in score_lists])
    csv.to_csv(output_dir / "recommendations.csv", index=False)
    return len(frame)


def log_example(customer_ids, product_ids, item_idx, scores) -> None:
    if len(customer_ids) == 0:
        return
    row = 0
    ranked = ", ".join(f"{product_ids[i]} ({s:.3f})" for i, s in zip(item_idx[row], scores[row]) if i >= 0)
    log.info("example: customer %s top-%d: %s", customer_ids[row], item_idx.shape[1], ranked)


def write_driver_sinks(cfg: Config, artifact, customer_ids, product_ids, item_idx, scores, strategies,
                       indexed, again: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Every customer's list to the table and/or topic, through the writer the streaming job uses."""
    from pyspark.sql import functions as F

    from models.records import RecordWriter, build_records

    last = indexed.groupBy("user").agg(F.max("last_time").alias("t")).toPandas()
    last_ms = np.full(len(customer_ids), None, dtype=object)
    last_ms[last["user"].to_numpy()] = [None if t is None or t != t else int(t.timestamp() * 1000)
                                        for t in last["t"]]
    records = build_records(customer_ids, item_idx, scores, product_ids, artifact.version,
                            list(strategies), list(last_ms), source="batch")
    if again is not None:
        for record, row, row_scores in zip(records, *again):
            record.extra["buy_again"] = [{"rank": rank, "product_id": str(product_ids[i]), "score": round(float(s), 6)}
                                         for rank, (i, s) in enumerate(zip(row, row_scores), 1) if i >= 0]
    from models.clients import ensure_table, ensure_topics
    from streaming.settings import duration_ms

    to_topic, to_table = bool(cfg.get_path("batch.write_topic")), bool(cfg.get_path("batch.write_table"))
    # Created as the contract says (a compacted topic, the keyed table): a missing table would
    # otherwise look like an outage and be retried for the whole tolerance.
    if to_topic:
        ensure_topics(cfg)
    if to_table:
        ensure_table(cfg)
    writer = RecordWriter(cfg, to_topic=to_topic, to_table=to_table)

    tolerance_ms = duration_ms(cfg.get_path("batch.sink_outage_tolerance"), "batch.sink_outage_tolerance")
    try:
        summary = writer.write(records, outage_tolerance_s=tolerance_ms / 1000, label="batch job sinks",
                               tolerance_setting="batch.sink_outage_tolerance")
    finally:
        writer.close()
    log.info("sinks: %s", summary)


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    return value
