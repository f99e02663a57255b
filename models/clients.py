"""Clients of the outside services, configured once for every part of the product.

Kafka through kafka-python (tools, tests, the batch writer), DynamoDB and S3 through boto3.
Against the local endpoints they use the local credentials from the config; in production the
endpoint and credentials are null and boto3's standard chain applies.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

from models.config import Config, ConfigError

log = logging.getLogger(__name__)

# Fail within seconds, not minutes, when a service is gone: callers name the service.
_BOTO_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 3, "mode": "standard"}}


# -- Kafka client options -----------------------------------------------------------------------
# kafka.client_options holds the Java client's property names, the ones Spark's connector takes
# (as kafka.<name>). kafka-python has its own names and fewer features: the security settings
# below are translated for it, anything else is refused (a setting that silently did nothing, or
# a kafka-python error quoting the value, would be worse). Errors name the option, never its value.

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_LOGIN_MODULES = {"PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
                  "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
                  "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule"}
_JAAS_FLAGS = ("required", "requisite", "sufficient", "optional")
SUPPORTED_CLIENT_OPTIONS = (
    "security.protocol", "sasl.mechanism", "sasl.jaas.config",
    "ssl.truststore.type", "ssl.truststore.location",
    "ssl.keystore.type", "ssl.keystore.location", "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
)
_SUPPORTED_SUMMARY = (
    "kafka.client_options takes the Java client's property names; besides the Spark connector, the "
    "tools' client (kafka-python) supports security.protocol (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL), "
    "sasl.mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) with sasl.jaas.config (PlainLoginModule or "
    "ScramLoginModule, username and password), ssl.truststore.location / ssl.keystore.location with "
    "ssl.truststore.type / ssl.keystore.type PEM, ssl.key.password and "
    "ssl.endpoint.identification.algorithm (https or empty)")


class Secret(str):
    """A password handed to kafka-python: the text itself, but its repr is hidden, so a client's
    debug dump of its configuration (a dict printed with %s) shows ``'[hidden]'`` instead."""

    def __repr__(self) -> str:
        return "'[hidden]'"


def client_options(cfg: Config) -> dict[str, str]:
    """``kafka.client_options`` as flat Java property names -> text (nested mappings, e.g. from
    ``RECO__KAFKA__CLIENT_OPTIONS__SASL__MECHANISM``, joined with dots; null values left out)."""
    raw = cfg.get_path("kafka.client_options", {}) or {}
    if not isinstance(raw, dict):
        raise ConfigError("kafka.client_options must be a mapping of Kafka client property names "
                          "(e.g. security.protocol) to values")
    flat: dict[str, str] = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            elif isinstance(value, bool):
                flat[name] = "true" if value else "false"      # Java's spelling, not Python's
            elif value is not None:
                flat[name] = str(value)

    walk("", raw)
    return flat


def kafka_options(cfg: Config) -> dict[str, Any]:
    """kafka-python keyword arguments: the servers plus ``kafka.client_options`` translated from
    the Java client's names (see ``kafka_python_security``); ConfigError for anything else."""
    options: dict[str, Any] = {"bootstrap_servers": str(cfg.get_path("kafka.bootstrap_servers")).split(",")}
    options.update(kafka_python_security(client_options(cfg)))
    return options


def kafka_python_security(java: dict[str, str]) -> dict[str, Any]:
    """The kafka-python equivalent of the Java client's security settings ``java``.

    Supported: SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 with the username and password of
    ``sasl.jaas.config``; SSL with PEM files (the truststore as the CA file, the keystore, holding
    the private key and the certificate chain, as the certificate and key file, ``ssl.key.password``
    for an encrypted key). Anything else: ConfigError naming the option, never its value.
    """
    for name in java:
        if name not in SUPPORTED_CLIENT_OPTIONS:
            raise ConfigError(_unsupported(name))
    protocol = java.get("security.protocol", "PLAINTEXT").strip().upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(f"kafka.client_options security.protocol: not one of {', '.join(SECURITY_PROTOCOLS)}")
    options: dict[str, Any] = {"security_protocol": protocol}

    sasl = [n for n in java if n.startswith("sasl.")]
    if protocol.startswith("SASL_"):
        options.update(_sasl_options(java))
    elif sasl:
        raise ConfigError(f"kafka.client_options {sasl[0]}: set, but security.protocol is {protocol}; "
                          "SASL needs SASL_PLAINTEXT or SASL_SSL")

    ssl_names = [n for n in java if n.startswith("ssl.")]
    if protocol in ("SSL", "SASL_SSL"):
        options.update(_ssl_options(java))
    elif ssl_names:
        raise ConfigError(f"kafka.client_options {ssl_names[0]}: set, but security.protocol is {protocol}; "
                          "SSL settings need SSL or SASL_SSL")
    return options


