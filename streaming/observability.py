"""Prometheus metrics and a health endpoint for the streaming driver (``prometheus_client``).

The driver already learns, once per micro-batch, everything ops alert on: Spark's progress report
(input rows, offsets, the validation observation, phase durations, state rows) and foreachBatch's
own figures (refreshed customers, the latency histogram, unscored purchases). ``Exporter`` turns them into
metrics in a registry of its own (so two jobs in one process never clash), and ``serve`` exposes
``/metrics`` and ``/healthz`` on one port. Work per batch is O(partitions + reasons), never per
customer.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily

from streaming import latency as latency_hist

log = logging.getLogger(__name__)

# Event->record latency buckets (seconds): the target is p95 <= 1.5 s, the trigger 0.5 s.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
PHASES = ("score", "write")
LATENCY_NAME = "reco_event_to_record_latency_seconds"


class LatencyCollector:
    """The event->record latency histogram, published from the summed bucket counts the executors
    send (streaming/latency.py) instead of one ``observe`` per event on the driver."""

    def __init__(self) -> None:
        self._counts = np.zeros(latency_hist.N_BUCKETS, dtype=np.int64)
        self._lock = threading.Lock()

    def add(self, counts: np.ndarray) -> None:
        with self._lock:
            self._counts += counts

    def collect(self):
        with self._lock:
            counts = self._counts.copy()
        family = HistogramMetricFamily(LATENCY_NAME, "Time from a purchase's Kafka timestamp to its refreshed "
                                       "record being written (within 25 ms below 3 s)")
        below = latency_hist.cumulative_at(counts, [bound * 1000 for bound in LATENCY_BUCKETS])
        total_ms = float(np.dot(counts, latency_hist.middles_ms()))
        family.add_metric([], [(str(bound), float(n)) for bound, n in zip(LATENCY_BUCKETS, below)]
                          + [("+Inf", float(counts.sum()))], total_ms / 1000)
        return [family]


class Exporter:
    """The job's metrics, fed by StreamMetrics (foreachBatch figures) and the progress listener."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.latency = LatencyCollector()
        registry.register(self.latency)
        self.input_rows = Counter("reco_input_rows", "Messages read from the transactions topic",
                                  registry=registry)
        self.valid_rows = Counter("reco_valid_rows", "Messages that were valid purchase events", registry=registry)
        self.invalid_rows = Counter("reco_invalid_rows", "Messages sent to the dead-letter topic, by reason",
                                    ["reason"], registry=registry)
        self.purchases = Counter("reco_purchases", "Valid purchases by what the state did with them",
                                 ["outcome"], registry=registry)
        self.unscored = Counter("reco_unscored_purchases",
                                "Purchases received (not replays) in micro-batches that refreshed nobody",
                                registry=registry)
        self.refreshed = Counter("reco_customers_refreshed", "Customers whose record was rewritten",
                                 registry=registry)
        self.table_retries = Counter("reco_table_write_retries",
                                     "Table write attempts that failed and were retried (an outage ridden out)",
                                     registry=registry)
        self.batch_seconds = Histogram("reco_batch_phase_seconds",
                                       "Executor task time of a scoring micro-batch by phase, summed over tasks",
                                       ["phase"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
                                       registry=registry)
        self.state_rows = Gauge("reco_state_rows", "Customers held in the state store", registry=registry)
        self.lag = Gauge("reco_kafka_lag_messages",
                         "Messages in the transactions topic not yet read by the scoring query",
                         ["partition"], registry=registry)
        self.model = Info("reco_model", "The model version the driver serves", registry=registry)
        labels = ["model_version", "strategy"]
        self.quality_judged = Counter("reco_quality_judged_purchases",
                                      "Purchases judged against the last list the stream emitted to the customer",
                                      labels, registry=registry)
        self.quality_hits = Counter("reco_quality_hits", "Judged purchases that were in that list (hit@k)",
                                    labels, registry=registry)
        self.quality_baseline_hits = Counter("reco_quality_baseline_hits",
                                             "Judged purchases that were in the popularity top-k (the live "
                                             "baseline), by the judged list's version and strategy",
                                             labels, registry=registry)
        self.last_progress = Gauge("reco_last_progress_timestamp_seconds",
                                   "When each query last reported progress", ["query"], registry=registry)

    # -- from foreachBatch -------------------------------------------------------------------
    def on_refresh(self, figures) -> None:
        """One scoring micro-batch's own figures (streaming.metrics.RefreshFigures)."""
        for outcome, value in (("new", figures.new_events), ("duplicate", figures.duplicate_events),
                               ("before_cutoff", figures.before_cutoff_events)):
            self.purchases.labels(outcome).inc(value)
        self.unscored.inc(figures.unscored_events)
        self.refreshed.inc(figures.customers_refreshed)
        self.table_retries.inc(figures.table_retries)
        for phase, ms in zip(PHASES, (figures.score_ms, figures.write_ms)):
            self.batch_seconds.labels(phase).observe(ms / 1000)
        self.latency.add(figures.latency)
        self.model.info({"version": figures.model_version or "none"})

    def on_quality(self, tally) -> None:
        """One quality micro-batch's counts (streaming.quality.Tally)."""
        for version, strategy, judged, hits, baseline in tally.rows():
            self.quality_judged.labels(version, strategy).inc(judged)
            self.quality_hits.labels(version, strategy).inc(hits)
            self.quality_baseline_hits.labels(version, strategy).inc(baseline)

    # -- from Spark's progress ---------------------------------------------------------------
    def on_progress(self, query: str, progress, scoring: bool, invalid_by_reason: dict[str, int]) -> None:
        """One finished micro-batch of either query (Spark's StreamingQueryProgress)."""
        self.last_progress.labels(query).set(time.time())
        if not scoring:
            for reason, count in invalid_by_reason.items():
                self.invalid_rows.labels(reason).inc(count)
            return
        rows = int(progress.numInputRows)
        invalid = sum(invalid_by_reason.values())
        self.input_rows.inc(rows)
        self.valid_rows.inc(max(0, rows - invalid))
        for operator in progress.stateOperators or []:
            self.state_rows.set(int(operator.numRowsTotal))
            self.batch_seconds.labels("state").observe(int(operator.allUpdatesTimeMs) / 1000)
        for partition, lag in kafka_lag(progress).items():
            self.lag.labels(partition).set(lag)

    def touch(self, query: str) -> None:
        """An idle trigger: the query is alive, nothing arrived."""
        self.last_progress.labels(query).set(time.time())



def kafka_lag(progress) -> dict[str, int]:
    """Per topic-partition: the newest offset Kafka has minus the one the batch read up to."""
    lags: dict[str, int] = {}
    for source in progress.sources or []:
        try:
            end = _offsets(source.endOffset)
            latest = _offsets(source.latestOffset)
        except (TypeError, ValueError):
            continue            # not a Kafka source, or no offsets yet
        for key, newest in latest.items():
            lags[key] = max(0, newest - end.get(key, newest))
    return lags


def _offsets(text) -> dict[str, int]:
    """Spark's Kafka offsets JSON ({"topic": {"0": 12, ...}}) -> {"topic-0": 12}."""
    document = json.loads(text) if isinstance(text, str) else text
    return {f"{topic}-{partition}": int(offset) for topic, partitions in (document or {}).items()
            for partition, offset in partitions.items()}


# -- the endpoint --------------------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:   # scrapes every few seconds: keep them out of the log
        pass


def serve(exporter: Exporter, health: Callable[[], tuple[bool, str]], host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` (Prometheus text) and ``/healthz`` (200 ready / 503 not, with the reason)
    on a daemon thread; ``server.shutdown()`` stops it."""
    metrics_app = make_wsgi_app(exporter.registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            ready, reason = health()
            start_response("200 OK" if ready else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [reason.encode()]
        return metrics_app(environ, start_response)

    try:
        server = make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {host}:{port} ({err.strerror or err}): set streaming.metrics.port "
                      "to a free port (0: any, logged) or null to turn the endpoint off") from err
    threading.Thread(target=server.serve_forever, name="reco-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, server.server_port)
    return server
