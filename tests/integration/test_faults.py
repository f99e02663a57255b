"""Faults suite (issue 13): the streaming job under real faults of real services, counted from the input.

Each scenario streams a few hundred purchases at a modest rate (a producer thread of the test's
own), injects one fault while they flow, and then checks, for every customer, that the newest
record on the recommendations topic (read up to its end offsets) and the table item both have
``purchases_since_cutoff`` equal to the number of distinct events the test produced for that
customer: 0 lost, 0 double-counted. The count is the test's own (unique event ids, every event
time after the model's cutoff), independent of the job; where the job runs in-process its totals
must agree, and where it was killed the state read back from its checkpoint must hold every event
exactly once. A few events are deliberately sent twice (same event id): replays must not count.

Scenarios:
1. the broker SIGKILLed and restarted mid-flow (a broker of the test's own, on its own ports and
   run folder; it keeps its data across the restart);
2. the DynamoDB endpoint (a moto server of the test's own) down for longer than the old 20 s retry
   budget and less than ``streaming.sink_outage_tolerance``; it comes back empty and the test
   re-creates the table, as an operator would;
3. SIGKILL of the driver while it is inside a write's retries (the endpoint down), then restart;
4. a corrupt model and then a future-cutoff model published mid-stream: both refused, the old
   model keeps serving and no purchase is counted as before the cutoff.

Each scenario logs "scenario | events | lost | double-counted | job behaviour" and the rows are
written to .run/test/faults.json.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from infra.process import port_open
from infra.services import DynamoDBEndpoint, KafkaBroker
from models.artifact import ModelArtifact, new_version
from models.clients import ensure_table, ensure_topics, kafka_options
from models.config import REPO_ROOT
from models.records import read_table_item
from models.store import ModelStore
from tests.isolation import isolated_config, process_env
from tests.topics import newest_records, read_topic
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

log = logging.getLogger(__name__)

RESULTS_FILE = REPO_ROOT / ".run" / "test" / "faults.json"
RESULTS: list[dict] = []

# Ports of this module's own services (the session's are 19092/19093 and 18000).
BROKER_PORT, BROKER_CONTROLLER_PORT = 19492, 19493
ENDPOINT_PORTS = {"broker": 18431, "table": 18432, "sigkill": 18433}

CUTOFF = "2025-01-01T00:00:00.000Z"          # the model's cutoff: well in the past
CUTOFF_MS = 1735689600000
TOLERANCE = "3 minutes"                      # streaming.sink_outage_tolerance in these scenarios
TABLE_OUTAGE_S = 25                          # longer than the old 1 + 2 + 4 + 8 s of retries
BROKER_OUTAGE_S = 10                         # then the restart, until the broker listens again


# -- the model ---------------------------------------------------------------------------------
def tiny_model(version: str | None = None, cutoff_time: str = CUTOFF) -> ModelArtifact:
    """A 30-customer, 40-product implicit ALS model (rank 4) with a cutoff well in the past."""
    rng = np.random.default_rng(13)
    n_users, n_items, rank, per_user = 30, 40, 4, 3
    indices = np.concatenate([np.sort(rng.choice(n_items, per_user, replace=False)) for _ in range(n_users)])
    return ModelArtifact(
        version=version or new_version(), model_type="als", item_ids=[f"P{i:03d}" for i in range(n_items)],
        item_factors=rng.normal(size=(n_items, rank)).astype(np.float32),
        user_ids=[f"C{u:03d}" for u in range(n_users)],
        user_factors=rng.normal(size=(n_users, rank)).astype(np.float32),
        popularity=np.bincount(indices, minlength=n_items).astype(float) + 1,
        user_items_indptr=np.arange(0, n_users * per_user + 1, per_user),
        user_items_indices=indices.astype(np.int32), user_items_counts=np.ones(len(indices), np.float32),
        params={"rank": rank, "reg_param": 0.1, "alpha": 1.0, "implicit_prefs": True, "scaling": "none"},
        cutoff_time=cutoff_time).validate()


@pytest.fixture(scope="module")
def model() -> ModelArtifact:
    return tiny_model()


def customers_and_products(model: ModelArtifact) -> tuple[list[str], list[str]]:
    """20 customers the model knows and 4 new ones; its products and one it does not know."""
    return ([str(c) for c in model.user_ids[:20]] + [f"NEW-{i}" for i in range(4)],
            [str(p) for p in model.item_ids] + ["UNKNOWN-P"])


def scenario_config(cfg, folder: Path, **overrides):
    """Own topics, table, model store, checkpoint and run folder (plus ``overrides``)."""
    return isolated_config(cfg, folder, {
        "run_dir": str(folder),
        "streaming.trigger_interval": "1 second", "streaming.dead_letter_trigger_interval": "5 seconds",
        "streaming.model_poll_interval": "1 second",
        "streaming.sink_outage_tolerance": TOLERANCE,
        **overrides})


def own_endpoint_overrides(name: str) -> dict:
    port = ENDPOINT_PORTS[name]
    return {"dynamodb.local.port": port, "dynamodb.endpoint_url": f"http://127.0.0.1:{port}"}


def prepare(own, model: ModelArtifact) -> None:
    ensure_topics(own)
    ensure_table(own)
    ModelStore.from_config(own).publish(model)


# -- the input and its independent count -------------------------------------------------------
def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Flow:
    """The test's producer: ``per_tick`` new purchases every ``tick_s`` (unique event ids, event
    times one second apart after the cutoff), round the customers; now and then two earlier
    events sent again (replays). An event is counted once the broker acknowledged it; what the
    broker did not acknowledge (it was away) is sent again until it does."""

    def __init__(self, cfg, name: str, customers: list[str], products: list[str], per_tick: int = 3,
                 tick_s: float = 0.5, replay_every: int = 6, seed: int = 0):
        self.cfg, self.name, self.customers, self.products = cfg, name, customers, products
        self.per_tick, self.tick_s, self.replay_every = per_tick, tick_s, replay_every
        self.topic = str(cfg.get_path("kafka.topics.transactions"))
        self.rng = np.random.default_rng(seed)
        self.events: list[dict] = []        # distinct events, acknowledged
        self.messages = 0                   # messages acknowledged (with replays and re-sends)
        self.resent = 0                     # messages sent again after the broker did not acknowledge them
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None
        self.error: BaseException | None = None

    def _event(self, customer: str | None = None) -> dict:
        i = self._next
        self._next += 1
        customer = customer or self.customers[i % len(self.customers)]
        return {"event_id": f"{self.name}-{i}", "customer_id": customer,
                "product_id": self.products[int(self.rng.integers(len(self.products)))],
                "quantity": int(self.rng.integers(1, 4)), "event_time": iso(CUTOFF_MS + 1000 * (i + 1))}

    def _producer_(self):
        from kafka import KafkaProducer

        if self._producer is None:
            self._producer = KafkaProducer(**kafka_options(self.cfg), acks="all", linger_ms=5)
        return self._producer

    def _deliver(self, messages: list[dict]) -> None:
        from kafka.errors import KafkaError

        pending = list(messages)
        while pending and not self._abort.is_set():
            producer = self._producer_()
            futures = []
            for message in pending:
                try:
                    futures.append((message, producer.send(self.topic, key=message["customer_id"].encode(),
                                                           value=json.dumps(message).encode())))
                except KafkaError:          # no metadata within max_block_ms: the broker is away
                    break
            try:
                producer.flush(timeout=150)
            except KafkaError:
                pass
            acked = {id(m) for m, future in futures if future.is_done and future.succeeded()}
            self.messages += len(acked)
            pending = [m for m in pending if id(m) not in acked]
            if pending:
                self.resent += len(pending)
                time.sleep(1)

    def _run(self) -> None:
        try:
            tick = 0
            while not self._stop.is_set():
                batch = [self._event() for _ in range(self.per_tick)]
                replays = []
                if tick % self.replay_every == self.replay_every - 1 and self.events:
                    replays = [self.events[int(k)] for k in self.rng.choice(len(self.events), 2)]
                self._deliver(batch + replays)
                with self._lock:
                    self.events.extend(batch)
                tick += 1
                self._stop.wait(self.tick_s)
        except BaseException as err:  # noqa: BLE001 - reported by stop()
            self.error = err

    def start(self) -> Flow:
        self._thread = threading.Thread(target=self._run, name=f"flow-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 200) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            assert not self._thread.is_alive(), f"the {self.name} producer did not finish within {timeout_s} s"
        assert self.error is None, f"the {self.name} producer failed: {self.error!r}"

    def closing_round(self) -> None:
        """One more purchase per customer, after the fault: each customer's newest record is
        then written after recovery (a table that came back empty holds every customer again)."""
        batch = [self._event(customer) for customer in self.customers]
        self._deliver(batch)
        with self._lock:
            self.events.extend(batch)

    def close(self) -> None:
        self._abort.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._producer is not None:
            self._producer.close(timeout=10)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.events)

    def expected(self) -> dict[str, tuple[int, int]]:
        """customer -> (distinct events, newest event time ms): the independent count."""
        with self._lock:
            events = list(self.events)
        ids = [e["event_id"] for e in events]
        assert len(ids) == len(set(ids))
        out: dict[str, tuple[int, int]] = {}
        for e in events:
            n, newest = out.get(e["customer_id"], (0, 0))
            ms = int(datetime.fromisoformat(e["event_time"].replace("Z", "+00:00")).timestamp() * 1000)
            out[e["customer_id"]] = (n + 1, max(newest, ms))
        return out

    def event_ids(self) -> list[str]:
        with self._lock:
            return sorted(e["event_id"] for e in self.events)


def table_caught_up(cfg, flow: Flow) -> bool:
    """Every customer's table item reflects at least their produced events, newest included."""
    for customer, (n, newest) in flow.expected().items():
        try:
            item = read_table_item(cfg, customer)
        except Exception:  # noqa: BLE001 - the endpoint may be coming back
            return False
        if item is None or int(item["purchases_since_cutoff"]) < n or int(item["last_event_ms"]) < newest:
            return False
    return True