def _unsupported(name: str) -> str:
    hint = ""
    if name in ("bootstrap.servers", "bootstrap_servers"):
        hint = "set kafka.bootstrap_servers instead. "
    elif "_" in name and "." not in name:
        hint = "this looks like a kafka-python name: use the Java client's (e.g. sasl.mechanism, not sasl_mechanism). "
    elif name.startswith(("ssl.truststore.", "ssl.keystore.")):
        hint = ("only PEM files given by location are supported (their passwords are not: PEM files have none, "
                "an encrypted private key takes ssl.key.password). ")
    return f"kafka.client_options {name!r} is not supported: {hint}{_SUPPORTED_SUMMARY}"


def _sasl_options(java: dict[str, str]) -> dict[str, Any]:
    mechanism = java.get("sasl.mechanism")
    if mechanism is None:
        raise ConfigError("kafka.client_options sasl.mechanism: not set (the Java client's default, GSSAPI, "
                          f"is not supported); set one of {', '.join(SASL_MECHANISMS)}")
    mechanism = mechanism.strip()
    if mechanism not in SASL_MECHANISMS:
        raise ConfigError(f"kafka.client_options sasl.mechanism: not supported; one of {', '.join(SASL_MECHANISMS)}")
    if "sasl.jaas.config" not in java:
        raise ConfigError(f"kafka.client_options sasl.jaas.config: not set; SASL {mechanism} needs "
                          f'"{_LOGIN_MODULES[mechanism]} required username=\\"...\\" password=\\"...\\";"')
    module, entries = parse_jaas_config(java["sasl.jaas.config"])
    expected = _LOGIN_MODULES[mechanism]
    if module != expected and not module.endswith("." + expected):   # a shaded copy, e.g. kafkashaded.org...
        raise ConfigError(f"kafka.client_options sasl.jaas.config: the login module must be {expected} "
                          f"for sasl.mechanism {mechanism}")
    unknown = sorted(set(entries) - {"username", "password"})
    if unknown:
        raise ConfigError(f"kafka.client_options sasl.jaas.config: option {unknown[0]!r} is not supported "
                          "(only username and password)")
    missing = [key for key in ("username", "password") if not entries.get(key)]
    if missing:
        raise ConfigError(f"kafka.client_options sasl.jaas.config: no {missing[0]} (or an empty one)")
    return {"sasl_mechanism": mechanism, "sasl_plain_username": entries["username"],
            "sasl_plain_password": Secret(entries["password"])}


