"""The streaming scorer: two Structured Streaming queries on the transactions topic.

1. ``reco-dead-letter``: validate -> invalid rows -> the dead-letter topic. The message keeps the
   original key and value bytes untouched; the reason and the source topic, partition, offset
   and timestamp travel as Kafka headers (docs/schemas.md). It runs on its own, longer trigger
   (``streaming.dead_letter_trigger_interval``): dead letters are not latency-critical, and each
   micro-batch has a fixed cost the scoring query would otherwise share its cores with.
2. ``reco-scoring``: validate -> valid rows -> per-customer purchase state
   (``transformWithState``, RocksDB state store, streaming/state.py) -> ``foreachBatch``, where
   the driver only picks the model for the batch and hands it to the tasks (streaming/served.py);
   the executors refresh the customers with new purchases against it and write their records to
   the newest-wins DynamoDB table (streaming/executor.py), and Spark's Kafka sink writes them to
   the recommendations topic, all in one Spark job per micro-batch. Nothing per customer runs
   on the driver, so adding executors adds throughput.

Each query has its own checkpoint under ``streaming.checkpoint_dir``. The scoring query's state
and offsets are committed together per micro-batch, so after a crash the batch is replayed from
the checkpoint and every purchase is counted exactly once; the sinks are idempotent (the table
refuses older results; a replayed batch rewrites the same records).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd

from models.business_rules import BusinessRules, RulesConfig, RulesHolder
from models.config import Config
from models.records import describe_error, now_ms
from streaming import latency as latency_hist
from streaming.events import REASON_KINDS, ValidationRules, validate_values
from streaming.executor import SCORED_SCHEMA, ExecutorSettings, SummaryList, scorer
from streaming.metrics import (
    DEAD_LETTER_QUERY,
    QUALITY_QUERY,
    REASON_PREFIX,
    SCORING_QUERY,
    VALIDATION_OBSERVATION,
    RefreshFigures,
    StreamMetrics,
    make_listener,
)
from streaming.observability import Exporter, serve
from streaming.served import hand_to_executors
from streaming.serving import ModelHolder
from streaming.settings import StreamingSettings
from streaming.state import INPUT_COLUMNS, OUTPUT_SCHEMA, PurchaseStateProcessor

log = logging.getLogger(__name__)

ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
VALIDATED_SCHEMA = ("key binary, value binary, source_topic string, source_partition int, source_offset long, "
                    "kafka_ts_ms long, event_id string, customer_id string, product_id string, quantity int, "
                    "event_time_ms long, segment string, reason string")
VALIDATED_COLUMNS = [column.split()[0] for column in VALIDATED_SCHEMA.split(", ")]
# Dead-letter headers (all values UTF-8 text).
HEADER_REASON = "dlq.reason"
HEADER_TOPIC = "dlq.source.topic"
HEADER_PARTITION = "dlq.source.partition"
HEADER_OFFSET = "dlq.source.offset"
HEADER_TIMESTAMP = "dlq.source.timestamp_ms"
# Spark's state server logs a WARN for every get() of a ValueState that holds nothing, i.e. for
# every customer seen for the first time (or again after their state expired).
STATE_SERVER_LOGGER = "org.apache.spark.sql.execution.python.streaming.TransformWithStateInPySparkStateServer"


def configure_session(spark, settings: StreamingSettings) -> None:
    """Session settings the scoring query needs, set before it starts (they are per query)."""
    spark.conf.set("spark.sql.streaming.stateStore.providerClass", ROCKSDB_PROVIDER)
    # The state partitions: used when a checkpoint is created, then fixed by it (Spark keeps the
    # number in the checkpoint and ignores this setting on a restart).
    spark.conf.set("spark.sql.shuffle.partitions", str(settings.state_partitions))
    # Changelog checkpointing: each batch uploads only its state changes, not RocksDB files.
    spark.conf.set("spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled", "true")
    # With processing-time TTL Spark would otherwise run an empty batch every trigger forever.
    spark.conf.set("spark.sql.streaming.noDataMicroBatches.enabled", "false")
    # Each query's figures in Spark's own metrics system too (any sink configured there, e.g. the
    # PrometheusServlet on the Spark UI: streaming/README.md, "Watching it").
    spark.conf.set("spark.sql.streaming.metricsEnabled", "true")
    _quiet_state_server(spark)


def _quiet_state_server(spark) -> None:
    """Silence the state server's per-new-customer WARN in this JVM (the driver; in local mode
    also the executors). Executors elsewhere need it in their log4j2 configuration
    (streaming/README.md)."""
    try:
        jvm = spark.sparkContext._jvm
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
            STATE_SERVER_LOGGER, jvm.org.apache.logging.log4j.Level.ERROR)
    except Exception as err:  # noqa: BLE001 - only log noise is at stake
        log.debug("cannot set the log level of %s: %s", STATE_SERVER_LOGGER, err)


def kafka_source(spark, cfg: Config, settings: StreamingSettings):
    from models.clients import spark_kafka_options

    reader = (spark.readStream.format("kafka").options(**spark_kafka_options(cfg))
              .option("subscribe", settings.transactions_topic)
              .option("startingOffsets", settings.starting_offsets))
    if settings.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
    return reader.load()


def _validator(rules: ValidationRules):
    """The mapInPandas function: raw Kafka rows -> VALIDATED_SCHEMA rows (all kept, with reason)."""

    def validate(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for raw in batches:
            produced = pd.to_datetime(raw["timestamp"], utc=True)
            kafka_ts_ms = ((produced - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")).to_numpy(np.int64)
            out = validate_values(list(raw["value"]), rules, kafka_ts_ms.tolist())
            out["quantity"] = out["quantity"].astype("Int32")
            out["key"] = raw["key"].to_numpy()
            out["value"] = raw["value"].to_numpy()
            out["source_topic"] = raw["topic"].to_numpy()
            out["source_partition"] = raw["partition"].to_numpy(np.int32)
            out["source_offset"] = raw["offset"].to_numpy(np.int64)
            out["kafka_ts_ms"] = kafka_ts_ms
            yield out[VALIDATED_COLUMNS]

    return validate


def validate_stream(raw, rules: ValidationRules):
    """Every raw message with its parsed fields or its dead-letter reason, observed per batch."""
    from pyspark.sql import functions as F

    timestamps = raw.select("key", "value", "topic", "partition", "offset",
                            F.col("timestamp").cast("timestamp").alias("timestamp"))
    validated = timestamps.mapInPandas(_validator(rules), VALIDATED_SCHEMA)
    kind = F.split(F.col("reason"), ":").getItem(0)
    by_reason = [F.sum(F.when(kind == name, 1).otherwise(0)).alias(f"{REASON_PREFIX}{name}") for name in REASON_KINDS]
    return validated.observe(VALIDATION_OBSERVATION, F.count(F.lit(1)).alias("rows"),
                             F.sum(F.when(F.col("reason").isNotNull(), 1).otherwise(0)).alias("invalid_rows"),
                             *by_reason)


def dead_letter_stream(validated):
    """Invalid rows as Kafka sink rows: original key and value, reason and source in headers."""
    from pyspark.sql import functions as F

    def header(name: str, column):
        return F.struct(F.lit(name).alias("key"), F.encode(column.cast("string"), "UTF-8").alias("value"))

    return (validated.where(F.col("reason").isNotNull())
            .select("key", "value", F.array(
                header(HEADER_REASON, F.col("reason")),
                header(HEADER_TOPIC, F.col("source_topic")),
                header(HEADER_PARTITION, F.col("source_partition")),
                header(HEADER_OFFSET, F.col("source_offset")),
                header(HEADER_TIMESTAMP, F.col("kafka_ts_ms"))).alias("headers")))


def purchase_state_stream(validated, settings: StreamingSettings):
    """Valid rows grouped by customer through the stateful processor (one row per customer)."""
    from pyspark.sql import functions as F

    valid = (validated.where(F.col("reason").isNull())
             .withColumn("source_partition", F.concat_ws("-", "source_topic", F.col("source_partition").cast("string")))
             .select(*INPUT_COLUMNS))
    return valid.groupBy("customer_id").transformWithState(
        statefulProcessor=PurchaseStateProcessor(settings.state_ttl_ms), outputStructType=OUTPUT_SCHEMA,
        outputMode="Update",
        timeMode="ProcessingTime")


def _check_state_cutoff(applied: set[int], model, batch_id: int) -> None:
    """The state must have applied the served model's cutoff (handed over as a local property):
    anything else means the hand-over broke, and purchases may be miscounted."""
    expected = model.cutoff_ms if model is not None else None
    if applied and applied != {expected}:
        log.error("batch %d: the state applied cutoff(s) %s but the served model %s has %s; the driver's "
                  "hand-over to the tasks (streaming/served.py) did not reach them", batch_id, sorted(applied),
                  model.version if model else None, expected)


def sink_kafka_options(cfg: Config, settings: StreamingSettings) -> dict[str, str]:
    """Spark's Kafka sink for the recommendations topic, riding out a broker outage up to
    ``streaming.sink_outage_tolerance`` (a restart then replays the batch)."""
    from models.clients import spark_kafka_sink_options

    return spark_kafka_sink_options(cfg, settings.sink_outage_tolerance_ms)


class BatchRefresher:
    """The scoring query's foreachBatch: on the driver, O(1) work per micro-batch.

    It picks the model for the batch and hands it to the tasks, then runs ONE Spark job: the state
    stage, the executors' scoring and table writes (streaming/executor.py) and Spark's Kafka sink;
    the executors' summaries come back in an accumulator. One action: the state is updated
    exactly once per batch.
    """

    def __init__(self, settings: StreamingSettings, holder: ModelHolder, executor_settings: ExecutorSettings,
                 sink_options: dict[str, str], metrics: StreamMetrics, business_rules: RulesHolder | None = None):
        self.settings = settings
        self.holder = holder
        self.business_rules = business_rules
        self._rules: tuple[BusinessRules | None, object] = (None, None)   # the rules broadcast, and its handle
        self.executor_settings = executor_settings
        self.sink_options = sink_options
        self.metrics = metrics
        self._summaries = None           # the SummaryList accumulator, made with the first batch

    def __call__(self, batch_df, batch_id: int) -> None:
        started, started_ms, cpu_started = time.perf_counter(), now_ms(), time.thread_time()
        context = batch_df.sparkSession.sparkContext
        model = self.holder.current()      # decided once, here, for every task of the batch
        hand_to_executors(context, model.version if model else None, model.cutoff_ms if model else None,
                          batch_id, started_ms)
        if self._summaries is None:
            self._summaries = context.accumulator([], SummaryList())
        self._summaries.value = []         # batches run one at a time on this thread
        rules_broadcast = self._rules_broadcast(context)
        try:
            (batch_df.mapInPandas(scorer(self.executor_settings, self._summaries, rules_broadcast), SCORED_SCHEMA)
             .write.mode("append").format("kafka").options(**self.sink_options).save())
        except Exception as err:
            log.error("batch %d failed on the executors or in the topic sink (%s); the query stops, and a "
                      "restart replays the batch from the checkpoint", batch_id, describe_error(err))
            raise
        output_ms = now_ms()
        figures = figures_from(self._summaries.value, output_ms - started_ms)
        figures.model_version = model.version if model else None
        figures.output_ms = output_ms
        _check_state_cutoff(figures.applied_cutoffs, model, batch_id)
        self._warn_if_nothing_scored(batch_id, figures, model)
        figures.refresh_ms = (time.perf_counter() - started) * 1000
        figures.driver_cpu_ms = (time.thread_time() - cpu_started) * 1000
        self.metrics.record_refresh(batch_id, figures)

    def _rules_broadcast(self, context):
        """The business rules for this batch as a broadcast, made again only when they changed
        (the holder re-reads the attributes file once per batch at most)."""
        rules = self.business_rules.current() if self.business_rules is not None else None
        held, broadcast = self._rules
        if rules is not held:
            if broadcast is not None:
                broadcast.unpersist()
            broadcast = context.broadcast(rules) if rules is not None else None
            self._rules = (rules, broadcast)
        return broadcast

    def _warn_if_nothing_scored(self, batch_id: int, figures: RefreshFigures, model) -> None:
        """Purchases arrived (not replays) and no customer was refreshed: say why, every batch."""
        arrived = figures.new_events + figures.before_cutoff_events
        if not arrived or figures.customers_refreshed:
            return
        figures.unscored_events = arrived
        if model is None:
            why = f"no model is served ({self.holder.describe_absence()}); the purchases wait in the state"
        else:
            why = (f"all of them are at or before the cutoff of model {model.version} "
                   f"({model.artifact.cutoff_time}); check that model's cutoff and the producers' clocks")
        log.warning("batch %d: %d purchases received, none scored: %s", batch_id, arrived, why)


def figures_from(summaries: list[dict], batch_ms: int) -> RefreshFigures:
    """The batch's figures from the executors' summaries (one per Arrow batch of a task); their
    latency histogram counts ages at the batch start, shifted here by the batch's duration."""
    figures = RefreshFigures()
    for part in summaries:
        figures.customers_in_batch += part["customers"]
        figures.customers_refreshed += part["refreshed"]
        figures.new_events += part["new_events"]
        figures.duplicate_events += part["duplicate_events"]
        figures.before_cutoff_events += part["before_cutoff_events"]
        figures.score_ms += part["score_ms"]
        figures.write_ms += part["write_ms"]
        figures.load_ms += part["load_ms"]
        figures.table_written += part["table_written"]
        figures.table_stale += part["table_stale"]
        figures.table_retries += part["table_retries"]
        figures.applied_cutoffs.update(part["cutoffs"])
        figures.latency += latency_hist.from_sparse(part["latency"])
    figures.latency = latency_hist.shifted(figures.latency, batch_ms)
    return figures


