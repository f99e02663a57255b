"""The streaming job on a real (local) cluster: a Spark standalone master with two workers of the
test's own, the job submitted with spark-submit exactly as docs/cluster.md says (the packed
Python environment, the project zip, the connector jars), against the session's broker and
DynamoDB endpoint on topics, a table and a model store of its own.

One run of the job (the module's ``run`` fixture) serves every test here: purchases are
replayed, their records checked on the topic and in the table, then a second model is published
mid-stream and the next records must carry it. The executors' own logs
(``<SPARK_WORKER_DIR>/<app-id>/<executor-id>/stderr``) must show that they, not the driver,
loaded the models and scored. A test that needs a phase which failed says so, and the others
still check what they can. The whole module takes about 65 s here: the cluster start ~8 s, the
spark-submit start to the first records ~45 s (the environment archive unpacked on the driver and
on each executor, the JVMs, the first micro-batch), the hot swap ~8 s, the stop ~5 s; packing the
environment adds 10-15 s when its inputs changed, else it is reused from .run/test/dist.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.pack import Packed, pack, submit_command
from infra.services import SparkStandalone
from models.artifact import new_version
from models.clients import ensure_table, ensure_topics, kafka_options
from models.records import read_table_item
from models.store import ModelStore
from tests.isolation import isolated_config, process_env
from tests.small_models import small_als
from tests.topics import read_topic
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]

log = logging.getLogger(__name__)

SCORER_LINE = "reco-scorer: model {version} loaded"
KNOWN, NEW = ["K1", "K2"], "NEW-C1"          # the small model's customers, and one it does not know
SECOND_CUTOFF = "2025-06-01T00:00:00.000Z"   # the second model's (the first's is 2025-01-01)
SECOND_CUTOFF_MS = 1748736000000


# -- the cluster and the archives ----------------------------------------------------------------
def free_port_block(size: int) -> int:
    """A port p with p .. p+size-1 all free now (the master, then the workers' consecutive ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size > 65535:
            continue
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports found")


@pytest.fixture(scope="module")
def cluster(cfg, tmp_path_factory):
    """A standalone master and two workers (one core each) on free ports, in a folder of its own."""
    base = free_port_block(3)
    own = cfg.with_overrides({"run_dir": str(tmp_path_factory.mktemp("cluster")),
                              "spark.local_cluster.port": base, "spark.local_cluster.worker_port": base + 1,
                              "spark.local_cluster.workers": 2, "spark.local_cluster.worker_cores": 1,
                              "spark.local_cluster.worker_memory": "2g"})
    standalone = SparkStandalone(own)
    started = time.monotonic()
    try:
        standalone.start(timeout=120)
        log.info("standalone cluster (master + %d workers) started in %.1f s", len(standalone.workers),
                 time.monotonic() - started)
        yield standalone
    finally:
        standalone.stop()


@pytest.fixture(scope="module")
def packed(cfg) -> Packed:
    """The environment archive and the streaming zip under .run/test/dist (the archive is reused
    while the installed dependencies are unchanged)."""
    result = pack(cfg, "streaming")
    log.info("pack: %.1f s (environment %s)", result.seconds, "reused" if result.reused else "packed")
    return result


# -- the job -------------------------------------------------------------------------------------
def job_env(cfg) -> dict[str, str]:
    """RECO__ overrides that make the submitted job use this module's config."""
    return process_env(cfg, ("streaming.trigger_interval", "streaming.dead_letter_trigger_interval",
                             "streaming.model_poll_interval", "streaming.state_partitions", "streaming.metrics.port"))


def submit(cfg, packed: Packed, cluster: SparkStandalone, log_path: Path) -> subprocess.Popen:
    command = submit_command(cfg, packed, cluster.master_url,
                             options=["--driver-memory", "1g", "--executor-memory", "1g"])
    log.info("submitting: %s", command.shell_line())
    with open(log_path, "ab") as out:
        return subprocess.Popen(command.argv, cwd=command.cwd, env={**job_env(cfg), **command.env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def python_driver(submitter: subprocess.Popen) -> int | None:
    """The pid of the Python driver spark-submit's JVM started (the one to send SIGTERM to)."""
    todo = [submitter.pid]
    while todo:
        pid = todo.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except OSError:
                continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != submitter.pid and any(b"python" in part for part in cmdline[:1]) \
                and any(part.endswith(b"streaming/__main__.py") for part in cmdline):
            return pid
    return None


def stop_gracefully(submitter: subprocess.Popen, log_path: Path) -> int | None:
    """SIGTERM to the Python driver (as the streaming README says), then the exit code; the whole
    group is killed if it does not stop."""
    driver = python_driver(submitter)
    if driver is not None and submitter.poll() is None:
        os.kill(driver, signal.SIGTERM)
        try:
            return submitter.wait(timeout=90)
        except subprocess.TimeoutExpired:
            log.error("the job did not stop within 90 s of SIGTERM:\n%s", log_path.read_text()[-3000:])
    try:
        os.killpg(submitter.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    submitter.wait(timeout=30)
    return None


# -- the input -----------------------------------------------------------------------------------
def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def produce(cfg, events: list[dict]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka_options(cfg), acks="all", linger_ms=5)
    for event in events:
        producer.send(str(cfg.get_path("kafka.topics.transactions")), key=event["customer_id"].encode(),
                      value=json.dumps(event).encode())
    producer.flush(timeout=30)
    producer.close()


def purchases(tag: str, first_ms: int, rounds: int = 1) -> list[dict]:
    """One purchase per customer per round, a second apart; the new customer buys a product the
    model does not know (so the popularity list is its expected answer)."""
    events = []
    for r in range(rounds):
        for i, customer in enumerate([*KNOWN, NEW]):
            events.append({"event_id": f"{tag}-{r}-{customer}", "customer_id": customer,
                           "product_id": "UNKNOWN-P" if customer == NEW else f"P{(r + i) % 5 + 1}",
                           "quantity": 1, "event_time": iso(first_ms + 1000 * (3 * r + i))})
    return events


def newest_item_is(cfg, customer: str, version: str, event_ms: int) -> bool:
    item = read_table_item(cfg, customer)
    return item is not None and item["model_version"] == version and item["last_event_ms"] == event_ms


# -- one run of the job for every test ------------------------------------------------------------
@dataclass
class Run:
    cfg: object
    first: str
    second: str
    second_events: list[dict]
    driver_log: Path
    cluster: SparkStandalone
    exit_code: int | None = None
    records: list[dict] = field(default_factory=list)
    items: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)       # phase -> why it failed

    def require(self, phase: str) -> None:
        """Fail a test that needs ``phase`` with the reason it failed (each test checks what it can)."""
        if phase in self.failed:
            pytest.fail(f"{phase} failed: {self.failed[phase]}", pytrace=False)


@pytest.fixture(scope="module")
def run(cfg, _services, cluster, packed, tmp_path_factory) -> Run:
    folder = tmp_path_factory.mktemp("cluster-job")
    own = isolated_config(cfg, folder, {
        "streaming.trigger_interval": "1 second", "streaming.dead_letter_trigger_interval": "5 seconds",
        "streaming.model_poll_interval": "1 second", "streaming.state_partitions": 2})
    ensure_topics(own)
    ensure_table(own)
    store = ModelStore.from_config(own)
    first = small_als(version=new_version()).validate()
    store.publish(first)
    second = replace(first, version=new_version(), cutoff_time=SECOND_CUTOFF).validate()
    driver_log = folder / "driver.log"
    result = Run(own, first.version, second.version, [], driver_log, cluster)
    started = time.monotonic()
    submitter = submit(own, packed, cluster, driver_log)
    customers = [*KNOWN, NEW]
    try:
        # 1. Purchases after the first model's cutoff (2025-03-01): each customer's record.
        try:
            produce(own, purchases(f"a-{uuid.uuid4().hex[:6]}", 1740787200000))
            wait_for(lambda: all(newest_item_is(own, c, first.version, 1740787200000 + 1000 * i)
                                 for i, c in enumerate(customers)), 180,
                     "the first records in the table", submitter, driver_log)
            result.timings["submit to first records"] = time.monotonic() - started
        except pytest.fail.Exception as err:
            result.failed["first records"] = str(err)
            return result

        # 2. A second model mid-stream; purchases after its cutoff until every customer's record
        # carries it, then the last round's records.
        try:
            swapped = time.monotonic()
            store.publish(second)
            tag, rounds = f"b-{uuid.uuid4().hex[:6]}", 0

            def served_everywhere() -> bool:
                nonlocal rounds
                batch = purchases(f"{tag}-{rounds}", SECOND_CUTOFF_MS + 60_000 * (rounds + 1))
                produce(own, batch)
                result.second_events.extend(batch)
                rounds += 1
                return all((read_table_item(own, c) or {}).get("model_version") == second.version
                           for c in customers)

            wait_for(served_everywhere, 120, "records with the second model", submitter, driver_log, poll_s=2)
            newest = {e["customer_id"]: e for e in result.second_events}
            wait_for(lambda: all(newest_item_is(own, c, second.version, event_ms(e)) for c, e in newest.items()),
                     120, "the last purchases' records", submitter, driver_log)
            result.timings["publish to second-model records"] = time.monotonic() - swapped
        except pytest.fail.Exception as err:
            result.failed["second model"] = str(err)
    finally:
        result.items = {c: read_table_item(own, c) for c in customers}
        result.records = [json.loads(m.value) for m in
                          read_topic(own, str(own.get_path("kafka.topics.recommendations")), 0)]
        result.exit_code = stop_gracefully(submitter, driver_log)
        result.timings["whole run"] = time.monotonic() - started
        log.info("cluster run: %s%s", ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()),
                 "".join(f"; {phase} FAILED" for phase in result.failed))
    return result


def event_ms(event: dict) -> int:
    return int(datetime.fromisoformat(event["event_time"].replace("Z", "+00:00")).timestamp() * 1000)


def executor_logs(cluster: SparkStandalone) -> dict[Path, str]:
    """Every executor's stderr: ``<SPARK_WORKER_DIR>/<app-id>/<executor-id>/stderr`` on each worker."""
    return {path: path.read_text(errors="replace") for worker in cluster.workers
            for path in sorted(cluster.work_dir(worker).glob("app-*/*/stderr"))}


# -- the tests -----------------------------------------------------------------------------------
def test_the_job_ran_on_two_executors_one_per_worker(run):
    logs = executor_logs(run.cluster)
    workers = {path.parents[2] for path in logs}
    assert len(logs) == 2 and len(workers) == 2, f"executor logs: {sorted(map(str, logs))}"


def test_records_of_the_first_model_on_the_topic_and_in_the_table(run):
    run.require("first records")
    first = [r for r in run.records if r["model_version"] == run.first]
    by_customer = {r["customer_id"]: r for r in first}
    assert set(by_customer) == {*KNOWN, NEW}
    assert all(r["source"] == "stream" and r["recommendations"] for r in first)
    assert all(by_customer[c]["strategy"] == "personalized" for c in KNOWN)
    assert by_customer[NEW]["strategy"] == "popularity"
    assert all(by_customer[c]["purchases_since_cutoff"] == 1 for c in by_customer)


def test_a_model_published_mid_stream_is_in_the_next_records(run):
    """Per customer, in the order they were computed: the first model's records, then only the
    second's; the newest counts only the purchases after the second model's cutoff (the state,
    on the executors, dropped the older one)."""
    run.require("first records")
    run.require("second model")
    for customer in [*KNOWN, NEW]:
        versions = [r["model_version"] for r in sorted(run.records, key=lambda r: r["computed_at_ms"])
                    if r["customer_id"] == customer]
        assert versions[0] == run.first and versions[-1] == run.second, (customer, versions)
        assert set(versions[versions.index(run.second):]) == {run.second}, (customer, versions)
        item = run.items[customer]
        assert item["model_version"] == run.second
        assert item["purchases_since_cutoff"] == sum(e["customer_id"] == customer for e in run.second_events)


def test_the_job_stops_cleanly_on_sigterm(run):
    assert run.exit_code == 0, run.driver_log.read_text(errors="replace")[-3000:]


def test_executors_not_the_driver_loaded_the_models_and_scored(run):
    """An executor's Python worker logs ``reco-scorer: model <version> loaded`` when it loads the
    model it scores with; the driver never does (it only decides the version). Both models, when
    the second one was served."""
    logs = executor_logs(run.cluster)
    driver = run.driver_log.read_text(errors="replace")
    assert "reco-scorer: model" not in driver, "the driver loaded a model for scoring"
    for version in [run.first] + ([run.second] if "second model" not in run.failed else []):
        line = SCORER_LINE.format(version=version)
        assert any(line in text for text in logs.values()), \
            f"no executor logged {line!r}; executor logs: {sorted(map(str, logs))}"