_JAAS_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([^\s=;"]+)|([=;]))', re.S)
_JAAS_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


def parse_jaas_config(text: str) -> tuple[str, dict[str, str]]:
    """``<LoginModule> <flag> key="value" ...;`` (one login module, as Kafka requires) -> the
    module class and its options. Errors never quote the text: it holds a password."""
    where = "kafka.client_options sasl.jaas.config"
    shape = '<LoginModule> required username="..." password="...";'
    tokens: list[tuple[str, str]] = []       # (kind, text): kind is "word", "quoted" or the punctuation
    position, text = 0, str(text)
    while position < len(text):
        match = _JAAS_TOKEN.match(text, position)
        if match is None:
            if text[position:].strip():
                raise ConfigError(f"{where}: not a JAAS entry of the form {shape} (an unterminated quote?)")
            break
        quoted, word, punctuation = match.groups()
        if quoted is not None:
            tokens.append(("quoted", re.sub(r"\\(.)", lambda m: _JAAS_ESCAPES.get(m.group(1), m.group(1)),
                                            quoted, flags=re.S)))
        elif word is not None:
            tokens.append(("word", word))
        else:
            tokens.append((punctuation, punctuation))
        position = match.end()
    if len(tokens) < 3 or tokens[0][0] != "word" or tokens[1][0] != "word":
        raise ConfigError(f"{where}: not a JAAS entry of the form {shape}")
    if tokens[1][1].lower() not in _JAAS_FLAGS:
        raise ConfigError(f"{where}: the login module must be followed by a control flag ({', '.join(_JAAS_FLAGS)})")
    entries: dict[str, str] = {}
    rest = tokens[2:]
    while rest and rest[0][0] != ";":
        if len(rest) < 3 or rest[0][0] != "word" or rest[1][0] != "=" or rest[2][0] not in ("word", "quoted"):
            raise ConfigError(f"{where}: options must look like key=\"value\" ({shape})")
        entries[rest[0][1]] = rest[2][1]
        rest = rest[3:]
    if not rest:
        raise ConfigError(f"{where}: the entry must end with ';' ({shape})")
    if len(rest) > 1:
        raise ConfigError(f"{where}: holds more than one login module; Kafka takes exactly one")
    return tokens[0][1], entries


def _ssl_options(java: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for store, target in (("truststore", ("ssl_cafile",)), ("keystore", ("ssl_certfile", "ssl_keyfile"))):
        location = java.get(f"ssl.{store}.location")
        kind = java.get(f"ssl.{store}.type")
        if location is None:
            if kind is not None and kind.strip().upper() != "PEM":
                raise ConfigError(f"kafka.client_options ssl.{store}.type: only PEM is supported")
            continue
        if kind is None or kind.strip().upper() != "PEM":
            raise ConfigError(f"kafka.client_options ssl.{store}.location: only PEM files are supported; set "
                              f"ssl.{store}.type: PEM (convert a JKS or PKCS12 store with keytool or openssl)")
        if not os.path.isfile(location) or not os.access(location, os.R_OK):
            raise ConfigError(f"kafka.client_options ssl.{store}.location: the file does not exist or is not readable")
        for name in target:   # the PEM keystore holds the private key and the certificate chain
            options[name] = location
    if "ssl.key.password" in java:
        if "ssl_certfile" not in options:
            raise ConfigError("kafka.client_options ssl.key.password: set, but no ssl.keystore.location")
        options["ssl_password"] = Secret(java["ssl.key.password"])
    algorithm = java.get("ssl.endpoint.identification.algorithm")
    if algorithm is not None:
        if algorithm.strip().lower() not in ("https", ""):
            raise ConfigError("kafka.client_options ssl.endpoint.identification.algorithm: only https "
                              "(check the broker's host name, the default) or empty (do not)")
        options["ssl_check_hostname"] = algorithm.strip().lower() == "https"
    return options


def spark_kafka_options(cfg: Config) -> dict[str, str]:
    """Options for Spark's Kafka connector: kafka.bootstrap.servers plus kafka.<client option>,
    the Java client's names passed through unchanged."""
    options = {"kafka.bootstrap.servers": str(cfg.get_path("kafka.bootstrap_servers"))}
    for name, value in client_options(cfg).items():
        options[f"kafka.{name}"] = value
    return options


def spark_kafka_sink_options(cfg: Config, outage_tolerance_ms: int) -> dict[str, str]:
    """Spark's Kafka sink for the recommendations topic: the connection options, and a producer
    that rides out a broker outage up to ``outage_tolerance_ms`` (its sends wait and retry that
    long before the task fails)."""
    tolerance_ms = max(1000, int(outage_tolerance_ms))
    # Records come in bursts of a micro-batch: 1 MB batches send them faster than the 16 kB default.
    return {**spark_kafka_options(cfg), "kafka.acks": "all", "kafka.linger.ms": "5",
            "kafka.batch.size": str(1 << 20), "kafka.delivery.timeout.ms": str(tolerance_ms),
            "kafka.request.timeout.ms": str(min(30_000, tolerance_ms - 5)), "kafka.max.block.ms": str(tolerance_ms),
            "kafka.reconnect.backoff.max.ms": "2000", "topic": str(cfg.get_path("kafka.topics.recommendations"))}


def executor_connections(cfg: Config) -> dict:
    """The config sections a Spark task needs to reach the model store and the table (no Kafka
    credentials: Spark's sink writes the topic in the JVM). The store's URI is resolved here, on
    the driver, so a relative folder does not depend on where an executor runs."""
    uri = cfg.text("model_store.uri")
    if "://" not in uri:
        uri = str(cfg.path("model_store.uri"))
    return {"model_store": {**cfg.get_path("model_store"), "uri": uri},
            "dynamodb": {key: value for key, value in cfg.get_path("dynamodb").items() if key != "local"},
            "aws": dict(cfg.get_path("aws")), "kafka": {"topics": dict(cfg.get_path("kafka.topics"))}}


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


# Topic settings by role (the key under kafka.topics). The recommendations topic is compacted: Kafka
# keeps at least the last record of every key (customer), so a consumer that starts from the
# beginning rebuilds every customer's latest list even after the retention time (docs/schemas.md).
TOPIC_CONFIGS = {"recommendations": {"cleanup.policy": "compact"}}


def ensure_topics(cfg: Config) -> list[str]:
    """Create the product's topics if missing, with their TOPIC_CONFIGS; returns the ones created.

    An existing topic is never altered (its retention is its operator's decision, and altering needs
    a permission the job may not have): when one lacks its settings, a WARNING says what it misses
    and the command that sets them."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    roles = dict(cfg.get_path("kafka.topics") or {})
    admin = KafkaAdminClient(**kafka_options(cfg), request_timeout_ms=15000)
    try:
        existing = set(admin.list_topics())
        created = []
        for role, name in roles.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, int(cfg.get_path("kafka.partitions")),
                                              int(cfg.get_path("kafka.replication_factor")),
                                              topic_configs=dict(TOPIC_CONFIGS.get(role, {})) or None)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created Kafka topics %s", ", ".join(created))
        for role, name in roles.items():
            if name not in created and role in TOPIC_CONFIGS:
                _check_topic_configs(cfg, admin, name, TOPIC_CONFIGS[role])
        return created
    finally:
        admin.close()


def _check_topic_configs(cfg: Config, admin, topic: str, wanted: dict[str, str]) -> None:
    """A WARNING when an existing topic's settings differ from ``wanted`` (a cleanup.policy passes
    when it includes the wanted policy, e.g. "compact,delete" for "compact")."""
    from kafka.admin import ConfigResource, ConfigResourceType

    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                           configs={name: None for name in wanted})],
                                           config_filter="all")
        actual = {name: entry.get("value") for name, entry in described["topic"][topic].items()}
    except Exception as err:  # noqa: BLE001 - an older client, no DescribeConfigs permission
        log.warning("could not read the settings of Kafka topic %s (%s: %s); it should have %s", topic,
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "",
                    ", ".join(f"{k}={v}" for k, v in wanted.items()))
        return
    missing = {name: value for name, value in wanted.items()
               if value not in str(actual.get(name) or "").split(",")}
    if missing:
        settings = ",".join(f"{k}={v}" for k, v in missing.items())
        why = (" (without compaction a customer's latest record is deleted after the retention time, so a "
               "new consumer cannot rebuild every customer's list)" if "cleanup.policy" in missing else "")
        log.warning("Kafka topic %s has %s, not %s%s. The project does not alter an existing topic; set it "
                    "(no restart needed) with: kafka-configs.sh --bootstrap-server %s --alter --entity-type "
                    "topics --entity-name %s --add-config %s (and --command-config on a secured cluster)",
                    topic, ", ".join(f"{k}={actual.get(k)}" for k in missing), settings, why,
                    cfg.get_path("kafka.bootstrap_servers"), topic, settings)


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
