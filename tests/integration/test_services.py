"""The real local services answer the product's clients, and a dead one fails fast by name."""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from infra.process import ServiceError
from infra.services import DynamoDBEndpoint, KafkaBroker
from models.clients import dynamodb_client, ensure_table, ensure_topics, kafka_options, spark_kafka_options

pytestmark = pytest.mark.integration


def test_produce_and_consume_through_the_broker(kafka_broker, cfg):
    from kafka import KafkaConsumer, KafkaProducer

    topic = f"it-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(**kafka_options(cfg), acks="all")
    sent = [f"message {i}".encode() for i in range(20)]
    for value in sent:
        producer.send(topic, key=b"k", value=value)
    producer.flush(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, **kafka_options(cfg), auto_offset_reset="earliest",
                             consumer_timeout_ms=10000, group_id=f"g-{topic}")
    received = [record.value for record in consumer][: len(sent)]
    consumer.close()
    assert received == sent  # one key, one partition: order kept


def test_product_topics_are_created_once(kafka_broker, cfg):
    ensure_topics(cfg)
    assert ensure_topics(cfg) == []  # idempotent
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_options(cfg))
    try:
        assert set(cfg.get_path("kafka.topics").values()) <= set(admin.list_topics())
    finally:
        admin.close()


def test_dynamodb_table_put_and_get(dynamodb_endpoint, cfg):
    table_cfg = cfg.with_overrides({"dynamodb.table": f"it-{uuid.uuid4().hex[:8]}"})
    assert ensure_table(table_cfg) is True
    assert ensure_table(table_cfg) is False  # already there
    client = dynamodb_client(table_cfg)
    table = table_cfg.get_path("dynamodb.table")
    client.put_item(TableName=table, Item={"customer_id": {"S": "C1"}, "items": {"L": [{"S": "P9"}]}})
    item = client.get_item(TableName=table, Key={"customer_id": {"S": "C1"}}, ConsistentRead=True)["Item"]
    assert item["items"]["L"][0]["S"] == "P9"


def test_spark_reads_a_kafka_topic_with_the_connector(kafka_broker, spark, cfg):
    from kafka import KafkaProducer

    topic = f"it-spark-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(**kafka_options(cfg))
    for i in range(5):
        producer.send(topic, key=str(i).encode(), value=f'{{"n": {i}}}'.encode())
    producer.flush(timeout=30)
    producer.close()
    frame = (spark.read.format("kafka").options(**spark_kafka_options(cfg))
             .option("subscribe", topic).option("startingOffsets", "earliest").load())
    values = sorted(row.v for row in frame.selectExpr("CAST(value AS STRING) AS v").collect())
    assert values == [f'{{"n": {i}}}' for i in range(5)]


def _killed_mid_session(service, cfg) -> None:
    service.start()
    pid = service.proc.pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while service.proc.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_killed_broker_is_reported_by_name(cfg, tmp_path):
    """A second, throwaway broker on its own ports, so the shared one stays up."""
    own = cfg.with_overrides({"run_dir": str(tmp_path), "kafka.local.port": 19192,
                              "kafka.local.controller_port": 19193, "kafka.local.heap": "256m"})
    broker = KafkaBroker(own)
    try:
        _killed_mid_session(broker, own)
        started = time.monotonic()
        with pytest.raises(ServiceError, match="Kafka broker"):
            broker.check()
        assert time.monotonic() - started < 5
    finally:
        broker.stop()


def test_a_killed_dynamodb_endpoint_is_reported_by_name_and_clients_fail_fast(cfg, tmp_path):
    own = cfg.with_overrides({"run_dir": str(tmp_path), "dynamodb.local.port": 18100,
                              "dynamodb.endpoint_url": "http://127.0.0.1:18100"})
    endpoint = DynamoDBEndpoint(own)
    try:
        _killed_mid_session(endpoint, own)
        with pytest.raises(ServiceError, match="DynamoDB endpoint"):
            endpoint.check()
        started = time.monotonic()
        with pytest.raises(Exception, match="(?i)connect"):
            dynamodb_client(own).list_tables()
        assert time.monotonic() - started < 30  # bounded retries, not a hang
    finally:
        endpoint.stop()


def test_starting_on_a_port_in_use_names_the_port(cfg, tmp_path, dynamodb_endpoint):
    """Another process (here the shared endpoint) holds the port: a clear error, nothing started."""
    clash = cfg.with_overrides({"run_dir": str(tmp_path)})
    with pytest.raises(ServiceError, match=f"port {dynamodb_endpoint.port}.*in use"):
        DynamoDBEndpoint(clash).start()
