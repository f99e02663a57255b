"""python -m streaming.bench: event-to-recommendation latency and sustained throughput at a rate.

Runs the real streaming job (in this process, on the configured Spark master) on topics, table
and checkpoint of its own, against the configured broker, DynamoDB endpoint and the current model
in the configured store, while a producer thread sends purchases at ``--rate`` events per second:
the model's customers (a share of brand-new ones) buying products drawn by popularity, stamped
with the current time. After ``--warmup`` seconds (query start-up, first batches) it measures for
``--duration`` seconds, then waits for the job to drain what was sent.

Latency = when the customer's refreshed record was written (topic flushed and table updated)
minus the event's Kafka timestamp (its produce time). Throughput = purchases the job folded into
the state and scored per second over the measured window; the job keeps up when it drains within
a couple of trigger intervals of the producer stopping. Also reported: customers refreshed per
second, the Python driver's CPU time per 1,000 refreshed customers (foreachBatch's thread: it
must stay flat as batches grow, the per-customer work being on the executors), the median
micro-batch and its task times (state stage, scoring, table writing) over the window, and
the peak resident memory of this process and its children (the Spark JVM, the Python workers),
sampled from /proc every 0.5 s over the whole run, and Spark's own progress of both queries over
the window (median phases, state operator times, the share of the window each spent in batches).

    python -m streaming.bench --rate 200 --duration 120 --warmup 45
    python -m streaming.bench --rate 1000 --no-table     # topic only: without the DynamoDB endpoint's limit
"""
from __future__ import annotations

import os

# The driver scores each micro-batch with many small solves and one matrix product: on a few cores
# shared with the Spark tasks, OpenBLAS' own threads fight them and run 2-4x slower (measured).
# Set before numpy is imported; an explicit setting in the environment wins.
from models.spark import single_threaded_blas

single_threaded_blas()

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from infra.process import tree_rss_bytes

log = logging.getLogger("streaming.bench")


class MemorySampler(threading.Thread):
    """The peak of ``tree_rss_bytes`` of this process, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(os.getpid()))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak_bytes


def bench_config(cfg, run_id: str):
    """The configuration with this run's own topics, table and checkpoint."""
    from streaming.settings import StreamingSettings

    checkpoint = f"{StreamingSettings.from_config(cfg).checkpoint_dir.rstrip('/')}-bench/{run_id}"
    return cfg.with_overrides({
        "kafka.topics.transactions": f"bench-tx-{run_id}", "kafka.topics.recommendations": f"bench-recs-{run_id}",
        "kafka.topics.dead_letter": f"bench-dlq-{run_id}", "dynamodb.table": f"bench-recs-{run_id}",
        "streaming.checkpoint_dir": checkpoint, "streaming.starting_offsets": "earliest"})


class Producer(threading.Thread):
    """Purchases at a steady rate (token bucket) until ``seconds`` have passed."""

    def __init__(self, cfg, artifact, rate: float, seconds: float, new_share: float, seed: int):
        super().__init__(daemon=True)
        from kafka import KafkaProducer

        from models.clients import kafka_options

        self.topic = str(cfg.get_path("kafka.topics.transactions"))
        self.producer = KafkaProducer(**kafka_options(cfg), acks=1, linger_ms=5)
        self.rate, self.seconds, self.new_share = rate, seconds, new_share
        self.rng = np.random.default_rng(seed)
        self.customers = np.asarray(artifact.user_ids)
        popularity = np.asarray(artifact.popularity, dtype=np.float64) + 1.0
        self.products, self.weights = np.asarray(artifact.item_ids), popularity / popularity.sum()
        self.sent = 0
        self.started_at = self.finished_at = 0.0

    def run(self) -> None:
        self.started_at = time.time()
        prefix = uuid.uuid4().hex[:8]
        while (elapsed := time.time() - self.started_at) < self.seconds:
            due = int(elapsed * self.rate) - self.sent
            if due <= 0:
                time.sleep(min(0.01, 1 / self.rate))
                continue
            for event in self._events(prefix, due):
                self.producer.send(self.topic, key=event["customer_id"].encode(), value=json.dumps(event).encode())
            self.sent += due
        self.producer.flush(timeout=60)
        self.finished_at = time.time()
        self.producer.close()

    def _events(self, prefix: str, n: int) -> list[dict]:
        new = self.rng.random(n) < self.new_share
        customers = np.where(new, [f"BENCH-NEW-{i}" for i in self.rng.integers(0, 10 ** 6, n)],
                             self.customers[self.rng.integers(0, len(self.customers), n)])
        products = self.products[self.rng.choice(len(self.products), n, p=self.weights)]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return [{"event_id": f"{prefix}-{self.sent + i}", "customer_id": str(c), "product_id": str(p),
                 "quantity": int(q), "event_time": now}
                for i, (c, p, q) in enumerate(zip(customers, products, self.rng.integers(1, 4, n)))]


