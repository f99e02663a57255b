"""Security: the streaming job, the batch sinks and the tools over SASL (SCRAM), and no secret in
any log, output or error.

A broker of the test's own, started by the project's infra code on its own ports and run folder
(the session's broker on 19092 is left alone), with the optional SASL_PLAINTEXT listener and a
user created by that code. Every client here reaches it through the SASL listener with the
documented ``kafka.client_options`` (the Java client's names): Spark's connector as they are,
kafka-python translated. The password is random per run, so finding it anywhere is a leak: in
the Python logs (caplog, kafka-python's debug config dumps included), the tools' output, the
Spark JVM's log (its Kafka clients' INFO config dumps included), the broker's log and every error.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infra.services import KafkaBroker
from models.artifact import new_version
from models.clients import ensure_table, ensure_topics, kafka_options
from models.config import REPO_ROOT
from models.records import RecommendationRecord, RecordWriter, now_ms, read_table_item
from models.store import ModelStore
from tests.isolation import isolated_config
from tests.small_models import small_als
from tests.topics import read_topic

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

USER = "reco-app"
PASSWORD = f"scram-{uuid.uuid4().hex}"
WRONG = f"wrong-{uuid.uuid4().hex}"
SECRETS = (PASSWORD, WRONG)
# Not the session broker's (19092/19093), nor those of test_services' throwaway broker (19192/19193).
PORTS = {"kafka.local.port": 19292, "kafka.local.controller_port": 19293, "kafka.local.sasl_port": 19294}
SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"


def jaas(password: str = PASSWORD) -> str:
    return f'{SCRAM} required username="{USER}" password="{password}";'


def scram_options(password: str = PASSWORD, mechanism: str = "SCRAM-SHA-512") -> dict:
    """The documented client options (README, config/default.yaml), Java names."""
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism, "sasl.jaas.config": jaas(password)}


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret value appears in {where}"


# -- the broker with a SASL listener ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sasl_broker(cfg, spark, tmp_path_factory):
    own = cfg.with_overrides({"run_dir": str(tmp_path_factory.mktemp("sasl-broker")), **PORTS,
                              "kafka.local.heap": "384m", "kafka.local.sasl_users": {USER: PASSWORD}})
    broker = KafkaBroker(own)
    started = time.monotonic()
    try:
        broker.start()
        log.info("SASL broker up in %.1f s (PLAINTEXT %s, SASL_PLAINTEXT %s)", time.monotonic() - started,
                 broker.bootstrap, broker.sasl_bootstrap)
        yield broker
    finally:
        _close_spark_kafka_producers(spark)
        broker.stop()
        # What the broker logged, failed logins included.
        assert_no_secret("the broker's log", broker.proc.log_file.read_text(errors="replace"))


def _close_spark_kafka_producers(spark) -> None:
    """Spark's connector caches its producers for 10 minutes; one left pointing at the stopped
    broker would warn about it every second through the rest of the session."""
    try:
        pool = getattr(spark.sparkContext._jvm.org.apache.spark.sql.kafka010.producer, "InternalKafkaProducerPool$")
        getattr(pool, "MODULE$").reset()
    except Exception as err:  # noqa: BLE001 - only log noise is at stake
        log.warning("could not close Spark's cached Kafka producers: %s", err)


def test_the_sasl_listener_serves_both_scram_mechanisms_beside_the_unchanged_plaintext_one(sasl_broker, cfg):
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    from tools import bootstrap_options

    props = (sasl_broker.proc.home / "server.properties").read_text()
    assert f"SASL_PLAINTEXT://127.0.0.1:{PORTS['kafka.local.sasl_port']}" in props
    assert_no_secret("server.properties", props)
    clients = {f"SASL {m}": cfg.with_overrides({"kafka.bootstrap_servers": sasl_broker.sasl_bootstrap,
                                                  "kafka.client_options": scram_options(mechanism=m)})
               for m in ("SCRAM-SHA-256", "SCRAM-SHA-512")}
    clients["PLAINTEXT"] = cfg.with_overrides({"kafka.bootstrap_servers": sasl_broker.bootstrap})
    for own in clients.values():
        admin = KafkaAdminClient(**kafka_options(own), request_timeout_ms=10000)
        try:
            admin.list_topics()
        finally:
            admin.close()
    # No credentials, no entry on the SASL port.
    with pytest.raises(KafkaError):
        KafkaAdminClient(bootstrap_servers=sasl_broker.sasl_bootstrap, request_timeout_ms=3000,
                         **bootstrap_options(KafkaAdminClient, 3)).list_topics()


# -- the job, the batch sinks and the tools ----------------------------------------------------------
def sasl_config(cfg, broker: KafkaBroker, folder: Path, password: str = PASSWORD) -> dict:
    return isolated_config(cfg, folder, {
        "kafka.bootstrap_servers": broker.sasl_bootstrap, "kafka.client_options": scram_options(password),
        "streaming.trigger_interval": "1 second", "streaming.dead_letter_trigger_interval": "1 second",
        "streaming.model_poll_interval": "1 second", "streaming.state_partitions": 2,
    })


def run_tool(module: str, *args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=timeout)
    assert_no_secret(f"the output of {module}", result.stdout + result.stderr)
    return result


def tool_env_vars(own, mechanism: str = "SCRAM-SHA-256", password: str = PASSWORD) -> dict[str, str]:
    """The settings as RECO__ variables: nested client option keys, joined with dots."""
    return {"RECO__KAFKA__BOOTSTRAP_SERVERS": str(own.get_path("kafka.bootstrap_servers")),
            "RECO__KAFKA__TOPICS__TRANSACTIONS": str(own.get_path("kafka.topics.transactions")),
            "RECO__KAFKA__CLIENT_OPTIONS__SECURITY__PROTOCOL": "SASL_PLAINTEXT",
            "RECO__KAFKA__CLIENT_OPTIONS__SASL__MECHANISM": mechanism,
            "RECO__KAFKA__CLIENT_OPTIONS__SASL__JAAS__CONFIG": jaas(password)}


def tool_config_file(own, path: Path, **client_options) -> dict[str, str]:
    """The settings as a config file (RECO_CONFIG), the way an operator keeps a password off the command line."""
    path.write_text(yaml.safe_dump({"kafka": {
        "bootstrap_servers": own.get_path("kafka.bootstrap_servers"), "topics": own.get_path("kafka.topics"),
        "client_options": {**own.get_path("kafka.client_options"), **client_options}}}))
    path.chmod(0o600)
    return {"RECO_CONFIG": str(path)}


@contextmanager
def jvm_log(spark, path: Path):
    """The Spark JVM's log lines (WARN and up, plus INFO of its Kafka clients, whose configuration
    dumps list sasl.jaas.config) copied into ``path`` while the block runs."""
    jvm = spark.sparkContext._jvm
    log4j = jvm.org.apache.logging.log4j
    configurator = log4j.core.config.Configurator
    context = log4j.LogManager.getContext(False)
    config = context.getConfiguration()
    name = f"sasl-test-{uuid.uuid4().hex[:6]}"
    layout = log4j.core.layout.PatternLayout.newBuilder().withPattern("%d %p %c: %m%n").build()
    appender = log4j.core.appender.FileAppender.newBuilder().withFileName(str(path)).setName(name) \
        .setLayout(layout).build()
    appender.start()
    config.addAppender(appender)
    config.getRootLogger().addAppender(appender, None, None)
    loggers = ("org.apache.kafka", "org.apache.spark.sql.kafka010")
    previous = {logger: log4j.LogManager.getLogger(logger).getLevel() for logger in loggers}
    for logger in loggers:
        configurator.setLevel(logger, log4j.Level.INFO)
    context.updateLoggers()
    try:
        yield path
    finally:
        for logger, level in previous.items():
            configurator.setLevel(logger, level)
        config.getRootLogger().removeAppender(name)
        context.updateLoggers()
        appender.stop()


def batch_record(customer_id: str, version: str) -> RecommendationRecord:
    return RecommendationRecord(customer_id=customer_id, product_ids=["P1", "P2"], scores=[0.9, 0.5],
                                model_version=version, strategy="popularity", last_event_ms=None,
                                computed_at_ms=now_ms(), source="batch")


def test_the_job_the_batch_sinks_and_the_tools_work_over_sasl_and_log_no_secret(
        spark, cfg, sasl_broker, dynamodb_endpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kafka.admin")    # kafka-python's dump of its configuration
    own = sasl_config(cfg, sasl_broker, tmp_path)
    ensure_topics(own)                                         # kafka-python's admin client, over SASL
    ensure_table(own)
    model = small_als(version=new_version()).validate()
    ModelStore.from_config(own).publish(model)

    # (c) the replay tool (settings from RECO__ variables, SCRAM-SHA-256) sends the purchases ...
    purchases = tmp_path / "purchases.csv"
    pd.DataFrame({"transaction_id": ["T1", "T2", "T3", "T4"], "customer_id": ["K1", "K2", "NEW-1", "K1"],
                  "product_id": ["P3", "P4", "UNKNOWN-PRODUCT", "P5"], "quantity": [1, 2, 1, 1],
                  "event_time": ["2025-06-01T10:00:00Z"] * 4}).to_csv(purchases, index=False)
    replayed = run_tool("tools.replay", str(purchases), "--now", "--quiet", "--connect-timeout", "20",
                        env=tool_env_vars(own))
    assert replayed.returncode == 0, replayed.stderr
    assert "4 messages sent" in replayed.stdout, replayed.stdout
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka_options(own), acks="all")   # and one message that is not an event
    producer.send(str(own.get_path("kafka.topics.transactions")), key=b"K9", value=b"not json")
    producer.flush(timeout=30)
    producer.close()

    # (a) ... the streaming job reads them and writes records and the dead letter over SASL ...
    from streaming.job import StreamingJob

    with jvm_log(spark, tmp_path / "jvm.log") as jvm_file:
        started = time.monotonic()
        job = StreamingJob(own, spark).start(available_now=True)
        job.await_available_now(timeout_s=240)
        log.info("streaming job over SASL: %.1f s", time.monotonic() - started)
    messages = read_topic(own, str(own.get_path("kafka.topics.recommendations")), 3)
    streamed = {json.loads(m.value)["customer_id"]: json.loads(m.value) for m in messages}
    assert set(streamed) == {"K1", "K2", "NEW-1"}
    assert streamed["K1"]["strategy"] == "personalized" and streamed["NEW-1"]["strategy"] == "popularity"
    assert all(r["source"] == "stream" and r["model_version"] == model.version for r in streamed.values())
    assert read_table_item(own, "K2")["model_version"] == model.version
    dead = read_topic(own, str(own.get_path("kafka.topics.dead_letter")), 1)
    assert [(m.value, dict(m.headers)["dlq.reason"]) for m in dead] == [(b"not json", b"not_json")]

    # (b) ... the batch sinks (the batch job's writer) write to the topic and the table over SASL ...
    writer = RecordWriter(own)
    summary = writer.write([batch_record("B1", model.version), batch_record("B2", model.version)])
    writer.close()
    assert (summary.topic_records, summary.table_written) == (2, 2)

    # ... and (c) the tail tool (settings from a config file) shows them all.
    expected = len(messages) + 2
    tailed = run_tool("tools.tail", "recommendations", "--from-beginning", "--max", str(expected), "--timeout", "60",
                      env=tool_config_file(own, tmp_path / "reco.yaml"))
    assert tailed.returncode == 0, tailed.stderr
    lines = tailed.stdout.splitlines()
    assert len(lines) == expected
    assert all(any(f" {c} " in line for line in lines) for c in ("K1", "K2", "NEW-1", "B1", "B2"))

    # (e) nothing logged anywhere holds the password, though the clients dumped their configuration.
    jvm_text = jvm_file.read_text(errors="replace")
    assert "sasl.jaas.config = [hidden]" in jvm_text, "the JVM's Kafka clients logged no configuration"
    assert "[hidden]" in caplog.text, "kafka-python's admin client logged no configuration"
    assert_no_secret("the Spark JVM's log", jvm_text)
    assert_no_secret("the Python log", caplog.text)
    assert_no_secret("the streaming metrics", json.dumps([q.lastProgress for q in job.queries], default=str))


def test_wrong_credentials_fail_clearly_without_the_password(spark, cfg, sasl_broker, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    good = sasl_config(cfg, sasl_broker, tmp_path / "good")
    ensure_topics(good)
    bad = good.with_overrides({"kafka.client_options": scram_options(WRONG)})

    # The tools: exit 3, naming the broker they could not use.
    for module, args in (("tools.tail", ("recommendations", "--timeout", "5")),
                         ("tools.replay", ("--generate", "0.0001", "--limit", "1", "--quiet"))):
        result = run_tool(module, *args, "--connect-timeout", "3",
                          env=tool_config_file(bad, tmp_path / f"{module}.yaml"))
        assert result.returncode == 3, (module, result.stdout, result.stderr)
        assert sasl_broker.sasl_bootstrap in result.stderr and "refused the credentials" in result.stderr
        log.info("%s with a wrong password: exit 3, %s", module, result.stderr.strip())

    # Settings the tools' client cannot use: exit 2 before any connection, naming the option only.
    result = run_tool("tools.tail", "recommendations", "--timeout", "5",
                      env=tool_config_file(bad, tmp_path / "unsupported.yaml", **{"sasl.login.class": WRONG}))
    assert result.returncode == 2 and "'sasl.login.class' is not supported" in result.stderr, result.stderr

    # The streaming job's Kafka source and dead-letter sink (Spark's connector): the query fails
    # with the broker's authentication error; nothing in it shows the password.
    from streaming.job import StreamingJob

    ModelStore.from_config(good).publish(small_als(version=new_version()).validate())
    with jvm_log(spark, tmp_path / "jvm.log") as jvm_file:
        started = time.monotonic()
        job = StreamingJob(bad, spark, write_table=False).start(available_now=True)
        with pytest.raises(Exception) as caught:     # StreamingQueryException, or RuntimeError naming it
            job.await_available_now(timeout_s=120)
        job.stop()
        log.info("streaming job with a wrong password failed in %.1f s", time.monotonic() - started)
    message = str(caught.value)
    assert "Authentication failed" in message and "SCRAM-SHA-512" in message, message[:2000]
    assert_no_secret("the streaming job's error", message)
    assert_no_secret("the Spark JVM's log", jvm_file.read_text(errors="replace"))
    assert_no_secret("the Python log", caplog.text)