def count_against_input(cfg, flow: Flow) -> dict:
    """Lost and double-counted purchases, per sink, against the test's own count of the input."""
    expected = flow.expected()
    topic = newest_records(cfg, str(cfg.get_path("kafka.topics.recommendations")))
    table = {customer: read_table_item(cfg, customer) for customer in expected}
    result = {"events": sum(n for n, _ in expected.values()), "customers": len(expected), "problems": []}
    for sink, records in (("topic", topic), ("table", table)):
        lost = double = 0
        for customer, (n, newest) in expected.items():
            record = records.get(customer)
            got = 0 if record is None else int(record["purchases_since_cutoff"])
            lost += max(0, n - got)
            double += max(0, got - n)
            if record is not None and int(record["last_event_ms"] or 0) != newest:
                result["problems"].append(f"{sink} {customer}: last_event_ms {record['last_event_ms']} != {newest}")
            if got != n:
                result["problems"].append(f"{sink} {customer}: purchases_since_cutoff {got}, produced {n}")
        result[f"{sink}_lost"], result[f"{sink}_double"] = lost, double
    result["lost"] = max(result["topic_lost"], result["table_lost"])
    result["double"] = max(result["topic_double"], result["table_double"])
    return result


def report(scenario: str, flow: Flow, counted: dict, behaviour: str, started: float) -> dict:
    """Log the scenario's row, keep it for the module and write every row so far to RESULTS_FILE."""
    row = {"scenario": scenario, "events": counted["events"], "messages": flow.messages,
           "lost": counted["lost"], "double_counted": counted["double"], "job_behaviour": behaviour,
           "duration_s": round(time.monotonic() - started, 1)}
    RESULTS.append(row)
    line = (f"{row['scenario']} | {row['events']} | {row['lost']} | {row['double_counted']} | "
            f"{row['job_behaviour']} ({row['duration_s']:.0f} s)")
    log.info("FAULT %s", line)
    print(f"\nFAULT {line}")
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({"written_at": iso(int(time.time() * 1000)), "rows": RESULTS}, indent=2))
    return row