def run(cfg, rate: float, duration_s: float, warmup_s: float, new_share: float, seed: int,
        drain_timeout_s: float = 300, to_table: bool = True) -> dict:
    from models.clients import ensure_table, ensure_topics
    from models.spark import build_spark
    from models.store import ModelStore
    from streaming.job import StreamingJob
    from streaming.settings import StreamingSettings

    memory = MemorySampler()
    memory.start()
    artifact = ModelStore.from_config(cfg).load()
    run_id = uuid.uuid4().hex[:8]
    own = bench_config(cfg, run_id)
    ensure_topics(own)
    ensure_table(own)
    spark = build_spark(own, "reco-streaming-bench")
    job = StreamingJob(own, spark, write_table=to_table).start()
    producer = Producer(own, artifact, rate, warmup_s + duration_s, new_share, seed)
    try:
        producer.start()
        producer.join()
        window_start_ms = int((producer.started_at + warmup_s) * 1000)
        window_end_ms = int(producer.finished_at * 1000)
        deadline = time.time() + drain_timeout_s
        while _processed(job) < producer.sent and time.time() < deadline:
            time.sleep(0.5)
        drained_s = time.time() - producer.finished_at
        processed = _processed(job)
    finally:
        job.stop()
        progress = {query.name: list(query.recentProgress) for query in job.queries}
        spark.stop()
        peak_rss = memory.stop()
    reports = [r for r in job.metrics.reports if r.query == "reco-scoring"]
    in_window = [r for r in reports if _report_ms(r) and window_start_ms <= _report_ms(r) <= window_end_ms]
    window_s = (window_end_ms - window_start_ms) / 1000
    latency = job.metrics.latency_percentiles((50, 95, 99), since_ms=window_start_ms)
    return {
        "rate_target": rate,
        "rate_achieved": round(producer.sent / max(1e-9, producer.finished_at - producer.started_at), 1),
        "sent": producer.sent, "processed": processed, "drained_after_s": round(drained_s, 1),
        "window_s": round(window_s, 1),
        "throughput_events_per_s": round(sum(r.new_events for r in in_window) / window_s, 1) if window_s > 0 else None,
        "latency_ms": None if latency is None else {k: round(v) if k != "events" else v for k, v in latency.items()},
        "batches_in_window": len(in_window),
        "mean_batch_ms": round(float(np.mean([r.duration_ms for r in in_window])), 1) if in_window else None,
        "mean_batch_rows": round(float(np.mean([r.input_rows for r in in_window])), 1) if in_window else None,
        "customers_refreshed_per_s": round(sum(r.customers_refreshed for r in in_window) / window_s, 1)
        if window_s > 0 else None,
        "driver_cpu_s_per_1000_customers": _driver_cpu_per_1000(in_window),
        "driver_cpu_ms_per_batch_median": round(float(np.median([r.driver_cpu_ms for r in in_window])), 1)
        if in_window else None,
        "median_batch": _median_batch(in_window),
        "spark_progress": {name: _progress_profile(items, window_start_ms, window_end_ms)
                           for name, items in progress.items()},
        "peak_rss_mb": round(peak_rss / 2 ** 20),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "model": {"version": artifact.version, "type": artifact.model_type, "items": artifact.n_items,
                  "customers": artifact.n_users, "rank": artifact.rank},
        "spark_master": str(own.get_path("spark.master")),
        "trigger_interval": str(own.get_path("streaming.trigger_interval")),
        "dead_letter_trigger_interval": str(own.get_path("streaming.dead_letter_trigger_interval")),
        "state_partitions": StreamingSettings.from_config(own).state_partitions,
        "sinks": "topic and table" if to_table else "topic only",
    }


