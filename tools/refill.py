"""python -m tools refill-table: re-fill the recommendations table after it was lost or emptied.

The table is only a copy of results computed elsewhere (the local endpoint keeps it in memory;
a real one can be dropped by mistake), so it can be rebuilt with the newest record per customer:

1. the table is created if missing;
2. every customer in the scoring query's state with purchases since the published model's
   cutoff is re-scored with that model exactly as the stream scores them (streaming/refresh.py)
   and gets a ``stream`` record;
3. every customer of the published version's batch lists (``recommendations.parquet`` that the
   batch job wrote for that version, ``<batch.output_dir>/versions/<version>/``) gets a ``batch``
   record.

Every write is the table's conditional newest-wins write (models.records.RecordWriter), so an
item already newer than the refill's record is never overwritten, and running it twice is
harmless. A stream record reflects purchases after the cutoff, so it is newer than the batch
record of the same customer: the stream records go first and the batch write then skips them
(a reader never sees the older batch list in between).

What runs where: the driver reads the store's pointer and metadata, loads the model once (to
broadcast it and to refuse a model the stream could not serve), creates the table and adds up
the counts. The per-customer work runs in Spark tasks (``mapInPandas``): reading the state
(one row per customer, Spark's state data source) and the batch lists, building and scoring the
records, and the conditional writes, with one RecordWriter per task. Nothing per customer is
collected to the driver.

Differences from the records the jobs wrote: a refilled stream record has no
``source_offsets`` (the state does not keep them) and no segment (events carry it, the state
does not), and the expired purchases still stored are left out as the stream leaves them out.
A refilled batch record has no ``last_event_ms`` (unknown: the batch lists file does not hold
it; the table orders that as the oldest) unless the file has a ``last_event_ms`` column, and
``computed_at`` is the version's creation time; so it replaces nothing that reflects a known
purchase.

Exit codes: 0 done, 1 no model published, 2 bad configuration or missing batch lists,
3 the DynamoDB endpoint cannot be reached, 130 interrupted (a re-run completes the table).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models.config import Config, ConfigError
from models.records import RecommendationRecord, RecordWriter, WriteSummary, now_ms
from tools import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NOTHING, EXIT_OK, EXIT_UNREACHABLE, ServiceUnreachable

log = logging.getLogger(__name__)

COUNTS_SCHEMA = "customers long, records long, written long, skipped long"
COUNTS = ("customers", "records", "written", "skipped")


class RefillError(RuntimeError):
    """The refill cannot run as configured; ``code`` is the exit code to report."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class RefillSummary:
    version: str
    batch_records: int = 0
    state_customers: int = 0
    stream_records: int = 0
    written: int = 0
    skipped_older: int = 0

    def __str__(self) -> str:
        return (f"model {self.version}: {self.batch_records:,} batch records, {self.state_customers:,} state "
                f"customers ({self.stream_records:,} with purchases since the cutoff, re-scored), "
                f"{self.written:,} items written, {self.skipped_older:,} skipped as older than the stored one")


# -- records (pure) -----------------------------------------------------------------------------
def batch_records(frame: pd.DataFrame, version: str, strategy: str,
                  computed_at_ms: int) -> list[RecommendationRecord]:
    """Batch records from rows of ``recommendations.parquet`` (customer_id, recommendations,
    scores, optionally buy_again/buy_again_scores, strategy, last_event_ms), as the batch job
    writes them to the table; ``strategy`` serves when the file has no such column."""
    n = len(frame)

    def column(name: str) -> list:
        return list(frame[name]) if name in frame else [None] * n

    records = []
    for customer, products, scores, again, again_scores, row_strategy, last in zip(
            frame["customer_id"], frame["recommendations"], frame["scores"], column("buy_again"),
            column("buy_again_scores"), column("strategy"), column("last_event_ms")):
        record = RecommendationRecord(
            customer_id=str(customer), product_ids=[str(p) for p in products], scores=[float(s) for s in scores],
            model_version=version, strategy=str(row_strategy or strategy),
            last_event_ms=None if last is None or pd.isna(last) else int(last),
            computed_at_ms=computed_at_ms, source="batch")
        if again is not None:
            record.extra["buy_again"] = [{"rank": rank, "product_id": str(p), "score": round(float(s), 6)}
                                         for rank, (p, s) in enumerate(zip(again, again_scores), 1)]
        records.append(record)
    return records


def _counts(customers: int, records: int, summary: WriteSummary) -> pd.DataFrame:
    return pd.DataFrame({"customers": [customers], "records": [records], "written": [summary.table_written],
                         "skipped": [summary.table_skipped_stale]})


