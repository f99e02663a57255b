"""The per-customer work of a scoring micro-batch, run by the executors' Python workers.

The driver decides the model version of a micro-batch and hands it to every task with the batch
(streaming/served.py); it never sees a customer. Each task here, over its part of the state's
output (one row per customer with input in the batch):

1. takes the served version from the task's properties and the verified model of that version
   from this worker process' cache, loading and verifying it from the store on first use
   (``worker_model``): an executor never picks a version, and never one the driver refused;
2. scores the customers with new purchases with the one scoring path of both jobs
   (streaming/refresh.py: fold-in, top-k, the buy-again list) under the business rules the driver
   broadcast for the batch (models.business_rules; parsed once on the driver, re-broadcast only
   when the attributes file changed);
3. writes their records to the DynamoDB table (conditional newest-wins puts, riding out an
   outage up to ``streaming.sink_outage_tolerance``) and returns them as Kafka rows, which
   Spark's Kafka sink writes to the recommendations topic in the same task;
4. adds one summary per Arrow batch (counts, task times, a latency histogram) to a Spark
   accumulator: the driver reads those few summaries when the batch's job is done, so its work
   per micro-batch does not grow with the customers.

Executors receive ``ExecutorSettings`` only: the scoring options, the table's and the model
store's connection settings, nothing else of the config.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pyspark.accumulators import AccumulatorParam

from models.config import Config
from models.records import RecordWriter, now_ms
from streaming import latency as latency_hist
from streaming.refresh import records_for, score_customers
from streaming.served import served_batch, served_version
from streaming.serving import ServingModel

log = logging.getLogger("streaming.executor")

# mapInPandas' output: the records as Kafka rows.
SCORED_SCHEMA = "key binary, value binary"
# How many model versions a worker keeps (the served one and the one before, during a swap).
MODELS_KEPT = 2
LOADED_LINE = "reco-scorer: model %s loaded in worker pid %d on %s (%d items, %d customers) in %.2f s"


@dataclass(frozen=True)
class ExecutorSettings:
    """What the executors need to score and write, and no more (no Kafka credentials: the topic is
    written by Spark's sink in the JVM)."""

    k: int
    exclude_purchased: bool
    write_table: bool
    outage_tolerance_ms: int
    default_count_mode: str
    connections: dict = field(hash=False, repr=False)   # model_store, dynamodb, aws sections, paths resolved
                                                        # (repr=False: credentials never reach a log line)

    @classmethod
    def from_config(cls, cfg: Config, settings, write_table: bool = True) -> ExecutorSettings:
        """``settings``: the job's StreamingSettings. The store's URI is resolved here, on the
        driver, so relative folders do not depend on where an executor runs."""
        from models.clients import executor_connections

        connections = executor_connections(cfg)
        return cls(k=settings.k, exclude_purchased=settings.exclude_purchased, write_table=write_table,
                   outage_tolerance_ms=settings.sink_outage_tolerance_ms,
                   default_count_mode=str(cfg.get_path("data.count_mode")), connections=connections)

    @property
    def config(self) -> Config:
        return Config(json.loads(json.dumps(self.connections)))

    @property
    def cache_key(self) -> str:
        return json.dumps(self.connections, sort_keys=True)


# -- this worker process' caches (a Python worker is reused across tasks) -------------------------
_models: dict[tuple[str, str], ServingModel] = {}
_writers: dict[str, RecordWriter] = {}


def _worker_logging() -> None:
    """Log to the worker's stderr (the executor's log) when nothing else is set up."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def worker_model(version: str, settings: ExecutorSettings) -> tuple[ServingModel, float]:
    """The verified model ``version`` (the driver's choice for this batch), loaded once per worker
    process; returns it and the seconds spent loading it (0 when cached)."""
    key = (settings.cache_key, version)
    if key in _models:
        return _models[key], 0.0
    from models.store import ModelStore

    _worker_logging()
    started = time.perf_counter()
    store = ModelStore.from_config(settings.config)
    try:
        model = ServingModel.prepare(store.load(version), settings.default_count_mode)
    except Exception as err:
        raise RuntimeError(f"this executor cannot load model {version}, which the driver verified and serves "
                           f"for this batch, from {store}: {err}; the task fails and the batch is retried "
                           "(check that every executor reaches the model store)") from err
    while len(_models) >= MODELS_KEPT:
        _models.pop(next(iter(_models)))
    _models[key] = model
    seconds = time.perf_counter() - started
    log.info(LOADED_LINE, version, os.getpid(), os.uname().nodename, model.artifact.n_items,
             model.artifact.n_users, seconds)
    return model, seconds


def _table_writer(settings: ExecutorSettings) -> RecordWriter:
    key = settings.cache_key
    if key not in _writers:
        _worker_logging()
        _writers[key] = RecordWriter(settings.config, to_topic=False, to_table=True)
    return _writers[key]


class SummaryList(AccumulatorParam):
    """A Spark accumulator of the executors' per-Arrow-batch summaries (a few per task). Spark adds
    a task's updates once, when the task succeeds."""

    def zero(self, value) -> list:
        return []

    def addInPlace(self, first: list, second: list) -> list:
        first.extend(second)
        return first


def scorer(settings: ExecutorSettings, summaries, rules_broadcast=None):
    """The mapInPandas function over the state's output rows (streaming/state.py OUTPUT_SCHEMA);
    ``summaries``: the driver's SummaryList accumulator; ``rules_broadcast``: the batch's business
    rules (a Spark broadcast, None: no rules)."""

    def score(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        version, (batch_id, started_ms) = served_version(), served_batch()
        rules = rules_broadcast.value if rules_broadcast is not None else None
        for frame in frames:
            rows, summary = score_frame(frame, version, batch_id, started_ms, settings, rules)
            summaries.add([summary])
            yield rows

    return score


def score_frame(frame: pd.DataFrame, version: str | None, batch_id: int, batch_started_ms: int,
                settings: ExecutorSettings, rules=None) -> tuple[pd.DataFrame, dict]:
    """Score and write one Arrow batch of customers; its Kafka rows and its summary."""
    summary = {"customers": len(frame), "new_events": int(frame["new_events"].sum()),
               "duplicate_events": int(frame["duplicate_events"].sum()),
               "before_cutoff_events": int(frame["before_cutoff_events"].sum()),
               "cutoffs": sorted({int(c) for c in frame["cutoff_ms"].dropna()}),
               "refreshed": 0, "score_ms": 0.0, "write_ms": 0.0, "load_ms": 0.0, "table_written": 0,
               "table_stale": 0, "table_retries": 0, "latency": {}}
    changed = frame[frame["new_events"] > 0].reset_index(drop=True)
    keys: list = []
    values: list = []
    if version is not None and len(changed):
        model, load_s = worker_model(version, settings)
        started = time.perf_counter()
        scored = score_customers(model, changed, settings.k, settings.exclude_purchased,
                                 segments=changed["segment"].to_numpy(object), rules=rules)
        records = records_for(model, changed, scored, computed_at_ms=now_ms())
        written = time.perf_counter()
        if settings.write_table:
            outcome = _table_writer(settings).write(
                records, outage_tolerance_s=settings.outage_tolerance_ms / 1000, label=f"batch {batch_id}",
                tolerance_setting="streaming.sink_outage_tolerance")
            summary.update(table_written=outcome.table_written, table_stale=outcome.table_skipped_stale,
                           table_retries=outcome.attempts - 1)
        ages = batch_started_ms - np.concatenate([np.asarray(ts, dtype=np.int64) for ts in changed["new_kafka_ts_ms"]])
        summary.update(refreshed=len(records), load_ms=load_s * 1000, score_ms=(written - started) * 1000,
                       write_ms=(time.perf_counter() - written) * 1000,
                       latency=latency_hist.to_sparse(latency_hist.counts_of(ages)))
        keys = [record.customer_id.encode() for record in records]
        values = [record.to_json_bytes() for record in records]
    return pd.DataFrame({"key": keys, "value": values}, columns=["key", "value"]), summary