def _driver_cpu_per_1000(reports) -> float | None:
    """The Python driver's CPU seconds in foreachBatch per 1,000 refreshed customers: with the
    per-customer work on the executors it must not grow with the batch size."""
    customers = sum(r.customers_refreshed for r in reports)
    return round(sum(r.driver_cpu_ms for r in reports) / 1000 / customers * 1000, 4) if customers else None


def _median_batch(reports) -> dict | None:
    """Median micro-batch duration and the medians of its split (ms), input rows, customers."""
    if not reports:
        return None
    med = lambda values: round(float(np.median(values)))   # noqa: E731
    return {"duration_ms": med([r.duration_ms for r in reports]), "state_ms": med([r.state_ms for r in reports]),
            "score_ms": med([r.score_ms for r in reports]), "write_ms": med([r.write_ms for r in reports]),
            "input_rows": med([r.input_rows for r in reports]),
            "customers_refreshed": med([r.customers_refreshed for r in reports])}


def _progress_profile(progress, start_ms: int, end_ms: int) -> dict | None:
    """Spark's own view of a query's micro-batches in the window: the median of each phase of
    ``durationMs`` (addBatch is the batch itself; the rest is Spark's bookkeeping), the state
    operator's update and commit times, and the share of the window the query spent in batches
    (what it takes from the cores the other query shares)."""
    batches = [p for p in progress if "addBatch" in (p.durationMs or {})
               and start_ms <= _iso_ms(p.timestamp) <= end_ms]
    if not batches:
        return None
    med = lambda values: round(float(np.median(values)))   # noqa: E731
    phases = sorted({phase for p in batches for phase in p.durationMs})
    profile = {"batches": len(batches),
               "busy_share": round(sum(p.durationMs.get("triggerExecution", 0) for p in batches)
                                   / max(1, end_ms - start_ms), 2),
               "median_ms": {phase: med([p.durationMs.get(phase, 0) for p in batches]) for phase in phases}}
    operators = [p.stateOperators[0] for p in batches if p.stateOperators]
    if operators:
        profile["state_operator_median"] = {
            "all_updates_ms": med([o.allUpdatesTimeMs for o in operators]),
            "commit_ms": med([o.commitTimeMs for o in operators]),
            "rows_total": med([o.numRowsTotal for o in operators])}
    return profile


def _iso_ms(text: str) -> int:
    try:
        return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return -1


def _processed(job) -> int:
    totals = job.metrics.totals
    return totals["new_events"] + totals["duplicate_events"]


def _report_ms(report) -> int | None:
    ms = _iso_ms(report.timestamp)
    return ms if ms >= 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE")
    parser.add_argument("--rate", type=float, default=200, help="events per second (default 200)")
    parser.add_argument("--duration", type=float, default=120, help="measured seconds (default 120)")
    parser.add_argument("--warmup", type=float, default=45, help="seconds sent before measuring (default 45)")
    parser.add_argument("--new-customers", type=float, default=0.05, help="share of brand-new customers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-table", action="store_true",
                        help="write the recommendations topic only (the job's own ceiling, without the "
                             "DynamoDB endpoint's)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)

    from models.config import load_config
    from models.logging_setup import setup_logging
    from models.store import ModelLoadError

    setup_logging("INFO")
    cfg = load_config(files=args.config or None)
    try:
        result = run(cfg, args.rate, args.duration, args.warmup, args.new_customers, args.seed,
                     to_table=not args.no_table)
    except ModelLoadError as err:
        log.error("%s", err)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