# -- the Spark tasks ----------------------------------------------------------------------------
def _batch_task(cfg: Config, version: str, strategy: str, computed_at_ms: int) -> Callable:
    """mapInPandas function: batch-list rows in, one counts row per Arrow batch out (writes on the way)."""

    def write(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        writer = RecordWriter(cfg, to_topic=False, to_table=True)
        try:
            for batch in batches:
                records = batch_records(batch, version, strategy, computed_at_ms)
                yield _counts(len(batch), len(records), writer.write(records))
        finally:
            writer.close()

    return write


def _stream_task(cfg: Config, shared, k: int, exclude_purchased: bool, count_mode: str,
                 computed_at_ms: int, rules=None) -> Callable:
    """mapInPandas function: state customers in (purchases since the cutoff), re-scored with the
    broadcast model as the stream scores them (under the configured business rules, ``rules``: a
    broadcast or None), written; one counts row per Arrow batch out."""

    def write(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from streaming.refresh import records_for, score_customers
        from streaming.serving import ServingModel

        model = ServingModel.prepare(shared.value, count_mode)
        writer = RecordWriter(cfg, to_topic=False, to_table=True)
        try:
            for batch in batches:
                held = batch[batch["product_ids"].map(len) > 0].reset_index(drop=True)
                summary = WriteSummary()
                if len(held):
                    held["source_offsets"] = None      # not kept in the state
                    scored = score_customers(model, held, k, exclude_purchased,
                                             rules=rules.value if rules is not None else None)
                    summary = writer.write(records_for(model, held, scored, computed_at_ms))
                yield _counts(len(batch), len(held), summary)
        finally:
            writer.close()

    return write


def _run_counted(frame, task: Callable) -> dict[str, int]:
    """One Spark job: the task over every partition, its counts summed on the driver."""
    from pyspark.sql import functions as F

    row = frame.mapInPandas(task, COUNTS_SCHEMA).agg(*(F.sum(c).alias(c) for c in COUNTS)).first()
    return {c: int(row[c] or 0) for c in COUNTS}


def _spread(spark, frame):
    """At least one partition per core: the writes are the slow part and run per partition."""
    cores = spark.sparkContext.defaultParallelism
    return frame.repartition(cores) if frame.rdd.getNumPartitions() < cores else frame


def _exists(spark, uri: str) -> bool:
    """Whether a path exists on the file system Spark reads it from (local, hdfs://, s3a://)."""
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return bool(path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(path))


# -- the two sources ----------------------------------------------------------------------------
def state_customers(spark, checkpoint: str, cutoff_ms: int | None, ttl_ms: int, at_ms: int):
    """One row per customer in the state: customer_id, product_ids, quantities, event_times_ms of
    the purchases the stream would still count at ``at_ms`` (after the cutoff, not expired),
    oldest first; possibly none."""
    from pyspark.sql import functions as F

    from streaming.inspect_state import read_state_values

    values = read_state_values(spark, checkpoint)
    zipped = F.arrays_zip(F.col("product_ids").alias("product_id"), F.col("quantities").alias("quantity"),
                          F.col("event_times_ms").alias("event_time_ms"), F.col("arrived_ms").alias("arrived_ms"))

    def counted(p):
        alive = F.least(p["arrived_ms"] + F.lit(int(ttl_ms)), F.col("value_expires_ms")) > F.lit(at_ms)
        return alive if cutoff_ms is None else alive & (p["event_time_ms"] > F.lit(int(cutoff_ms)))

    kept = F.filter(zipped, counted)
    return values.select("customer_id", kept.getField("product_id").alias("product_ids"),
                         kept.getField("quantity").alias("quantities"),
                         kept.getField("event_time_ms").alias("event_times_ms"))


def batch_lists_path(cfg: Config, version: str) -> str:
    """Where the batch job wrote the lists of ``version``."""
    return str(cfg.path("batch.output_dir") / "versions" / version / "recommendations.parquet")


# -- the refill ---------------------------------------------------------------------------------
def refill(cfg: Config, spark, checkpoint: str | None = None, batch_lists: str | None = None) -> RefillSummary:
    """Re-fill the table (see the module docstring). ``checkpoint``: the scoring query's
    checkpoint (default ``<streaming.checkpoint_dir>/scoring``); ``batch_lists``: the parquet
    of the published version's lists (default ``batch_lists_path``)."""
    from botocore.exceptions import BotoCoreError

    from models.clients import ensure_table
    from models.store import ModelLoadError, ModelStore
    from streaming.settings import StreamingSettings
    from streaming.state import iso_to_ms

    settings = StreamingSettings.from_config(cfg)
    store = ModelStore.from_config(cfg)
    version = store.current_version()
    if version is None:
        raise RefillError(f"no model published in {store.uri}: the table is filled from the published model's "
                          "lists; run the batch job first", EXIT_NOTHING)
    try:
        metadata = store.load_metadata(version)
    except ModelLoadError as err:
        raise RefillError(str(err), EXIT_BAD_INPUT) from None
    batch_lists = batch_lists or batch_lists_path(cfg, version)
    if not _exists(spark, batch_lists):
        raise RefillError(f"no batch lists for the published model {version} at {batch_lists}: the batch job "
                          "writes them there (batch.output_dir); pass --batch-lists if they were moved",
                          EXIT_BAD_INPUT)
    checkpoint = checkpoint or f"{settings.checkpoint_dir.rstrip('/')}/scoring"
    try:
        ensure_table(cfg)
    except BotoCoreError as err:
        raise ServiceUnreachable(f"cannot reach DynamoDB at {cfg.get_path('dynamodb.endpoint_url', None) or 'AWS'} "
                                 f"({type(err).__name__}: {err})") from None

    summary = RefillSummary(version)
    started_ms = now_ms()
    if _exists(spark, f"{checkpoint}/state"):
        counts = _refill_from_state(cfg, spark, store, version, checkpoint, settings, started_ms)
        summary.state_customers, summary.stream_records = counts["customers"], counts["records"]
        summary.written, summary.skipped_older = counts["written"], counts["skipped"]
        log.info("stream records: %s", _line(counts))
    else:
        log.info("no streaming state at %s: batch lists only", checkpoint)

    strategy = "popularity" if metadata.get("model_type") == "popularity" else "personalized"
    created_ms = iso_to_ms(metadata.get("created_at")) or started_ms
    lists = _spread(spark, spark.read.parquet(batch_lists))
    counts = _run_counted(lists, _batch_task(cfg, version, strategy, created_ms))
    summary.batch_records = counts["records"]
    summary.written += counts["written"]
    summary.skipped_older += counts["skipped"]
    log.info("batch records: %s", _line(counts))
    return summary


def _refill_from_state(cfg: Config, spark, store, version: str, checkpoint: str, settings,
                       at_ms: int) -> dict[str, int]:
    from models.business_rules import RulesConfig, load_rules
    from models.store import ModelLoadError
    from streaming.serving import ModelNotServable, ServingModel

    count_mode = str(cfg.get_path("data.count_mode", "rows"))
    rules = load_rules(RulesConfig.from_config(cfg))      # the stream's rules (a bad file: ConfigError, exit 2)
    try:
        artifact = store.load(version)
        shared = spark.sparkContext.broadcast(artifact)      # pickled now, before any scorer cache
        model = ServingModel.prepare(artifact, count_mode)   # refuse what the stream would refuse
    except (ModelLoadError, ModelNotServable) as err:
        raise RefillError(f"the published model cannot be served: {err}", EXIT_BAD_INPUT) from None
    customers = _spread(spark, state_customers(spark, checkpoint, model.cutoff_ms, settings.state_ttl_ms, at_ms))
    shared_rules = spark.sparkContext.broadcast(rules) if rules is not None else None
    try:
        return _run_counted(customers, _stream_task(cfg, shared, settings.k, settings.exclude_purchased,
                                                    count_mode, at_ms, shared_rules))
    finally:
        shared.unpersist()
        if shared_rules is not None:
            shared_rules.unpersist()


def _line(counts: dict[str, int]) -> str:
    return (f"{counts['customers']:,} customers, {counts['records']:,} records, {counts['written']:,} written, "
            f"{counts['skipped']:,} skipped as older")


# -- the command --------------------------------------------------------------------------------
def _local_or_uri(value: str | None) -> str | None:
    """A command-line path made absolute (Spark would not resolve it from the working folder)."""
    return value if value is None or "://" in value else str(Path(value).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools refill-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="extra YAML config layered over config/default.yaml (repeatable)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="the scoring query's checkpoint (default <streaming.checkpoint_dir>/scoring)")
    parser.add_argument("--batch-lists", metavar="PATH",
                        help="the published version's recommendations.parquet (default "
                             "<batch.output_dir>/versions/<version>/recommendations.parquet)")
    args = parser.parse_args(argv)
    from models.config import load_config
    from models.logging_setup import setup_logging
    from models.spark import build_spark

    setup_logging("INFO")
    try:
        cfg = load_config(files=args.config or None)
        spark = build_spark(cfg, "reco-refill-table", need_kafka=False)
    except ConfigError as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    try:
        summary = refill(cfg, spark, checkpoint=_local_or_uri(args.checkpoint),
                         batch_lists=_local_or_uri(args.batch_lists))
    except (ConfigError, RefillError) as err:
        log.error("%s", err)
        return getattr(err, "code", EXIT_BAD_INPUT)
    except ServiceUnreachable as err:
        log.error("%s", err)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        log.error("interrupted: the items written so far stay (a re-run completes the table)")
        return EXIT_INTERRUPTED
    finally:
        spark.stop()
    log.info("table %s re-filled: %s", cfg.get_path("dynamodb.table"), summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
