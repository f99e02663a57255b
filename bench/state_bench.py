"""The scoring query's state stage, per customer: the shipped processor against its alternatives, side by side.

    .venv/bin/python bench/state_bench.py --customers 150,1000,5000 --batches 8 --out FILE.json

Variants (bench/state_variants.py; each on the RocksDB provider with changelog checkpointing, as
``streaming.job.configure_session`` sets, 2 state partitions, ``foreachBatch`` as the job does):

- ``tws-row``: ``streaming.state.PurchaseStateProcessor`` as the job wires it
  (``groupBy("customer_id").transformWithState(..., outputMode="Update", timeMode="ProcessingTime")``);
- ``tws-row-blob``: the same processor with its state as ONE packed binary value
  (``state_variants.BlobPurchaseStateProcessor``: ``value binary``, struct-packed) instead of the
  five arrays;
- ``aipws``: ``applyInPandasWithState`` with ``GroupStateTimeout.ProcessingTimeTimeout`` as the TTL
  (state: one JSON string);
- ``tws-pandas``: ``transformWithStateInPandas``, the same ValueState of arrays;
- ``jvm``: ``dropDuplicatesWithinWatermark`` + a streaming aggregation (cannot hold every rule);
- ``floor``: no state, the same read, shuffle by customer and ``foreachBatch`` action: what every
  variant pays before its state operator.

Input: a folder of Parquet files read with ``maxFilesPerTrigger=1``; the bench writes one file,
waits for the query to process it, then the next, so every micro-batch is one file. For each size
N: a pool of N customers first gets ``--held`` purchases each (one unmeasured batch), then every
micro-batch has N customers (90 % from the pool, so their state is read back; 10 % brand-new),
1 to 4 purchases each, with ~3 % re-sends of a held purchase (duplicates across batches), ~2 %
copies inside the batch and ~3 % purchases at or before the served model's cutoff. The driver hands
the cutoff to the tasks as the job does (``streaming.served.hand_to_executors`` in foreachBatch).
The first ``--warmup`` batches are not measured.

Measured per micro-batch, from the query's progress: ``durationMs.addBatch`` (the foreachBatch
action: file read, shuffle, state operator, a small aggregate of the output), the state
operators' figures, and the output's counts. Reported per variant and N: the median addBatch, in
ms per batch and per customer, the same minus the floor's, and a fit over all measured batches of
every size: ms = a + b * customers.

Fairness check: every variant's output per batch is compared with a pure-Python replay of the same
input through ``streaming.state``'s functions (customers, new / duplicate / before-cutoff
purchases, purchases held) and the Python variants' rows with each other (a digest of every output
column); a difference is printed as MISMATCH. ``--ttl-check`` (on by default) runs a short
scenario with a 20 s TTL, a model hot swap that raises the cutoff, and a pause past the TTL, and
checks the same counts against the replay.

The machine is shared: the load average is recorded before and after; compare figures from one run
only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import state_variants  # noqa: E402  (bench/, beside this file)

from streaming.state import INPUT_COLUMNS, OUTPUT_SCHEMA, PurchaseStateProcessor, advance  # noqa: E402

VARIANTS = ("tws-row", "tws-row-blob", "aipws", "tws-pandas", "jvm", "floor")
PYTHON_VARIANTS = ("tws-row", "tws-row-blob", "aipws", "tws-pandas")
DESCRIPTION = {
    "tws-row": "`transformWithState`, Row-based (shipped)",
    "tws-row-blob": "`transformWithState`, Row-based, state as one packed binary",
    "aipws": "`applyInPandasWithState`, JSON state",
    "tws-pandas": "`transformWithStateInPandas`",
    "jvm": "`dropDuplicatesWithinWatermark` + aggregation (JVM)",
    "floor": "no state: read + shuffle + action",
}
INVARIANTS = {
    "tws-row": "all",
    "tws-row-blob": "all",
    "aipws": "all",
    "tws-pandas": "all",
    "jvm": "dedup only (event-time window); no counts, no cutoff purge, no TTL",
    "floor": "-",
}
CHECKED = {      # what the output check compares, when it finds no difference
    "tws-row": "same counts as the replay",
    "tws-row-blob": "same counts and rows",
    "aipws": "same counts and rows",
    "tws-pandas": "same counts and rows",
    "jvm": "same purchases held (its only figure)",
    "floor": "every row through",
}
INPUT_SCHEMA = ("customer_id string, event_id string, product_id string, quantity int, event_time_ms long, "
                "kafka_ts_ms long, source_partition string, source_offset long, segment string")
PROD_TTL_MS = 90 * 86_400_000          # config/default.yaml streaming.state_ttl
CHECK_TTL_MS = 20_000
BASE_MS = 1_800_000_000_000            # event times after the cutoff
CUTOFF_MS = BASE_MS - 1                # the served model's cutoff
ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
STATE_PARTITIONS = 2                   # config/default.yaml streaming.state_partitions


# --- input --------------------------------------------------------------------------------------

@dataclass
class Feed:
    """The micro-batches of one scenario, as frames, and the served cutoff of each."""

    frames: list[pd.DataFrame]
    cutoffs: list[int | None]
    pauses_s: list[float] = field(default_factory=list)   # sleep before feeding batch i
    measured_from: int = 0                                 # batches before it are warm-up


class Generator:
    """Deterministic purchases: unique event times, offsets per partition in arrival order."""

    def __init__(self, seed: int, tag: str):
        self.rng = np.random.default_rng(seed)
        self.tag = tag
        self.event = 0
        self.offsets = {"transactions-0": 0, "transactions-1": 0}
        self.ids: dict[str, list[str]] = {}      # customer -> event ids sent and kept (for re-sends)

    def _row(self, customer: str, event_id: str | None = None, before_cutoff: bool = False) -> dict:
        self.event += 1
        partition = f"transactions-{zlib.crc32(customer.encode()) % 2}"
        self.offsets[partition] += 1
        fresh = event_id is None
        event_id = event_id or f"{self.tag}-e{self.event}"
        if fresh and not before_cutoff:
            self.ids.setdefault(customer, []).append(event_id)
        return {"customer_id": customer, "event_id": event_id,
                "product_id": f"P{int(self.rng.integers(0, 20_000)):06d}", "quantity": int(self.rng.integers(1, 4)),
                "event_time_ms": (CUTOFF_MS - self.event * 1000) if before_cutoff else BASE_MS + self.event * 1000,
                "kafka_ts_ms": BASE_MS + self.event, "source_partition": partition,
                "source_offset": self.offsets[partition],
                "segment": None if self.event % 7 == 0 else f"seg-{self.event % 5}"}

    def prefill(self, customers: list[str], held: int) -> pd.DataFrame:
        return _frame([self._row(c) for c in customers for _ in range(held)])

    def batch(self, pool: list[str], n: int, new_share: float = 0.1, number: int = 0) -> pd.DataFrame:
        returning = int(round(n * (1 - new_share)))
        chosen = list(self.rng.choice(pool, size=min(returning, len(pool)), replace=False))
        chosen += [f"{self.tag}-new{number}-{i}" for i in range(n - len(chosen))]
        rows = []
        for customer in chosen:
            for _ in range(int(self.rng.integers(1, 5))):
                draw = self.rng.random()
                if draw < 0.03 and self.ids.get(customer):                     # a re-send of a held purchase
                    ids = self.ids[customer]
                    rows.append(self._row(customer, event_id=ids[int(self.rng.integers(0, len(ids)))]))
                elif draw < 0.06:
                    rows.append(self._row(customer, before_cutoff=True))
                else:
                    rows.append(self._row(customer))
                    if draw > 0.98:                                            # a copy inside the batch
                        rows.append(self._row(customer, event_id=rows[-1]["event_id"]))
        return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(INPUT_COLUMNS))
    return frame.astype({"quantity": "int32", "event_time_ms": "int64", "kafka_ts_ms": "int64",
                         "source_offset": "int64"})


def size_feed(n: int, held: int, warmup: int, batches: int, seed: int) -> Feed:
    gen = Generator(seed + n, f"n{n}")
    pool = [f"n{n}-C{i:06d}" for i in range(n)]
    frames = [gen.prefill(pool, held)] + [gen.batch(pool, n, number=i) for i in range(warmup + batches)]
    return Feed(frames, [CUTOFF_MS] * len(frames), [0.0] * len(frames), measured_from=1 + warmup)


def ttl_feed(seed: int) -> Feed:
    """TTL and hot-swap scenario (``CHECK_TTL_MS``): 1 fill; 2 re-sends (duplicates) + new ones; 3
    a model whose cutoff covers the first purchases (purged when seen); then a pause past the TTL;
    4 the first batch's purchases again (expired, so new) and customers seen only in batch 1."""
    gen = Generator(seed, "ttl")
    pool = [f"ttl-C{i:03d}" for i in range(60)]
    first = gen.prefill(pool, 3)
    second = gen.batch(pool[:40], 40, new_share=0.0, number=2)
    resend = first[first["customer_id"].isin(pool[:30])].copy()
    resend["source_offset"] += 1_000_000
    second = pd.concat([second, resend.iloc[::2]], ignore_index=True)
    third = gen.batch(pool[:40], 40, new_share=0.0, number=3)
    raised = int(first["event_time_ms"].iloc[len(first) // 2])       # a newer model: half the fill is in it
    third_cutoff = raised
    fourth = pd.concat([first[first["customer_id"].isin(pool[20:60])].assign(
        source_offset=lambda f: f["source_offset"] + 2_000_000)], ignore_index=True)
    return Feed([first, second, third, fourth], [CUTOFF_MS, CUTOFF_MS, third_cutoff, third_cutoff],
                [0.0, 0.0, 0.0, CHECK_TTL_MS / 1000 + 4], measured_from=0)


# --- the pure-Python replay (the expected counts) -------------------------------------------------

def replay(feed: Feed, ttl_ms: int, times_ms: list[int]) -> list[dict]:
    """Per batch: customers, new, duplicate, before-cutoff, held (all customers with input) and
    held_changed (customers with new purchases), by streaming.state's functions alone."""
    state: dict[str, tuple[dict, dict, int]] = {}     # customer -> (held, arrived, last update)
    out = []
    for frame, cutoff, now in zip(feed.frames, feed.cutoffs, times_ms):
        figures = dict(customers=0, new=0, duplicate=0, before_cutoff=0, held=0, held_changed=0)
        for customer, rows in frame.groupby("customer_id", sort=False):
            held, arrived, updated = state.get(customer, ({}, {}, None))
            if updated is not None and updated + ttl_ms <= now:      # the value's own TTL
                held, arrived = {}, {}
            held, arrived = dict(held), dict(arrived)
            merge = advance(held, arrived, rows, now, ttl_ms, cutoff)
            if merge.held:
                state[customer] = (merge.held, {e: arrived[e] for e in merge.held}, now)
            else:
                state.pop(customer, None)
            figures["customers"] += 1
            figures["new"] += len(merge.added)
            figures["duplicate"] += merge.duplicates
            figures["before_cutoff"] += merge.before_cutoff
            figures["held"] += len(merge.held)
            if merge.added:
                figures["held_changed"] += len(merge.held)
        out.append(figures)
    return out


# --- Spark ----------------------------------------------------------------------------------------

def build_session(master: str, driver_memory: str):
    from pyspark import cloudpickle
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    spark = (SparkSession.builder.appName("state-bench").master(master)
             .config("spark.driver.memory", driver_memory)
             .config("spark.sql.shuffle.partitions", str(STATE_PARTITIONS))
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    cloudpickle.register_pickle_by_value(state_variants)     # bench/ is not importable by the workers
    return spark, configure(spark)


def configure(spark) -> str:
    """The job's own session settings (streaming.job.configure_session) when it imports; else the
    same settings, copied here."""
    try:
        from types import SimpleNamespace

        from streaming.job import configure_session

        configure_session(spark, SimpleNamespace(state_partitions=STATE_PARTITIONS))
        return "streaming.job.configure_session"
    except Exception as err:  # noqa: BLE001 - another engineer may be mid-edit on streaming/job.py
        print(f"note: streaming.job.configure_session unavailable ({type(err).__name__}: {err}); "
              "using a copy of its settings", file=sys.stderr)
        spark.conf.set("spark.sql.streaming.stateStore.providerClass", ROCKSDB_PROVIDER)
        spark.conf.set("spark.sql.shuffle.partitions", str(STATE_PARTITIONS))
        spark.conf.set("spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled", "true")
        spark.conf.set("spark.sql.streaming.noDataMicroBatches.enabled", "false")
        spark.conf.set("spark.sql.streaming.metricsEnabled", "true")
        return "a copy of streaming.job.configure_session's settings"


def state_frame(variant: str, events, ttl_ms: int, cutoff_ms: int | None):
    from pyspark.sql.streaming.state import GroupStateTimeout

    grouped = events.groupBy("customer_id")
    if variant == "tws-row":        # streaming.job.purchase_state_stream, after its validation columns
        return grouped.transformWithState(statefulProcessor=PurchaseStateProcessor(ttl_ms),
                                          outputStructType=OUTPUT_SCHEMA, outputMode="Update",
                                          timeMode="ProcessingTime")
    if variant == "tws-row-blob":
        return grouped.transformWithState(statefulProcessor=state_variants.BlobPurchaseStateProcessor(ttl_ms),
                                          outputStructType=OUTPUT_SCHEMA, outputMode="Update",
                                          timeMode="ProcessingTime")
    if variant == "tws-pandas":
        return grouped.transformWithStateInPandas(statefulProcessor=state_variants.PandasPurchaseStateProcessor(ttl_ms),
                                                  outputStructType=OUTPUT_SCHEMA, outputMode="Update",
                                                  timeMode="ProcessingTime")
    if variant == "aipws":
        return grouped.applyInPandasWithState(state_variants.apply_in_pandas_with_state(ttl_ms), OUTPUT_SCHEMA,
                                              state_variants.JSON_STATE_SCHEMA, "Update",
                                              GroupStateTimeout.ProcessingTimeTimeout)
    if variant == "jvm":
        return state_variants.jvm_native(events, ttl_ms, cutoff_ms)
    if variant == "floor":
        return events.repartition(STATE_PARTITIONS, "customer_id")
    raise ValueError(variant)


def output_figures(df, variant: str) -> dict:
    """One small aggregate of a batch's output (the foreachBatch action)."""
    from pyspark.sql import functions as F

    if variant == "floor":
        row = df.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("customer_id").alias("customers")).collect()[0]
        return {"rows": row["rows"], "customers": row["customers"]}
    if variant == "jvm":
        row = df.agg(F.count(F.lit(1)).alias("customers"), F.sum("held").alias("held")).collect()[0]
        return {"customers_changed": row["customers"], "held_changed": int(row["held"] or 0)}
    digest = F.xxhash64("customer_id", "product_ids", "quantities", "event_times_ms", "new_events",
                        "duplicate_events", "before_cutoff_events", "new_kafka_ts_ms",
                        F.array_sort(F.map_entries("source_offsets")), "cutoff_ms", "segment")
    row = df.agg(F.count(F.lit(1)).alias("customers"), F.sum("new_events").alias("new"),
                 F.sum("duplicate_events").alias("duplicate"), F.sum("before_cutoff_events").alias("before_cutoff"),
                 F.sum(F.size("product_ids")).alias("held"),
                 F.sum(F.when(F.col("new_events") > 0, F.size("product_ids")).otherwise(0)).alias("held_changed"),
                 F.bit_xor(digest).alias("digest")).collect()[0]
    return {key: (int(row[key]) if row[key] is not None else 0) for key in
            ("customers", "new", "duplicate", "before_cutoff", "held", "held_changed", "digest")}


def run_query(spark, variant: str, feed: Feed, ttl_ms: int, scratch: Path, label: str) -> list[dict]:
    """Start ``variant`` on its own input folder and checkpoint, feed the batches one by one,
    return per batch the progress figures and the output figures."""
    from streaming.served import hand_to_executors

    folder, staging, checkpoint = (scratch / f"{label}-{part}" for part in ("in", "staging", "checkpoint"))
    for path in (folder, staging):
        path.mkdir(parents=True)
    events = (spark.readStream.schema(INPUT_SCHEMA).option("maxFilesPerTrigger", 1).parquet(str(folder)))
    outputs: dict[int, dict] = {}
    served = {"cutoff": feed.cutoffs[0], "applied": {}}

    def each_batch(df, batch_id: int) -> None:
        hand_to_executors(df.sparkSession.sparkContext, "bench", served["cutoff"])
        started = time.perf_counter()
        outputs[batch_id] = output_figures(df, variant)
        outputs[batch_id]["foreach_ms"] = (time.perf_counter() - started) * 1000

    query = (state_frame(variant, events, ttl_ms, feed.cutoffs[0]).writeStream.queryName(f"bench-{label}")
             .outputMode("update").foreachBatch(each_batch).option("checkpointLocation", str(checkpoint))
             .trigger(processingTime="100 milliseconds").start())
    results = []
    try:
        for index, (frame, cutoff, pause) in enumerate(zip(feed.frames, feed.cutoffs, feed.pauses_s)):
            if pause:
                time.sleep(pause)
            served["cutoff"] = cutoff
            # idle triggers report progress too, under the id the next batch will have
            seen = {p["batchId"] for p in query.recentProgress if p["numInputRows"] > 0}
            staged = staging / f"part-{index:05d}.parquet"
            frame.to_parquet(staged, index=False)
            os.replace(staged, folder / staged.name)            # atomic: the source never sees half a file
            started = time.perf_counter()
            query.processAllAvailable()
            wall_ms = (time.perf_counter() - started) * 1000
            progress = [p for p in query.recentProgress if p["batchId"] not in seen and p["numInputRows"] > 0]
            if len(progress) != 1:
                raise RuntimeError(f"{label}: batch {index} ran as {len(progress)} micro-batches")
            p = progress[0]
            results.append({
                "index": index, "measured": index >= feed.measured_from, "rows": len(frame),
                "customers": int(frame["customer_id"].nunique()), "wall_ms": round(wall_ms, 1),
                "batch_timestamp": p["timestamp"], "durationMs": p["durationMs"],
                "stateOperators": [{k: op.get(k) for k in ("operatorName", "numRowsTotal", "numRowsUpdated",
                                                            "numRowsRemoved", "allUpdatesTimeMs",
                                                            "allRemovalsTimeMs", "commitTimeMs", "memoryUsedBytes",
                                                            "customMetrics")}
                                   for op in p.get("stateOperators", [])],
                "output": outputs.get(p["batchId"], {}),
            })
    finally:
        query.stop()
    error = query.exception()
    if error is not None:
        raise RuntimeError(f"{label} failed: {error}")
    return results


# --- checks ---------------------------------------------------------------------------------------

def batch_times(results: list[dict]) -> list[int]:
    """The batches' processing times (ms), as the state saw them."""
    return [int(datetime.fromisoformat(r["batch_timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
            for r in results]


def check(variant: str, results: list[dict], expected: list[dict], label: str) -> list[str]:
    problems = []
    for r, want in zip(results, expected):
        got = r["output"]
        keys = (("customers", "new", "duplicate", "before_cutoff", "held") if variant in PYTHON_VARIANTS
                else ("held_changed",) if variant == "jvm" else ())
        for key in keys:
            if got.get(key) != want[key]:
                problems.append(f"{label} batch {r['index']}: {key} {got.get(key)} (expected {want[key]})")
        if variant == "floor" and got.get("rows") != r["rows"]:
            problems.append(f"{label} batch {r['index']}: {got.get('rows')} rows out of {r['rows']}")
    return problems


def compare_digests(runs: dict[str, list[dict]], label: str) -> list[str]:
    problems = []
    names = [v for v in PYTHON_VARIANTS if v in runs]
    for other in names[1:]:
        for a, b in zip(runs[names[0]], runs[other]):
            if a["output"].get("digest") != b["output"].get("digest"):
                problems.append(f"{label} batch {a['index']}: output rows of {other} differ from {names[0]}'s")
    return problems


# --- reporting ------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    import pyarrow
    import pyspark

    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "pyspark": pyspark.__version__,
            "pandas": pd.__version__, "pyarrow": pyarrow.__version__, "java": java[0] if java else "?",
            "os": platform.platform(terse=True)}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Per variant: per size the median addBatch (ms) and per customer; the fit a + b * customers."""
    summary: dict = {}
    floor = runs.get("floor", {})
    for variant, by_size in runs.items():
        sizes, xs, ys = {}, [], []
        for n, results in by_size.items():
            measured = [r for r in results if r["measured"]]
            add = [r["durationMs"]["addBatch"] for r in measured]
            customers = [r["customers"] for r in measured]
            xs += customers
            ys += add
            median = statistics.median(add)
            row = {"median_ms": median, "min_ms": min(add), "ms_per_customer": median / statistics.median(customers),
                   "customers": statistics.median(customers), "rows": statistics.median(r["rows"] for r in measured),
                   # the state operators' own time (summed over their tasks: task time, not wall time)
                   "operator_task_ms_per_customer": statistics.median(
                       sum((op.get("allUpdatesTimeMs") or 0) + (op.get("allRemovalsTimeMs") or 0)
                           + (op.get("commitTimeMs") or 0) for op in r["stateOperators"]) / r["customers"]
                       for r in measured)}
            if variant != "floor" and n in floor:
                floor_ms = statistics.median(r["durationMs"]["addBatch"] for r in floor[n] if r["measured"])
                row["over_floor_ms_per_customer"] = (median - floor_ms) / row["customers"]
            sizes[n] = row
        fit = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (float("nan"), float("nan"))
        summary[variant] = {"sizes": sizes, "fit_a_ms": float(fit[1]), "fit_b_ms_per_customer": float(fit[0])}
    if "floor" in summary:
        for s in summary.values():
            s["fit_b_over_floor"] = s["fit_b_ms_per_customer"] - summary["floor"]["fit_b_ms_per_customer"]
    return summary


def markdown(report: dict) -> str:
    summary, sizes = report["summary"], report["args"]["customers"]
    m = report["machine"]
    lines = [f"State stage per customer ({report['started']} to {report['finished']} UTC; load average "
             f"{report['load_before']} before, {report['load_after']} after; {m['cpus']} CPUs, {m['cpu']}; "
             f"Python {m['python']}, pyspark {m['pyspark']}, pandas {m['pandas']}, pyarrow {m['pyarrow']}, "
             f"{m['java']}; `{report['args']['master']}`, {STATE_PARTITIONS} state partitions, RocksDB + "
             f"changelog checkpointing; {report['args']['held']} purchases held per returning customer, "
             f"~2.5 new per customer and batch; median of {report['args']['batches']} batches after "
             f"{report['args']['warmup']} warm-up; session settings from {report['session_settings']}):",
             "",
             "| variant | rules held | " + " | ".join(f"N = {n:,}: ms/batch (ms/customer, over floor; operator)"
                                                    for n in sizes)
             + " | fit a (ms/batch) | fit b (ms/customer) | b over floor | output check |",
             "|---|---|" + "---|" * len(sizes) + "---|---|---|---|"]
    for variant in VARIANTS:
        if variant not in summary:
            continue
        s = summary[variant]
        cells = []
        for n in sizes:
            row = s["sizes"].get(n)
            if row is None:
                cells.append("-")
                continue
            over = row.get("over_floor_ms_per_customer")
            cells.append(f"{row['median_ms']:,.0f} ({row['ms_per_customer']:.3f}"
                         + (f", {over:.3f}" if over is not None else "")
                         + (f"; {row['operator_task_ms_per_customer']:.3f})" if variant != "floor" else ")"))
        problems = report["problems"].get(variant, [])
        lines.append(f"| {DESCRIPTION[variant]} | {INVARIANTS[variant]} | " + " | ".join(cells)
                     + f" | {s['fit_a_ms']:,.0f} | {s['fit_b_ms_per_customer']:.3f} | "
                     + (f"{s['fit_b_over_floor']:.3f}" if variant != "floor" and "fit_b_over_floor" in s else "-")
                     + f" | {'MISMATCH (' + str(len(problems)) + ')' if problems else CHECKED[variant]} |")
    lines += ["", "ms/batch: the median `durationMs.addBatch` of the measured micro-batches; ms/customer: that over "
                  "the customers in the batch; over floor: the same minus the no-state floor's; operator: the state "
                  "operators' own time (allUpdatesTimeMs + allRemovalsTimeMs + commitTimeMs, summed over their tasks) "
                  "per customer; fit: ms/batch = a + b * customers over every measured batch of every size."]
    ttl = report.get("ttl_check")
    if ttl:
        lines += ["", "TTL / hot-swap scenario (20 s TTL, cutoff raised in batch 3, batch 4 after a pause past "
                      "the TTL): " + "; ".join(f"{v}: {'ok' if not p else 'MISMATCH'}" for v, p in ttl.items())]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", default="150,1000,5000", help="customers per micro-batch, comma-separated")
    parser.add_argument("--batches", type=int, default=8, help="measured micro-batches per variant and size")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured micro-batches after the prefill")
    parser.add_argument("--held", type=int, default=100, help="purchases each returning customer holds at the start")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    parser.add_argument("--no-ttl-check", dest="ttl_check", action="store_false",
                        help="skip the TTL / hot-swap scenario (~30 s per variant)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", help="write every figure as JSON here")
    parser.add_argument("--report", metavar="FILE.json", help="only print the table of an earlier run's --out")
    args = parser.parse_args()
    if args.report:
        report = json.loads(Path(args.report).read_text())
        runs: dict = {}
        for label, run in report["runs"].items():       # "<variant>-n<customers>", and "ttl-<variant>"
            variant, _, n = label.rpartition("-n")
            if variant in VARIANTS and n.isdigit():
                runs.setdefault(variant, {})[int(n)] = run["results"]
        report["summary"] = summarize(runs)
        print(markdown(report))
        return 0
    sizes = [int(n) for n in args.customers.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    report = {"args": {**vars(args), "customers": sizes, "variants": variants},
              "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "load_before": load(),
              "machine": machine(), "problems": {}, "runs": {}}
    spark, report["session_settings"] = build_session(args.master, args.driver_memory)
    scratch = Path(tempfile.mkdtemp(prefix="state-bench-"))
    runs: dict[str, dict[int, list[dict]]] = {v: {} for v in variants}
    try:
        if args.ttl_check:
            report["ttl_check"] = {}
            feed = ttl_feed(args.seed)
            for variant in variants:
                if variant == "floor":
                    continue
                label = f"ttl-{variant}"
                print(f"{label} ...", flush=True)
                results = run_query(spark, variant, feed, CHECK_TTL_MS, scratch, label)
                expected = replay(feed, CHECK_TTL_MS, batch_times(results))
                problems = check(variant, results, expected, label)
                report["ttl_check"][variant] = problems
                report["runs"][label] = {"results": results, "expected": expected}
                _say(problems)
        for turn, n in enumerate(sizes):
            feed = size_feed(n, args.held, args.warmup, args.batches, args.seed)
            expected = replay(feed, PROD_TTL_MS, [0] * len(feed.frames))
            order = variants[turn % len(variants):] + variants[:turn % len(variants)]   # rotate the order
            for variant in order:
                label = f"{variant}-n{n}"
                print(f"{label}: prefill {len(feed.frames[0]):,} rows, then {len(feed.frames) - 1} batches of "
                      f"~{int(np.mean([len(f) for f in feed.frames[1:]])):,} rows (load {load()}) ...", flush=True)
                results = run_query(spark, variant, feed, PROD_TTL_MS, scratch, label)
                runs[variant][n] = results
                report["runs"][label] = {"results": results, "expected": expected}
                problems = check(variant, results, expected, label)
                report["problems"].setdefault(variant, []).extend(problems)
                _say(problems)
                measured = [r["durationMs"]["addBatch"] for r in results if r["measured"]]
                print(f"  addBatch median {statistics.median(measured):,.0f} ms = "
                      f"{statistics.median(measured) / n:.3f} ms per customer", flush=True)
            digest_problems = compare_digests({v: runs[v][n] for v in variants if n in runs[v]}, f"n{n}")
            for problem in digest_problems:
                report["problems"].setdefault("digest", []).append(problem)
            _say(digest_problems)
    finally:
        spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report["finished"] = datetime.now(UTC).strftime("%H:%M")
    report["load_after"] = load()
    report["summary"] = summarize({v: r for v, r in runs.items() if r})
    table = markdown(report)
    report["markdown"] = table
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print()
    print(table)
    flat = [p for v, ps in report["problems"].items() if v != "jvm" for p in ps] + \
        [p for v, ps in report.get("ttl_check", {}).items() if v != "jvm" for p in ps]
    if flat:
        print(f"\n*** {len(flat)} MISMATCH(ES): the variants do not compute the same thing; see above ***")
        return 1
    return 0


def _say(problems: list[str]) -> None:
    for problem in problems[:20]:
        known = " (expected: the JVM path cannot hold this rule)" if "jvm" in problem.split()[0] else ""
        print(f"  *** MISMATCH{known}: {problem}", flush=True)
    if len(problems) > 20:
        print(f"  *** ... and {len(problems) - 20} more", flush=True)


if __name__ == "__main__":
    sys.exit(main())