def assert_exact(counted: dict) -> None:
    assert counted["lost"] == 0 and counted["double"] == 0 and not counted["problems"], counted


@pytest.fixture(scope="module", autouse=True)
def faults_table():
    """The rows of the module, printed together at its end."""
    RESULTS.clear()
    started = time.monotonic()
    yield RESULTS
    lines = ["scenario | events | lost | double-counted | job behaviour | duration"]
    lines += [f"{r['scenario']} | {r['events']} | {r['lost']} | {r['double_counted']} | {r['job_behaviour']} | "
              f"{r['duration_s']:.0f} s" for r in RESULTS]
    lines.append(f"module: {time.monotonic() - started:.0f} s")
    log.info("faults measured:\n%s", "\n".join(lines))
    print("\n" + "\n".join(lines))


# -- the job as a separate process -------------------------------------------------------------
def job_env(cfg) -> dict[str, str]:
    """RECO__ overrides that make ``python -m streaming`` use this scenario's config."""
    return process_env(cfg, ("streaming.trigger_interval", "streaming.dead_letter_trigger_interval",
                             "streaming.model_poll_interval", "streaming.sink_outage_tolerance"),
                       {"RECO__SPARK__DRIVER_MEMORY": "1g"})


def start_job(cfg, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "streaming"], cwd=REPO_ROOT, env=job_env(cfg),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop_job(process: subprocess.Popen, log_path: Path) -> int:
    """SIGTERM to the driver (a graceful stop, as `kill PID`); the exit code."""
    os.kill(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(process)
        pytest.fail(f"the job did not stop within 120 s of SIGTERM:\n{log_path.read_text()[-3000:]}")


def committed(cfg) -> list[int]:
    commits = Path(cfg.get_path("streaming.checkpoint_dir")) / "scoring" / "commits"
    return sorted(int(p.name) for p in commits.glob("[0-9]*")) if commits.is_dir() else []


RETRY_LINE = re.compile(r"batch (\d+): (.*); attempt (\d+) failed, retrying only those")


def write_retries(text: str) -> list[tuple[int, str, int]]:
    """(batch, problems, attempt) of every write-retry WARNING in a log."""
    return [(int(m.group(1)), m.group(2), int(m.group(3))) for m in RETRY_LINE.finditer(text)]


def retried_sinks(retries) -> str:
    sinks = sorted({sink for _, problems, _ in retries for sink in ("topic", "table") if f"{sink}:" in problems})
    return "+".join(sinks) or "none"


WRITING_MS = re.compile(r"scoring batch (\d+): .*?writing ([\d,]+)[,)]")


def longest_write_s(text: str) -> float:
    """The longest time a micro-batch of the log spent writing its records (s)."""
    return max((int(m.group(2).replace(",", "")) / 1000 for m in WRITING_MS.finditer(text)), default=0.0)


def state_event_ids(spark, cfg) -> list[str]:
    """The event ids held in the job's state, read back from its checkpoint (the job stopped)."""
    from streaming.inspect_state import read_purchase_state

    checkpoint = str(Path(cfg.get_path("streaming.checkpoint_dir")) / "scoring")
    return sorted(r["event_id"] for r in read_purchase_state(spark, checkpoint).select("event_id").collect())


# -- 1. the broker killed and restarted mid-flow -----------------------------------------------
def test_broker_killed_and_restarted_mid_flow(spark, cfg, model, tmp_path):
    started = time.monotonic()
    own = scenario_config(cfg, tmp_path, **{
        "kafka.local.port": BROKER_PORT, "kafka.local.controller_port": BROKER_CONTROLLER_PORT,
        "kafka.local.heap": "256m", "kafka.bootstrap_servers": f"127.0.0.1:{BROKER_PORT}",
        **own_endpoint_overrides("broker")})
    broker, endpoint = KafkaBroker(own), DynamoDBEndpoint(own)
    customers, products = customers_and_products(model)
    flow = Flow(own, "broker", customers, products, seed=1)
    log_path = tmp_path / "job.log"
    job = None
    try:
        broker.start()
        endpoint.start()
        prepare(own, model)
        job = start_job(own, log_path)
        flow.start()
        wait_for(lambda: len(committed(own)) >= 2 and flow.count >= 40, 240, "two committed micro-batches",
                 job, log_path)
        wait_for(lambda: read_table_item(own, customers[0]) is not None, 120, "the first records", job, log_path)
        os.killpg(broker.proc.pid(), signal.SIGKILL)         # no clean shutdown, mid-flow
        wait_for(lambda: broker.proc.pid() is None, 30, "the broker gone")
        killed_at = time.monotonic()
        batches_before = len(committed(own))
        time.sleep(BROKER_OUTAGE_S)
        assert job.poll() is None, f"the job exited during the broker outage:\n{log_path.read_text()[-3000:]}"
        # Same data folder: formatted once, kept. Started in the background: the outage ends when
        # the broker listens again (its readiness probe may take longer to say so).
        restart_error: list[BaseException] = []

        def restart_broker() -> None:
            try:
                broker.start()
            except BaseException as err:  # noqa: BLE001 - reported below
                restart_error.append(err)

        restart = threading.Thread(target=restart_broker, daemon=True)
        restart.start()
        wait_for(lambda: port_open("127.0.0.1", BROKER_PORT), 120, "the broker listening again")
        outage_s = time.monotonic() - killed_at
        produced_at_restart = flow.count
        wait_for(lambda: flow.count >= produced_at_restart + 30, 180, "the flow after the restart", job, log_path)
        flow.stop()
        flow.closing_round()
        restart.join(timeout=120)
        assert not restart_error, f"the broker did not come back: {restart_error[0]}"
        wait_for(lambda: table_caught_up(own, flow), 240, "every customer's purchases in the table", job, log_path)
        exit_code = stop_job(job, log_path)
        text = log_path.read_text()
        counted = count_against_input(own, flow)
        batches_after = len(committed(own)) - batches_before
        retries = write_retries(text)
        behaviour = (f"broker SIGKILLed, listening again after {outage_s:.0f} s; the job stayed up (no restart), "
                     f"longest batch write {longest_write_s(text):.0f} s, {len(retries)} write retries "
                     f"({retried_sinks(retries)}), {batches_after} batches after, exit {exit_code} on SIGTERM")
        report("broker SIGKILL + restart mid-flow", flow, counted, behaviour, started)
        assert exit_code == 0, text[-3000:]
        assert "streaming scorer failed" not in text
        assert_exact(counted)
        assert state_event_ids(spark, own) == flow.event_ids()       # the state: each event once
    finally:
        flow.close()
        if job is not None:
            kill_group(job)
        broker.stop()
        endpoint.stop()


# -- 2. the DynamoDB endpoint down longer than the old retry budget ----------------------------
def test_table_endpoint_down_longer_than_the_old_retry_budget(spark, cfg, kafka_broker, model, tmp_path):
    started = time.monotonic()
    own = scenario_config(cfg, tmp_path, **own_endpoint_overrides("table"))
    endpoint = DynamoDBEndpoint(own)
    customers, products = customers_and_products(model)
    flow = Flow(own, "table", customers, products, seed=2)
    log_path = tmp_path / "job.log"
    job = None
    try:
        endpoint.start()
        prepare(own, model)
        job = start_job(own, log_path)        # the executors' retry WARNINGs land in its log
        flow.start()
        wait_for(lambda: len(committed(own)) >= 2 and flow.count >= 30, 240, "purchases scored before the outage",
                 job, log_path)
        endpoint.stop()
        down_at = time.monotonic()
        wait_for(lambda: write_retries(log_path.read_text()), 120, "the executors retrying the table", job, log_path)
        time.sleep(max(0.0, TABLE_OUTAGE_S - (time.monotonic() - down_at)))
        assert job.poll() is None, f"the job stopped during the outage:\n{log_path.read_text()[-3000:]}"
        endpoint.start()
        ensure_table(own)                  # the endpoint came back empty: the operator re-creates the table
        outage_s = time.monotonic() - down_at
        batches = len(committed(own))
        wait_for(lambda: len(committed(own)) >= batches + 2, 180, "batches committed after the outage", job, log_path)
        flow.stop()
        flow.closing_round()
        wait_for(lambda: table_caught_up(own, flow), 180, "every customer's purchases in the table", job, log_path)
        exit_code = stop_job(job, log_path)
        counted = count_against_input(own, flow)
    finally:
        flow.close()
        if job is not None:
            kill_group(job)
        endpoint.stop()
    text = log_path.read_text()
    totals = stopped_totals(text)
    seen = write_retries(text)
    batches_retried = sorted({batch for batch, _, _ in seen})
    behaviour = (f"endpoint down {outage_s:.0f} s (back empty, table re-created); the job stayed up: "
                 f"{len(seen)} write retries ({retried_sinks(seen)}) on batch(es) {batches_retried}, longest "
                 f"batch write {longest_write_s(text):.0f} s; job totals: {totals['new_events']} new, "
                 f"{totals['duplicate_events']} duplicates, {totals['before_cutoff_events']} before cutoff, "
                 f"{totals['table_retries']} table retries; exit {exit_code} on SIGTERM")
    report("DynamoDB endpoint down > 20 s, < tolerance", flow, counted, behaviour, started)
    assert exit_code == 0, text[-3000:]
    assert_exact(counted)
    assert totals["new_events"] == counted["events"]             # the job's own count agrees
    assert totals["before_cutoff_events"] == 0 and totals["unscored_events"] == 0
    assert totals["table_retries"] >= len(seen) > 0                # every retry counted in the job's figures
    assert outage_s > 20 and all("table:" in problems for _, problems, _ in seen)


def stopped_totals(text: str) -> dict:
    """The job's totals from its stop line."""
    match = re.search(r"streaming scorer stopped: (\{[^}]*\})", text)
    assert match, f"no stop line in the job's log:\n{text[-3000:]}"
    return ast.literal_eval(match.group(1))


# -- 3. SIGKILL of the driver inside a write's retries -----------------------------------------
def test_driver_sigkilled_during_a_write_then_restarted(spark, cfg, kafka_broker, model, tmp_path):
    started = time.monotonic()
    own = scenario_config(cfg, tmp_path, **own_endpoint_overrides("sigkill"))
    endpoint = DynamoDBEndpoint(own)
    customers, products = customers_and_products(model)
    flow = Flow(own, "sigkill", customers, products, seed=3)
    log_path = tmp_path / "job.log"
    job = None
    try:
        endpoint.start()
        prepare(own, model)
        job = start_job(own, log_path)
        flow.start()
        wait_for(lambda: len(committed(own)) >= 2 and flow.count >= 40, 240, "two committed micro-batches",
                 job, log_path)
        endpoint.stop()                    # the next write fails and retries...
        down_at = time.monotonic()
        in_retries = wait_for(lambda: [r for r in write_retries(log_path.read_text()) if r[2] >= 2], 120,
                              "the job inside a write's retries", job, log_path)
        killed_batch = in_retries[0][0]
        kill_group(job)                    # ...and the driver is SIGKILLed inside them
        job.wait(timeout=30)
        assert killed_batch not in committed(own)
        endpoint.start()
        ensure_table(own)                  # back empty: re-created
        outage_s = time.monotonic() - down_at
        restarted_at = time.monotonic()
        job = start_job(own, log_path)
        wait_for(lambda: killed_batch in committed(own), 240, f"batch {killed_batch} replayed and committed",
                 job, log_path)
        replayed_after_s = time.monotonic() - restarted_at
        produced = flow.count
        wait_for(lambda: flow.count >= produced + 30, 120, "the flow after the restart", job, log_path)
        flow.stop()
        flow.closing_round()
        wait_for(lambda: table_caught_up(own, flow), 240, "every customer's purchases in the table", job, log_path)
        exit_code = stop_job(job, log_path)
        counted = count_against_input(own, flow)
    finally:
        flow.close()
        if job is not None:
            kill_group(job)
        endpoint.stop()
    text = log_path.read_text()
    messages = [json.loads(m.value) for m in read_topic(own, str(own.get_path("kafka.topics.recommendations")))]
    keys = [(m["customer_id"], m["last_event_ms"], m["purchases_since_cutoff"]) for m in messages]
    rewritten = len(keys) - len(set(keys))
    behaviour = (f"SIGKILL in attempt {in_retries[0][2]} of batch {killed_batch}'s write (endpoint down "
                 f"{outage_s:.0f} s); restart replayed batch {killed_batch} from the checkpoint "
                 f"({replayed_after_s:.0f} s after the restart), {rewritten} topic records written again; "
                 f"exit {exit_code} on SIGTERM")
    report("driver SIGKILL during a write, restart", flow, counted, behaviour, started)
    assert exit_code == 0, text[-3000:]
    assert_exact(counted)
    assert state_event_ids(spark, own) == flow.event_ids()           # the state: each event once


# -- 4. a corrupt model, then a future-cutoff model, published mid-stream ----------------------
def point_to(store: ModelStore, version: str) -> None:
    """Switch the pointer by hand, behind the store's checks."""
    current = {"version": version, "published_at": iso(int(time.time() * 1000))}
    store.backend.put_bytes("CURRENT", json.dumps(current).encode())


def publish_truncated(store: ModelStore) -> str:
    """A version whose factors file is truncated behind the store's back (a disk or copy fault)."""
    version = store.write(tiny_model())
    factors = store.backend.root / "versions" / version / "item_factors.npy"
    factors.write_bytes(factors.read_bytes()[:-64])
    point_to(store, version)
    return version


def publish_future_cutoff(store: ModelStore) -> str:
    """A sound version whose metadata cutoff is rewritten to 2099: every file still matches its
    size and sha256, so only the cutoff check can refuse it (tests/unit/test_store.py)."""
    version = store.write(tiny_model())
    metadata_file = store.backend.root / "versions" / version / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["cutoff_time"] = "2099-01-01T00:00:00.000Z"
    metadata_file.write_text(json.dumps(metadata))
    point_to(store, version)
    return version


def test_corrupt_and_future_cutoff_models_published_mid_stream(spark, cfg, kafka_broker, dynamodb_endpoint,
                                                              model, tmp_path, caplog):
    from streaming.job import StreamingJob

    started = time.monotonic()
    own = scenario_config(cfg, tmp_path)
    customers, products = customers_and_products(model)
    flow = Flow(own, "models", customers, products, seed=4)
    caplog.set_level(logging.INFO, logger="streaming")
    prepare(own, model)
    store = ModelStore.from_config(own)
    job = StreamingJob(own, spark).start()
    refused: dict[str, str] = {}
    try:
        flow.start()
        wait_for(lambda: job.metrics.totals["new_events"] >= 40, 240, "purchases scored with the first model")
        for kind, publish in (("truncated", publish_truncated), ("future cutoff", publish_future_cutoff)):
            version = publish(store)
            wait_for(lambda version=version: version in job.holder.refused, 120, f"the {kind} model refused")
            refused[kind] = version
            scored = job.metrics.totals["new_events"]
            wait_for(lambda scored=scored: job.metrics.totals["new_events"] >= scored + 20, 120,
                     f"purchases scored after the {kind} model")
        flow.stop()
        flow.closing_round()
        wait_for(lambda: table_caught_up(own, flow), 180, "every customer's purchases in the table")
        job.process_all_available()
        assert all(q.isActive and q.exception() is None for q in job.queries)
    finally:
        flow.close()
        job.stop()
    counted = count_against_input(own, flow)
    totals = job.metrics.totals
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "REFUSED model" in r.getMessage()]
    versions = {json.loads(m.value)["model_version"]
                for m in read_topic(own, str(own.get_path("kafka.topics.recommendations")))}
    behaviour = (f"both refused (truncated: 'corrupted', future cutoff: 'in the future'), the old model served "
                 f"every batch ({len(versions)} version(s) on the topic); job totals: {totals['new_events']} new, "
                 f"{totals['before_cutoff_events']} before cutoff, {totals['unscored_events']} not scored")
    report("corrupt model, then future-cutoff model, mid-stream", flow, counted, behaviour, started)
    assert_exact(counted)
    assert versions == {model.version} and job.holder.model.version == model.version
    assert any(f"REFUSED model {refused['truncated']}" in line and "corrupted" in line for line in lines), lines
    assert any(f"REFUSED model {refused['future cutoff']}" in line and "in the future" in line for line in lines), lines
    assert totals["new_events"] == counted["events"]
    assert totals["before_cutoff_events"] == 0 and totals["unscored_events"] == 0
