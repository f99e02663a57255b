"""The output contract on the real services: the recommendations topic is created compacted."""
from __future__ import annotations

import logging
import uuid

import pytest

from models.clients import dynamodb_client, ensure_table, ensure_topics, kafka_options

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def own_cfg(cfg, kafka_broker, dynamodb_endpoint):
    """Topics and a table of the test's own, created by the project's code; removed afterwards."""
    own = cfg.with_overrides({"kafka.topics.transactions": _unique("contract-tx"),
                              "kafka.topics.recommendations": _unique("contract-recs"),
                              "kafka.topics.dead_letter": _unique("contract-dlq"),
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
    assert policies == {topics["recommendations"]: "compact", topics["transactions"]: "delete",
                        topics["dead_letter"]: "delete"}
    caplog.set_level(logging.WARNING, logger="models.clients")
    assert ensure_topics(own_cfg) == []                       # present and compacted: nothing to say
    assert not [r for r in caplog.records if r.name == "models.clients"]


def test_an_existing_topic_that_is_not_compacted_is_left_alone_with_a_warning(cfg, kafka_broker, caplog):
    from kafka.admin import KafkaAdminClient, NewTopic

    own = cfg.with_overrides({"kafka.topics.transactions": _unique("contract-tx"),
                              "kafka.topics.recommendations": _unique("contract-plain"),
                              "kafka.topics.dead_letter": _unique("contract-dlq")})
    topics = own.get_path("kafka.topics")
    topic = topics["recommendations"]
    admin = KafkaAdminClient(**kafka_options(own), request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])          # as a broker's auto-creation would
        caplog.set_level(logging.WARNING, logger="models.clients")
        assert ensure_topics(own) == [topics["transactions"], topics["dead_letter"]]
        warnings = [r.getMessage() for r in caplog.records if r.name == "models.clients" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and topic in warnings[0] and "cleanup.policy=delete" in warnings[0]
        assert (f"kafka-configs.sh --bootstrap-server {own.get_path('kafka.bootstrap_servers')} --alter "
                f"--entity-type topics --entity-name {topic} --add-config cleanup.policy=compact") in warnings[0]
        assert _cleanup_policies(own, [topic]) == {topic: "delete"}      # not altered
    finally:
        admin.delete_topics(list(topics.values()))
        admin.close()
