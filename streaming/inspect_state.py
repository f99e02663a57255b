"""python -m streaming.inspect_state: what the scoring query's checkpoint holds, read with Spark's
state data source (works on a stopped job's checkpoint, or a copy of a running one's).

    python -m streaming.inspect_state                 # purchases held, customers, TTL horizon
    python -m streaming.inspect_state --customer C1   # one customer's purchases since the cutoff

The state is one value per customer (the ``purchases`` arrays of streaming/state.py); it is shown
one row per purchase. A purchase past its expiry may still be stored until the customer is next
seen (it is dropped then, never counted) or the customer's whole value expires.
"""
from __future__ import annotations

import argparse
import sys

from streaming.state import STATE_SCHEMA, STATE_VARIABLE


def _ensure_state_coordinator(spark) -> None:
    """The state reader needs the driver's state store coordinator, which Spark creates only
    when a streaming query starts: run a trivial one in a session that has not run any."""
    query = spark.readStream.format("rate").option("rowsPerSecond", 1).load().writeStream.format("noop").start()
    try:
        query.processAllAvailable()
    finally:
        query.stop()


def read_state_values(spark, scoring_checkpoint: str):
    """The state as stored, one row per customer: customer_id, the arrays of the ``purchases``
    value (event_ids, product_ids, quantities, event_times_ms, arrived_ms; oldest event first)
    and value_expires_ms (when the whole value expires). No shuffle: a reader that needs one
    row per customer (tools/refill.py) should not explode and regroup the purchases."""
    from pyspark.sql import functions as F

    from streaming.job import ROCKSDB_PROVIDER

    spark.conf.set("spark.sql.streaming.stateStore.providerClass", ROCKSDB_PROVIDER)
    _ensure_state_coordinator(spark)
    state = spark.read.format("statestore").option("stateVarName", STATE_VARIABLE).load(scoring_checkpoint)
    fields = [column.split()[0] for column in STATE_SCHEMA.split(", ")]
    return state.select(F.col("key.customer_id").alias("customer_id"),
                        *(F.col(f"value.value.{name}").alias(name) for name in fields),
                        F.col("value.ttlExpirationMs").alias("value_expires_ms"))


def read_purchase_state(spark, scoring_checkpoint: str, ttl_ms: int | None = None):
    """The purchases held in the state, one row per purchase: customer_id, event_id, product_id,
    quantity, event_time_ms, arrived_ms (processing time it entered the state), expires_ms (when
    it leaves: ``arrived_ms + ttl_ms``, or the customer's whole value expiring if that is
    earlier; without ``ttl_ms`` the latter)."""
    from pyspark.sql import functions as F

    values = read_state_values(spark, scoring_checkpoint)
    purchases = values.select(
        "customer_id", "value_expires_ms",
        F.explode(F.arrays_zip(F.col("event_ids").alias("event_id"), F.col("product_ids").alias("product_id"),
                               F.col("quantities").alias("quantity"), F.col("event_times_ms").alias("event_time_ms"),
                               F.col("arrived_ms").alias("arrived_ms"))).alias("p"))
    expires = F.col("value_expires_ms") if ttl_ms is None else \
        F.least(F.col("p.arrived_ms") + F.lit(int(ttl_ms)), F.col("value_expires_ms"))
    return purchases.select("customer_id", "p.event_id", "p.product_id", "p.quantity", "p.event_time_ms",
                            "p.arrived_ms", expires.alias("expires_ms"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming.inspect_state", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE")
    parser.add_argument("--customer", help="show this customer's purchases")
    args = parser.parse_args(argv)

    from pyspark.sql import functions as F

    from models.config import load_config
    from models.logging_setup import setup_logging
    from models.spark import build_spark
    from streaming.settings import StreamingSettings

    setup_logging("WARNING")
    cfg = load_config(files=args.config or None)
    settings = StreamingSettings.from_config(cfg)
    checkpoint = f"{settings.checkpoint_dir.rstrip('/')}/scoring"
    spark = build_spark(cfg, "reco-streaming-inspect", need_kafka=False)
    try:
        state = read_purchase_state(spark, checkpoint, settings.state_ttl_ms)
        if args.customer:
            state.where(F.col("customer_id") == args.customer).orderBy("event_time_ms").show(1000, truncate=False)
        else:
            state.agg(F.countDistinct("customer_id").alias("customers"), F.count(F.lit(1)).alias("purchases"),
                      F.timestamp_millis(F.max("event_time_ms")).alias("newest_purchase"),
                      F.timestamp_millis(F.min("expires_ms")).alias("next_expiry")).show(truncate=False)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
