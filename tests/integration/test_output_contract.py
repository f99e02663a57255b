"""The output contract on the real services: the recommendations topic is created compacted, and
the records both jobs write, read back from the topic and the table, meet the JSON Schemas in
docs/ (strictly: no field the contract does not name), hold the same fields and values in both
sinks, and docs/schemas.md's consumer example finds the table's items on the topic.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

import pandas as pd
import pytest

from models.clients import dynamodb_client, ensure_table, ensure_topics, kafka_options
from models.config import REPO_ROOT
from models.records import RecordWriter
from tests.contract import errors, every_strategy_scoring, item_validator, plain, record_validator, without_nulls
from tests.small_models import PAST_CUTOFF
from tests.topics import read_topic

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def own_cfg(cfg, kafka_broker, dynamodb_endpoint):
    """Topics and a table of the test's own, created by the project's code; removed afterwards."""
    own = cfg.with_overrides({"kafka.topics.transactions": _unique("contract-tx"),
                              "kafka.topics.recommendations": _unique("contract-recs"),
                              "kafka.topics.dead_letter": _unique("contract-dlq"),
                              "kafka.topics.quality": _unique("contract-quality"),
                              "dynamodb.table": _unique("contract-recs")})
    ensure_topics(own)
    ensure_table(own)
    yield own
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_options(own), request_timeout_ms=15000)
    try:
        admin.delete_topics(list(own.get_path("kafka.topics").values()))
    finally:
        admin.close()
    dynamodb_client(own).delete_table(TableName=own.get_path("dynamodb.table"))


def _cleanup_policies(cfg, topics: list[str]) -> dict[str, str]:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(**kafka_options(cfg), request_timeout_ms=15000)
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs={"cleanup.policy": None}) for topic in topics],
            config_filter="all")
    finally:
        admin.close()
    return {topic: described["topic"][topic]["cleanup.policy"]["value"] for topic in topics}


# -- the compacted topic --------------------------------------------------------------------------
def test_the_recommendations_topic_is_created_compacted_and_the_others_are_not(own_cfg, caplog):
    topics = own_cfg.get_path("kafka.topics")
    policies = _cleanup_policies(own_cfg, list(topics.values()))
    # The quality summaries share one key: compaction would keep only the newest, so "delete".
    assert policies == {topics["recommendations"]: "compact", topics["transactions"]: "delete",
                        topics["dead_letter"]: "delete", topics["quality"]: "delete"}
    caplog.set_level(logging.WARNING, logger="models.clients")
    assert ensure_topics(own_cfg) == []                       # present and compacted: nothing to say
    assert not [r for r in caplog.records if r.name == "models.clients"]


def test_an_existing_topic_that_is_not_compacted_is_left_alone_with_a_warning(cfg, kafka_broker, caplog):
    from kafka.admin import KafkaAdminClient, NewTopic

    own = cfg.with_overrides({"kafka.topics.transactions": _unique("contract-tx"),
                              "kafka.topics.recommendations": _unique("contract-plain"),
                              "kafka.topics.dead_letter": _unique("contract-dlq"),
                              "kafka.topics.quality": _unique("contract-quality")})
    topics = own.get_path("kafka.topics")
    topic = topics["recommendations"]
    admin = KafkaAdminClient(**kafka_options(own), request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])          # as a broker's auto-creation would
        caplog.set_level(logging.WARNING, logger="models.clients")
        assert sorted(ensure_topics(own)) == sorted([topics["transactions"], topics["dead_letter"], topics["quality"]])
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "models.clients" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and topic in warnings[0] and "cleanup.policy=delete" in warnings[0]
        assert (f"kafka-configs.sh --bootstrap-server {own.get_path('kafka.bootstrap_servers')} --alter "
                f"--entity-type topics --entity-name {topic} --add-config cleanup.policy=compact") in warnings[0]
        assert _cleanup_policies(own, [topic]) == {topic: "delete"}      # not altered
    finally:
        admin.delete_topics(list(topics.values()))
        admin.close()


# -- records of both jobs, read back --------------------------------------------------------------
def _scan(cfg) -> dict[str, dict]:
    from boto3.dynamodb.types import TypeDeserializer

    deserializer = TypeDeserializer()
    pages = dynamodb_client(cfg).get_paginator("scan").paginate(TableName=cfg.get_path("dynamodb.table"),
                                                                ConsistentRead=True)
    items = ({key: deserializer.deserialize(value) for key, value in raw.items()}
             for page in pages for raw in page["Items"])
    return {item["customer_id"]: item for item in items}


def _consumer_example():
    """The functions of docs/schemas.md's consumer example (the code before its Kafka loop)."""
    text = (REPO_ROOT / "docs" / "schemas.md").read_text()
    block = text.split("### Keeping the latest list per customer", 1)[1].split("```python\n", 1)[1]
    namespace: dict = {}
    exec(compile(block.split("```", 1)[0].split("\nfrom kafka import", 1)[0], "docs/schemas.md", "exec"), namespace)
    return namespace["keep_latest"]