class StreamingJob:
    """Builds, starts, watches and stops the two queries (see the module docstring)."""

    def __init__(self, cfg: Config, spark, store=None, write_table: bool = True):
        from models.store import ModelStore

        self.cfg = cfg
        self.spark = spark
        self.settings = StreamingSettings.from_config(cfg)
        self.rules = ValidationRules.from_config(cfg)
        self.business_rules = RulesHolder(RulesConfig.from_config(cfg))   # a bad attributes file fails here
        self.metrics = StreamMetrics(exporter=Exporter())
        self.holder = ModelHolder(store or ModelStore.from_config(cfg), self.settings.model_poll_interval_ms,
                                  default_count_mode=str(cfg.get_path("data.count_mode", "rows")))
        self.executor_settings = ExecutorSettings.from_config(cfg, self.settings, write_table=write_table)
        self.table_name = str(cfg.get_path("dynamodb.table")) if write_table else None
        self.queries: list = []
        self.quality = None              # the QualityMonitor when streaming.quality.enabled
        self._listener = None
        self._stop_requested = threading.Event()
        self._stopped = False
        self._server = None
        self._started_at = time.time()

    @property
    def scoring_query(self):
        return next((q for q in self.queries if q.name == SCORING_QUERY), None)

    @property
    def dead_letter_query(self):
        return next((q for q in self.queries if q.name == DEAD_LETTER_QUERY), None)

    def start(self, available_now: bool = False) -> StreamingJob:
        """Start both queries (``available_now``: process what is in the topic now, then stop)."""
        configure_session(self.spark, self.settings)
        self._started_at = time.time()
        self._listener = make_listener(self.metrics)
        self.spark.streams.addListener(self._listener)
        self.holder.current()   # load the model up front: a broken one is reported at start-up
        if self.settings.metrics_port is not None:
            self._server = serve(self.metrics.exporter, self.health, self.settings.metrics_host,
                                 self.settings.metrics_port)
        validated = validate_stream(kafka_source(self.spark, self.cfg, self.settings), self.rules)
        checkpoint = self.settings.checkpoint_dir.rstrip("/")
        from models.clients import spark_kafka_options

        dead_letter = (dead_letter_stream(validated).writeStream.queryName(DEAD_LETTER_QUERY).format("kafka")
                       .options(**spark_kafka_options(self.cfg)).option("topic", self.settings.dead_letter_topic)
                       .option("checkpointLocation", f"{checkpoint}/dead-letter"))
        scoring = (purchase_state_stream(validated, self.settings).writeStream.queryName(SCORING_QUERY)
                   .outputMode("update").foreachBatch(BatchRefresher(
                       self.settings, self.holder, self.executor_settings,
                       sink_kafka_options(self.cfg, self.settings), self.metrics, self.business_rules))
                   .option("checkpointLocation", f"{checkpoint}/scoring"))
        writers = [(dead_letter, self.settings.dead_letter_trigger_interval_ms),
                   (scoring, self.settings.trigger_interval_ms)]
        if self.settings.quality_enabled:
            writers.append((self._quality_writer(f"{checkpoint}/quality"), self.settings.quality_trigger_interval_ms))
        for writer, interval_ms in writers:
            writer = (writer.trigger(availableNow=True) if available_now
                      else writer.trigger(processingTime=f"{interval_ms} milliseconds"))
            self.queries.append(writer.start())
        log.info("streaming scorer started: %s -> %s and table %s (dead letters: %s), checkpoints in %s, "
                 "trigger %s", self.settings.transactions_topic, self.settings.recommendations_topic,
                 self.table_name or "(none)", self.settings.dead_letter_topic, checkpoint,
                 "available-now" if available_now else
                 f"every {self.settings.trigger_interval_ms} ms (dead letters every "
                 f"{self.settings.dead_letter_trigger_interval_ms} ms)")
        return self

    def _quality_writer(self, checkpoint: str):
        """The reco-quality query (streaming/quality_job.py), last: it reads what scoring wrote."""
        from streaming.quality_job import QualityMonitor, quality_stream

        self.quality = QualityMonitor(self.spark, self.cfg, self.settings, self.holder, self.metrics.exporter)
        return (quality_stream(self.spark, self.cfg, self.settings, self.rules).writeStream
                .queryName(QUALITY_QUERY).outputMode("update").foreachBatch(self.quality)
                .option("checkpointLocation", checkpoint))

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics and /healthz are served on (the OS's pick when configured as 0)."""
        return self._server.server_port if self._server is not None else None

    def health(self) -> tuple[bool, str]:
        """Ready when both queries run and each reported progress (or an idle trigger) recently."""
        if self._stopped or not self.queries:
            return False, "not running"
        down = [q.name for q in self.queries if not q.isActive]
        if down:
            return False, f"query {', '.join(down)} not active"
        now = time.time()
        silent = {q.name: now - self.metrics.last_seen.get(q.name, self._started_at) for q in self.queries}
        stale = {name: age for name, age in silent.items() if age * 1000 > self.settings.health_max_silence_ms}
        if stale:
            return False, "no progress for " + ", ".join(f"{name} {age:.0f} s" for name, age in stale.items())
        return True, "ok: " + ", ".join(f"{name} {age:.0f} s ago" for name, age in silent.items())

    def request_stop(self) -> None:
        """Ask for a graceful stop (safe from a signal handler): see ``run_until_stopped``."""
        self._stop_requested.set()

    def run_until_stopped(self, poll_s: float = 1.0) -> None:
        """Block until a stop is requested or a query ends; re-raise a query's failure."""
        while not self._stop_requested.wait(poll_s):
            if any(not q.isActive for q in self.queries):
                break
        self.stop()
        for query in self.queries:
            error = query.exception()
            if error is not None:
                raise RuntimeError(f"streaming query {query.name} failed: {error}")

    def await_available_now(self, timeout_s: float = 600) -> None:
        """Wait for ``available_now`` queries to finish; raise if one failed or timed out."""
        deadline = time.monotonic() + timeout_s
        for query in self.queries:
            query.awaitTermination(max(1.0, deadline - time.monotonic()))
        self.stop()
        for query in self.queries:
            if query.exception() is not None:
                raise RuntimeError(f"streaming query {query.name} failed: {query.exception()}")
            if query.isActive:
                raise TimeoutError(f"streaming query {query.name} still running after {timeout_s} s")

    def process_all_available(self) -> None:
        for query in self.queries:
            query.processAllAvailable()
        self._report_missed_progress()

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop after the running micro-batch completes (up to ``grace_s``), then report and close."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + grace_s
        for query in self.queries:
            while query.isActive and query.status.get("isTriggerActive") and time.monotonic() < deadline:
                time.sleep(0.1)
            if query.isActive:
                query.stop()
        self._report_missed_progress()
        if self.quality is not None:
            self.quality.close()        # the last window's summary
        if self._listener is not None:
            self.spark.streams.removeListener(self._listener)
            self._listener = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        latency = self.metrics.latency_percentiles()
        log.info("streaming scorer stopped: %s; event-to-output latency %s", self.metrics.totals,
                 "n/a" if latency is None else
                 f"p50 {latency['p50']:,.0f} ms p95 {latency['p95']:,.0f} ms p99 {latency['p99']:,.0f} ms "
                 f"over {latency['events']:,} events")

    def _report_missed_progress(self) -> None:
        """Progress the asynchronous listener has not delivered yet (the last batches at a stop)."""
        for query in self.queries:
            for progress in query.recentProgress:
                self.metrics.on_progress(progress)
