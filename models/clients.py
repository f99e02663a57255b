"""Clients of the outside services, configured once for every part of the product.

Kafka through kafka-python (tools, tests, the batch writer), DynamoDB and S3 through boto3.
Against the local endpoints they use the local credentials from the config; in production the
endpoint and credentials are null and boto3's standard chain applies.
"""
from __future__ import annotations

import logging
from typing import Any

from models.config import Config

log = logging.getLogger(__name__)

# Fail within seconds, not minutes, when a service is gone: callers name the service.
_BOTO_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 3, "mode": "standard"}}


def kafka_options(cfg: Config) -> dict[str, Any]:
    """kafka-python keyword arguments: servers plus the configured client options."""
    options: dict[str, Any] = {"bootstrap_servers": str(cfg.get_path("kafka.bootstrap_servers")).split(",")}
    for name, value in (cfg.get_path("kafka.client_options", {}) or {}).items():
        options[name.replace(".", "_")] = value
    return options


def spark_kafka_options(cfg: Config) -> dict[str, str]:
    """Options for Spark's Kafka connector: kafka.bootstrap.servers plus kafka.<client option>."""
    options = {"kafka.bootstrap.servers": str(cfg.get_path("kafka.bootstrap_servers"))}
    for name, value in (cfg.get_path("kafka.client_options", {}) or {}).items():
        options[f"kafka.{name}"] = str(value)
    return options


def boto3_client(cfg: Config, service: str, endpoint_url: str | None = None):
    """A boto3 client for ``service`` ("dynamodb", "s3") honouring the configured endpoint."""
    import boto3
    from botocore.config import Config as BotoConfig

    kwargs: dict[str, Any] = {"region_name": cfg.get_path("dynamodb.region", "us-east-1"),
                              "config": BotoConfig(**_BOTO_TIMEOUTS)}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    key_id = cfg.get_path("aws.access_key_id", None)
    if endpoint_url and key_id:
        kwargs["aws_access_key_id"] = key_id
        kwargs["aws_secret_access_key"] = cfg.get_path("aws.secret_access_key", "local")
    return boto3.client(service, **kwargs)


def dynamodb_client(cfg: Config):
    return boto3_client(cfg, "dynamodb", cfg.get_path("dynamodb.endpoint_url", None))


def s3_client(cfg: Config):
    return boto3_client(cfg, "s3", cfg.get_path("model_store.s3_endpoint_url", None))


def ensure_topics(cfg: Config) -> list[str]:
    """Create the product's topics if missing; returns the ones created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = list((cfg.get_path("kafka.topics") or {}).values())
    admin = KafkaAdminClient(**kafka_options(cfg), request_timeout_ms=15000)
    try:
        missing = [n for n in names if n not in set(admin.list_topics())]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, int(cfg.get_path("kafka.partitions")),
                                              int(cfg.get_path("kafka.replication_factor")))])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created Kafka topics %s", ", ".join(created))
        return created
    finally:
        admin.close()


def ensure_table(cfg: Config) -> bool:
    """Create the recommendations table (hash key customer_id, on-demand) if missing."""
    client = dynamodb_client(cfg)
    table = str(cfg.get_path("dynamodb.table"))
    if table in client.list_tables().get("TableNames", []):
        return False
    client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "customer_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "customer_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    log.info("created DynamoDB table %s", table)
    return True