def _check_sinks(cfg, expect_messages: int) -> tuple[list[dict], dict[str, dict]]:
    """Every topic message and table item against the schemas; the item is the newest message
    of its customer without its nulls; the docs' consumer example keeps exactly the table's items."""
    topic = cfg.get_path("kafka.topics.recommendations")
    consumed = read_topic(cfg, topic, expect_at_least=expect_messages)
    assert len(consumed) == expect_messages
    messages = [json.loads(m.value) for m in consumed]
    validator = record_validator()
    for raw, message in zip(consumed, messages):
        assert raw.key.decode() == message["customer_id"]
        assert errors(validator, message) == [], message

    items = _scan(cfg)
    validator = item_validator()
    for item in items.values():
        assert errors(validator, item) == [], item                    # as boto3 reads it, Decimals
        assert errors(validator, plain(item)) == [], item             # as JSON

    keep_latest, latest = _consumer_example(), {}
    for raw in consumed:
        keep_latest(latest, raw.value)
    assert set(latest) == set(items)
    for customer, message in latest.items():
        assert plain(items[customer]) == without_nulls(message), customer
    return messages, items


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["driver", "spark"])     # spark: the tasks write the table, Spark's sink the topic
def test_the_batch_jobs_records_meet_the_contract_on_topic_and_table(own_cfg, spark, tmp_path, engine):
    from batch_training.generate import write
    from batch_training.job import run
    from tools.refill import batch_records

    write(tmp_path / "data", factor=0.01, seed=5, fmt="csv")
    job_cfg = own_cfg.with_overrides({
        "data.path": str(tmp_path / "data" / "transactions.csv"), "batch.output_dir": str(tmp_path / "out"),
        "model_store.uri": str(tmp_path / "models"), "batch.cv_folds": 0, "batch.als.rank": 8,
        "batch.als.max_iter": 5, "batch.als.blocks": 2, "batch.final_fit": "fold_in",
        "batch.scorers.candidates": ["als"], "batch.write_table": True, "batch.write_topic": True,
        "batch.publish.min_lift_over_popularity": -1.0,       # the gate is not under test: always publish
        "batch.topk_engine": engine})
    result = run(job_cfg, spark=spark)
    assert result.published and result.recommendations_written > 50

    # The refill tool's batch records of the same version, written later: last_event_ms unknown,
    # so older than the job's; the table keeps the job's, a consumer must too.
    lists = pd.read_parquet(tmp_path / "out" / "versions" / result.version / "recommendations.parquet")
    refilled = batch_records(lists.head(20), result.version, "personalized", computed_at_ms=int(1e13))
    writer = RecordWriter(job_cfg)
    try:
        summary = writer.write(refilled)
    finally:
        writer.close()
    assert (summary.table_written, summary.table_skipped_stale) == (0, len(refilled))

    messages, items = _check_sinks(job_cfg, result.recommendations_written + len(refilled))
    assert len(items) == result.recommendations_written
    assert {m["source"] for m in messages} == {"batch"} and {m["schema_version"] for m in messages} == {2}
    assert all(m["source_offsets"] is None and "purchases_since_cutoff" not in m for m in messages)
    assert all(m["buy_again"] for m in messages)
    assert sum(m["last_event_ms"] is None for m in messages) == len(refilled)    # the refill's, on the topic
    assert all(item["model_version"] == result.version and "last_event_ms" in item for item in items.values())


def test_the_stream_records_meet_the_contract_on_topic_and_table(own_cfg):
    """Records as the streaming job makes them (streaming.refresh, every strategy; a re-filled one
    without offsets), a re-filled batch record, and an older record written after a newer one."""
    from streaming.refresh import records_for, score_customers
    from streaming.state import iso_to_ms
    from tools.refill import batch_records

    after = iso_to_ms(PAST_CUTOFF) + 60_000
    model, frame, scored = every_strategy_scoring(after)
    stream = records_for(model, frame, scored, computed_at_ms=after + 99)
    older = records_for(model, frame.head(1).assign(event_times_ms=[[after - 1]]),
                        score_customers(model, frame.head(1), k=3, exclude_purchased=True), computed_at_ms=after + 500)
    batch = batch_records(pd.DataFrame({"customer_id": ["B1"], "recommendations": [["P0", "P5"]],
                                        "scores": [[2.0, 1.0]]}), model.version, "personalized", computed_at_ms=after)
    writer = RecordWriter(own_cfg)
    try:
        summary = writer.write(stream + batch)
        assert summary.table_written == len(stream) + 1
        assert writer.write(older).table_skipped_stale == 1        # an older list for K1, written last
    finally:
        writer.close()

    messages, items = _check_sinks(own_cfg, len(stream) + 1 + 1)
    assert {m["strategy"] for m in messages} == {"personalized", "popularity", "segment_popularity"}
    assert items["K1"]["source_offsets"] == {"transactions-0": 7, "transactions-1": 3}    # a map, as on the topic
    assert items["K1"]["last_event_ms"] == after + 5
    assert not {"source_offsets"} & set(items["REFILLED"]) and items["REFILLED"]["purchases_since_cutoff"] == 1
    assert not {"last_event_ms", "last_event_time", "source_offsets", "purchases_since_cutoff"} & set(items["B1"])

    # What the lookup tool prints is the item as JSON, and meets the item schema.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    env.update({"RECO__DYNAMODB__ENDPOINT_URL": str(own_cfg.get_path("dynamodb.endpoint_url")),
                "RECO__DYNAMODB__TABLE": str(own_cfg.get_path("dynamodb.table"))})
    for customer in ("K1", "B1"):
        done = subprocess.run([sys.executable, "-m", "tools.lookup", customer, "--json"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        assert printed == plain(items[customer]) and errors(item_validator(), printed) == []
        shown = subprocess.run([sys.executable, "-m", "tools.lookup", customer], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=90)
        assert shown.returncode == 0 and f"customer {customer}:" in shown.stdout, shown.stderr
