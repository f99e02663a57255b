"""The ``reco-quality`` query: live hit@k of the emitted lists, beside a popularity baseline.

It reads the transactions topic and the job's own recommendations topic (one Kafka source, its
own checkpoint ``{streaming.checkpoint_dir}/quality``, its own slower trigger), judges each
customer's purchases against the list shown to them (streaming/quality.py), and in its
foreachBatch adds the few (model version, strategy) counts to

- Prometheus counters (``reco_quality_*``, streaming/observability.py) when the endpoint is on;
- a summary window, published as one record on ``kafka.topics.quality`` every
  ``streaming.quality.summary_interval`` (by the first batch past it, or by a timer when no input
  comes, and at stop; windows that judged nothing are not published), through Spark's Kafka
  writer. Schema: docs/quality-summary.schema.json.

The scoring query, its checkpoint and its state are untouched: the monitor can be turned on or
off (``streaming.quality.enabled``) on an existing deployment. A crash replays the quality
batch from its checkpoint; a window published just before the crash may then count that batch
twice (at least once per window).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import numpy as np
import pandas as pd

from models.config import Config
from models.records import iso_utc, now_ms
from streaming.events import ValidationRules, validate_values
from streaming.quality import (
    INPUT_COLUMNS,
    INPUT_SCHEMA,
    LIST,
    MAX_REMEMBERED,
    OUTPUT_SCHEMA,
    PURCHASE,
    QualityProcessor,
    Tally,
)
from streaming.settings import StreamingSettings

log = logging.getLogger(__name__)

SUMMARY_SCHEMA_VERSION = 1
BASELINE = "popularity"


def quality_source(spark, cfg: Config, settings: StreamingSettings):
    """Both topics, uncapped: whenever a list is read, the purchases it reflects are read too."""
    from models.clients import spark_kafka_options

    return (spark.readStream.format("kafka").options(**spark_kafka_options(cfg))
            .option("subscribe", f"{settings.transactions_topic},{settings.recommendations_topic}")
            .option("startingOffsets", settings.starting_offsets).load())


def parse_rows(raw: pd.DataFrame, rules: ValidationRules, transactions_topic: str) -> pd.DataFrame:
    """Raw Kafka rows (topic, partition, offset, value, kafka_ts_ms) -> ``INPUT_SCHEMA`` rows: the
    valid purchases and the stream's lists (batch lists and invalid events are left out). Pure
    (no Spark), for the unit tests."""
    out: list[tuple] = []
    is_tx = (raw["topic"] == transactions_topic).to_numpy()
    partitions = (raw["topic"].astype(str) + "-" + raw["partition"].astype(str)).tolist()
    offsets = raw["offset"].astype(np.int64).tolist()
    tx_rows = np.flatnonzero(is_tx)
    if len(tx_rows):
        valid = validate_values([raw["value"].iat[i] for i in tx_rows], rules,
                                raw["kafka_ts_ms"].to_numpy(np.int64)[tx_rows].tolist())
        for i, customer, event_id, product, reason in zip(tx_rows, valid["customer_id"], valid["event_id"],
                                                          valid["product_id"], valid["reason"]):
            if reason is None or reason != reason:      # valid (None / NaN reason)
                out.append((customer, PURCHASE, event_id, product, partitions[i], offsets[i],
                            None, None, None, None, None))
    for i in np.flatnonzero(~is_tx):
        try:
            record = json.loads(raw["value"].iat[i])
        except (TypeError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("source") != "stream" or not record.get("customer_id"):
            continue
        out.append((str(record["customer_id"]), LIST, None, None, partitions[i], offsets[i],
                    [str(r["product_id"]) for r in record.get("recommendations") or []],
                    str(record.get("model_version")), str(record.get("strategy")),
                    {str(k): int(v) for k, v in (record.get("source_offsets") or {}).items()},
                    int(record.get("computed_at_ms") or 0)))
    return pd.DataFrame.from_records(out, columns=list(INPUT_COLUMNS))


def quality_stream(spark, cfg: Config, settings: StreamingSettings, rules: ValidationRules):
    """The per-customer judgments (``streaming.quality.OUTPUT_SCHEMA`` rows)."""
    from pyspark.sql import functions as F

    topic = settings.transactions_topic

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for raw in batches:
            yield parse_rows(raw, rules, topic)

    raw = quality_source(spark, cfg, settings).select(
        "topic", "partition", "offset", "value",
        (F.unix_millis(F.col("timestamp").cast("timestamp"))).alias("kafka_ts_ms"))
    return raw.mapInPandas(parse, INPUT_SCHEMA).groupBy("customer_id").transformWithState(
        statefulProcessor=QualityProcessor(settings.state_ttl_ms, settings.k), outputStructType=OUTPUT_SCHEMA,
        outputMode="Update", timeMode="ProcessingTime")


def summary_record(tally: Tally, start_ms: int, end_ms: int, k: int) -> dict:
    """One window's counts as the documented summary record (docs/quality-summary.schema.json)."""
    def rate(part: int, whole: int) -> float | None:
        return round(part / whole, 6) if whole else None

    return {"schema_version": SUMMARY_SCHEMA_VERSION, "window_start": iso_utc(start_ms), "window_start_ms": start_ms,
            "window_end": iso_utc(end_ms), "window_end_ms": end_ms, "k": k, "baseline": BASELINE,
            "groups": [{"model_version": v, "strategy": s, "judged": j, "hits": h, "hit_rate": rate(h, j),
                        "baseline_hits": b, "baseline_hit_rate": rate(b, j)} for v, s, j, h, b in tally.rows()]}


