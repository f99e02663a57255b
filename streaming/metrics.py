"""Per-micro-batch figures: one log line per batch and a StreamingQueryListener feeding them.

The scoring query's foreachBatch learns from the executors' summaries what they refreshed, how
long their tasks scored and wrote, and the event-to-output latency as a histogram
(streaming/latency.py); Spark's progress report knows the input rows, the batch duration, the
state operator's time and the invalid rows (an ``observe`` on the validated stream). The listener
joins the two by (run id, batch id), logs the line and keeps the figures for the operator (the
stop line, the metrics endpoint) and the tests.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from streaming import latency as latency_hist
from streaming.latency import N_BUCKETS

log = logging.getLogger(__name__)

SCORING_QUERY = "reco-scoring"
DEAD_LETTER_QUERY = "reco-dead-letter"
QUALITY_QUERY = "reco-quality"     # streaming/quality_job.py: alive-ness only here, its counts go elsewhere
VALIDATION_OBSERVATION = "validation"
REASON_PREFIX = "reason_"       # the observation's per-reason counts: reason_<kind>


@dataclass
class RefreshFigures:
    """What foreachBatch did with one micro-batch."""

    customers_in_batch: int = 0
    customers_refreshed: int = 0
    new_events: int = 0
    duplicate_events: int = 0
    before_cutoff_events: int = 0
    unscored_events: int = 0           # purchases received but not scored (no model, or none servable)
    model_version: str | None = None
    refresh_ms: float = 0.0            # the whole foreachBatch (the driver's wall time)
    driver_cpu_ms: float = 0.0         # the driver's CPU time in it (Python; must not grow with the batch)
    # Task times summed over the executors (tasks run in parallel, so these can exceed refresh_ms):
    score_ms: float = 0.0              #   scoring the refreshed customers
    write_ms: float = 0.0              #   writing their records to the table
    load_ms: float = 0.0               #   loading a newly served model into the workers
    table_written: int = 0
    table_stale: int = 0               # table items not replaced: the table held a newer record
    table_retries: int = 0             # table write attempts that failed and were retried
    output_ms: int = 0                 # when the records were written (epoch ms)
    applied_cutoffs: set = field(default_factory=set)   # the model cutoffs the state's tasks applied
    latency: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, dtype=np.int64))  # histogram


@dataclass
class BatchReport:
    """One micro-batch of one query, as logged."""

    query: str
    batch_id: int
    input_rows: int
    invalid_rows: int
    duration_ms: int
    customers_refreshed: int = 0
    new_events: int = 0
    duplicate_events: int = 0
    before_cutoff_events: int = 0
    unscored_events: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    model_version: str | None = None
    state_ms: float = 0.0              # Spark's state operator (all updates), summed over tasks
    score_ms: float = 0.0              # the executors' scoring, summed over tasks
    write_ms: float = 0.0              # the executors' table writes, summed over tasks
    table_retries: int = 0
    driver_cpu_ms: float = 0.0         # the Python driver's CPU time in the batch's foreachBatch
    timestamp: str = ""

    def line(self) -> str:
        if self.query == DEAD_LETTER_QUERY:
            return (f"dead-letter batch {self.batch_id}: {self.input_rows:,} input rows, "
                    f"{self.invalid_rows:,} invalid sent to the dead-letter topic, {self.duration_ms:,} ms")
        latency = ("no output" if self.latency_p50_ms is None else
                   f"p50 {self.latency_p50_ms:,.0f} ms p95 {self.latency_p95_ms:,.0f} ms")
        return (f"scoring batch {self.batch_id}: {self.input_rows:,} input rows, {self.invalid_rows:,} invalid, "
                f"{self.new_events:,} new purchases ({self.duplicate_events:,} duplicates, "
                f"{self.before_cutoff_events:,} before the model cutoff, {self.unscored_events:,} not scored), "
                f"{self.customers_refreshed:,} customers refreshed, batch {self.duration_ms:,} ms "
                f"(task times: state {self.state_ms:,.0f}, scoring {self.score_ms:,.0f}, writing {self.write_ms:,.0f}"
                f"{f', {self.table_retries:,} table write retries' if self.table_retries else ''}), "
                f"event-to-output latency {latency}, model {self.model_version}")


class StreamMetrics:
    """Figures of the running job, filled by foreachBatch and the listener (thread-safe)."""

    def __init__(self, history: int = 10_000, exporter=None):
        self.exporter = exporter            # streaming.observability.Exporter, or None
        self.last_seen: dict[str, float] = {}   # query name -> when it last reported (progress or idle)
        self._lock = threading.Lock()
        self._pending: dict[int, RefreshFigures] = {}
        self._reported: deque[tuple[str, str, int]] = deque(maxlen=1000)   # recent batches already logged
        self.reports: deque[BatchReport] = deque(maxlen=history)
        self._latencies: deque[tuple[int, np.ndarray]] = deque(maxlen=history)   # (output ms, histogram)
        self.totals = {"input_rows": 0, "invalid_rows": 0, "customers_refreshed": 0, "new_events": 0,
                       "duplicate_events": 0, "before_cutoff_events": 0, "unscored_events": 0,
                       "table_retries": 0, "dead_lettered": 0, "batches": 0}
        self.started = time.time()

    def record_refresh(self, batch_id: int, figures: RefreshFigures) -> None:
        if self.exporter is not None:
            self.exporter.on_refresh(figures)
        with self._lock:
            self._pending[int(batch_id)] = figures
            if figures.latency.any():
                self._latencies.append((figures.output_ms, figures.latency))

    def on_progress(self, progress) -> BatchReport | None:
        """Build, keep and log the report of one finished micro-batch (``progress``: Spark's).

        Each (query, run, batch) is reported once, whether the listener or a final drain at stop
        delivers it first.
        """
        name = progress.name or ""
        if name == QUALITY_QUERY:
            self.on_idle(name)            # alive; its figures are the quality monitor's
            return None
        if name not in (SCORING_QUERY, DEAD_LETTER_QUERY) or "addBatch" not in (progress.durationMs or {}):
            return None   # another query, or an idle trigger's report (no batch ran)
        seen = (name, str(progress.runId), int(progress.batchId))
        observed = (progress.observedMetrics or {}).get(VALIDATION_OBSERVATION)
        invalid = int(observed["invalid_rows"] or 0) if observed is not None else 0
        by_reason = _invalid_by_reason(observed)
        report = BatchReport(query=name,
                             batch_id=int(progress.batchId), input_rows=int(progress.numInputRows),
                             invalid_rows=invalid, duration_ms=int(progress.durationMs.get("triggerExecution", 0)),
                             timestamp=str(progress.timestamp))
        with self._lock:
            if seen in self._reported:
                return None
            self._reported.append(seen)
            self.last_seen[name] = time.time()
            if self.exporter is not None:
                self.exporter.on_progress(name, progress, name == SCORING_QUERY, by_reason)
            figures = self._pending.pop(report.batch_id, None) if report.query == SCORING_QUERY else None
            if report.query == SCORING_QUERY:
                if figures is not None:
                    report.customers_refreshed = figures.customers_refreshed
                    report.new_events = figures.new_events
                    report.duplicate_events = figures.duplicate_events
                    report.before_cutoff_events = figures.before_cutoff_events
                    report.unscored_events = figures.unscored_events
                    report.model_version = figures.model_version
                    report.score_ms, report.write_ms = figures.score_ms, figures.write_ms
                    report.table_retries = figures.table_retries
                    report.driver_cpu_ms = figures.driver_cpu_ms
                    batch_latency = latency_hist.percentiles(figures.latency, (50, 95))
                    if batch_latency is not None:
                        report.latency_p50_ms, report.latency_p95_ms = batch_latency["p50"], batch_latency["p95"]
                if progress.stateOperators:
                    report.state_ms = float(progress.stateOperators[0].allUpdatesTimeMs)
                self._add_totals(report)
            else:
                self.totals["dead_lettered"] += report.invalid_rows
            self.reports.append(report)
        log.info(report.line())
        return report

    def on_idle(self, name: str) -> None:
        """An idle trigger of query ``name``: alive, with nothing to read."""
        self.last_seen[name] = time.time()
        if self.exporter is not None:
            self.exporter.touch(name)

    def _add_totals(self, report: BatchReport) -> None:
        self.totals["batches"] += 1
        for name in ("input_rows", "invalid_rows", "customers_refreshed", "new_events", "duplicate_events",
                     "before_cutoff_events", "unscored_events", "table_retries"):
            self.totals[name] += getattr(report, name)

    def latency_percentiles(self, percentiles=(50, 95, 99), since_ms: int | None = None) -> dict[str, float] | None:
        """Event-to-output latency (ms) of the events of the kept batches output at or after
        ``since_ms`` (epoch ms; None: all), or None when there are none (within a bucket's width,
        streaming/latency.py)."""
        with self._lock:
            kept = [counts for output_ms, counts in self._latencies if since_ms is None or output_ms >= since_ms]
        return latency_hist.percentiles(np.sum(kept, axis=0), percentiles) if kept else None


def _invalid_by_reason(observed) -> dict[str, int]:
    """The validation observation's per-reason counts ({kind: rows}), zeros left out."""
    if observed is None:
        return {}
    counts = observed.asDict() if hasattr(observed, "asDict") else dict(observed)
    return {key[len(REASON_PREFIX):]: int(value) for key, value in counts.items()
            if key.startswith(REASON_PREFIX) and value}


def make_listener(metrics: StreamMetrics):
    """A StreamingQueryListener that feeds ``metrics`` (built lazily: pyspark is imported here)."""
    from pyspark.sql.streaming import StreamingQueryListener

    names: dict[str, str] = {}      # query id -> name (idle events carry only the id)

    class ScorerListener(StreamingQueryListener):
        def onQueryStarted(self, event) -> None:
            names[str(event.id)] = event.name or ""
            log.info("query %s started (id %s, run %s)", event.name, event.id, event.runId)

        def onQueryProgress(self, event) -> None:
            try:
                metrics.on_progress(event.progress)
            except Exception:  # noqa: BLE001 - a reporting bug must never disturb the stream
                log.exception("could not report a micro-batch's progress")

        def onQueryIdle(self, event) -> None:
            metrics.on_idle(names.get(str(event.id), ""))

        def onQueryTerminated(self, event) -> None:
            if event.exception:
                log.error("query %s (run %s) terminated with an error: %s", event.id, event.runId,
                          event.exception.splitlines()[0] if event.exception else "")
            else:
                log.info("query %s (run %s) stopped", event.id, event.runId)

    return ScorerListener()
