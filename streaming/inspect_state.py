"""python -m streaming.inspect_state: what the scoring query's checkpoint holds, read with Spark's
state data source (works on a stopped job's checkpoint, or a copy of a running one's).

    python -m streaming.inspect_state                 # purchases held, customers, TTL horizon
    python -m streaming.inspect_state --customer C1   # one customer's purchases since the cutoff
"""
from __future__ import annotations

import argparse
import sys

STATE_VARIABLE = "purchases"


def _ensure_state_coordinator(spark) -> None:
    """The state reader needs the driver's state store coordinator, which Spark creates only
    when a streaming query starts: run a trivial one in a session that has not run any."""
    query = spark.readStream.format("rate").option("rowsPerSecond", 1).load().writeStream.format("noop").start()
    try:
        query.processAllAvailable()
    finally:
        query.stop()


def read_purchase_state(spark, scoring_checkpoint: str):
    """The purchases held in the state: customer_id, event_id, product_id, quantity,
    event_time_ms, ttl_expiration_ms (one row per purchase)."""
    from pyspark.sql import functions as F

    from streaming.job import ROCKSDB_PROVIDER

    spark.conf.set("spark.sql.streaming.stateStore.providerClass", ROCKSDB_PROVIDER)
    _ensure_state_coordinator(spark)
    state = spark.read.format("statestore").option("stateVarName", STATE_VARIABLE).load(scoring_checkpoint)
    return state.select(F.col("key.customer_id").alias("customer_id"),
                        F.col("user_map_key.event_id").alias("event_id"),
                        F.col("user_map_value.value.product_id").alias("product_id"),
                        F.col("user_map_value.value.quantity").alias("quantity"),
                        F.col("user_map_value.value.event_time_ms").alias("event_time_ms"),
                        F.col("user_map_value.ttlExpirationMs").alias("ttl_expiration_ms"))


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
    checkpoint = f"{StreamingSettings.from_config(cfg).checkpoint_dir.rstrip('/')}/scoring"
    spark = build_spark(cfg, "reco-streaming-inspect", need_kafka=False)
    try:
        state = read_purchase_state(spark, checkpoint)
        if args.customer:
            state.where(F.col("customer_id") == args.customer).orderBy("event_time_ms").show(1000, truncate=False)
        else:
            state.agg(F.countDistinct("customer_id").alias("customers"), F.count(F.lit(1)).alias("purchases"),
                      F.timestamp_millis(F.max("event_time_ms")).alias("newest_purchase"),
                      F.timestamp_millis(F.min("ttl_expiration_ms")).alias("next_expiry")).show(truncate=False)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