class QualityMonitor:
    """The quality query's foreachBatch (driver): O(versions x strategies) work per batch.

    A window is published when ``streaming.quality.summary_interval`` has passed, by the next
    micro-batch or, when no input comes (Spark runs no micro-batch then), by a timer thread, so a
    judged window never waits for traffic; and at stop. Records go through Spark's Kafka writer,
    with the connection options the scoring query's sink uses.
    """

    def __init__(self, spark, cfg: Config, settings: StreamingSettings, holder, exporter=None):
        from models.clients import spark_kafka_sink_options

        self.spark = spark
        self.settings = settings
        self.holder = holder
        self.exporter = exporter
        self.total = Tally()               # since the job started (tests, the stop line)
        self._window = Tally()
        self._window_start_ms = now_ms()
        self._lock = threading.Lock()
        self._sink_options = {**spark_kafka_sink_options(cfg, settings.sink_outage_tolerance_ms),
                              "topic": settings.quality_topic}
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._flush_when_due, name="quality-summary", daemon=True)
        self._timer.start()

    def __call__(self, batch_df, batch_id: int) -> None:
        from pyspark.sql import functions as F

        from streaming.served import hand_popular_to_executors

        model = self.holder.model          # what the scoring query serves now (no store poll here)
        popular = [] if model is None else [str(model.artifact.item_ids[i]) for i in
                                            model.artifact.popularity_order()[:self.settings.k + MAX_REMEMBERED]]
        hand_popular_to_executors(batch_df.sparkSession.sparkContext, popular)
        sums = (batch_df.groupBy("model_version", "strategy")
                .agg(F.sum("judged").alias("judged"), F.sum("hits").alias("hits"),
                     F.sum("baseline_hits").alias("baseline_hits")).collect())
        tally = Tally()
        for row in sums:
            tally.add(row["model_version"], row["strategy"], int(row["judged"]), int(row["hits"]),
                      int(row["baseline_hits"]))
        if self.exporter is not None:
            self.exporter.on_quality(tally)
        with self._lock:
            self.total.merge(tally)
            self._window.merge(tally)
        if self._due():
            self.flush()

    def _due(self) -> bool:
        return now_ms() - self._window_start_ms >= self.settings.quality_summary_interval_ms

    def _flush_when_due(self) -> None:
        """The timer: a window that is due is published even when no micro-batch runs."""
        period_s = max(0.5, self.settings.quality_summary_interval_ms / 4000)
        while not self._closed.wait(period_s):
            if self._due():
                self.flush()

    def flush(self) -> dict | None:
        """Publish the current window (if it judged anything) and start the next; returns the record."""
        with self._lock:
            window, start = self._window, self._window_start_ms
            self._window, self._window_start_ms = Tally(), now_ms()
        if not window.counts:
            return None
        record = summary_record(window, start, self._window_start_ms, self.settings.k)
        try:
            self._send(record)
        except Exception as err:   # noqa: BLE001 - a lost summary must not stop the scorer
            log.warning("could not publish the quality summary on %s: %s", self.settings.quality_topic, err)
            return None
        log.info("quality summary: %s", "; ".join(
            f"{g['model_version']}/{g['strategy']}: hit@{self.settings.k} {g['hits']}/{g['judged']}, "
            f"popularity {g['baseline_hits']}/{g['judged']}" for g in record["groups"]))
        return record

    def _send(self, record: dict) -> None:
        """One record through Spark's Kafka writer (a small batch job on the driver's session)."""
        frame = self.spark.createDataFrame([("quality", json.dumps(record, separators=(",", ":")))],
                                           "key string, value string")
        frame.write.format("kafka").options(**self._sink_options).save()

    def close(self) -> None:
        """Stop the timer and publish the last window."""
        self._closed.set()
        self._timer.join(timeout=30)
        self.flush()
