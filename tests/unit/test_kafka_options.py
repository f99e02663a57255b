"""kafka.client_options: one dialect (the Java client's names), translated for kafka-python.

Every secret below is a distinct marker; every error any of these settings raises is checked
for all of them, so an error quoting a value cannot slip in.
"""
from __future__ import annotations

import logging
import ssl
import subprocess

import pytest

from models.clients import (
    SUPPORTED_CLIENT_OPTIONS,
    Secret,
    client_options,
    kafka_options,
    parse_jaas_config,
    spark_kafka_options,
)
from models.config import ConfigError, load_config

PASSWORD = "pw-Quux-8f3a"
KEY_PASSWORD = "keypw-Zorg-41c2"
SECRETS = (PASSWORD, KEY_PASSWORD)
SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"
PLAIN = "org.apache.kafka.common.security.plain.PlainLoginModule"


def jaas(module: str = SCRAM, user: str = "reco", password: str = PASSWORD, extra: str = "") -> str:
    return f'{module} required username="{user}" password="{password}"{extra};'


def cfg_with(options) -> object:
    return load_config(files=[], env={}).with_overrides({"kafka.bootstrap_servers": "b1:9093,b2:9093",
                                                         "kafka.client_options": options})


def refused(options, *expected: str) -> str:
    """The ConfigError ``options`` raise: it names what is expected and no secret."""
    with pytest.raises(ConfigError) as caught:
        kafka_options(cfg_with(options))
    message = str(caught.value)
    for secret in SECRETS:
        assert secret not in message and secret not in repr(caught.value)
    # No chained exception either (a traceback would print it, value and all).
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    for text in expected:
        assert text in message, message
    return message


# -- SASL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism, module", [("PLAIN", PLAIN), ("SCRAM-SHA-256", SCRAM), ("SCRAM-SHA-512", SCRAM)])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL", "sasl_plaintext"])
def test_sasl_mechanisms_translate_to_kafka_python(mechanism, module, protocol):
    options = kafka_options(cfg_with({"security.protocol": protocol, "sasl.mechanism": mechanism,
                                      "sasl.jaas.config": jaas(module)}))
    assert options == {"bootstrap_servers": ["b1:9093", "b2:9093"], "security_protocol": protocol.upper(),
                       "sasl_mechanism": mechanism, "sasl_plain_username": "reco",
                       "sasl_plain_password": PASSWORD}
    assert isinstance(options["sasl_plain_password"], Secret)


def test_the_password_is_hidden_from_reprs_but_is_the_text_itself():
    options = kafka_options(cfg_with({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                                      "sasl.jaas.config": jaas()}))
    password = options["sasl_plain_password"]
    assert password == PASSWORD and str(password) == PASSWORD and password.encode() == PASSWORD.encode()
    assert f"{password}" == PASSWORD and "\0".join(["a", password]) == "a\0" + PASSWORD
    # What a client's debug dump of its configuration, or an "Unrecognized configs" error, prints:
    assert PASSWORD not in repr(options) and PASSWORD not in str(options) and PASSWORD not in f"{options}"


def test_the_spark_connector_gets_the_java_names_unchanged():
    java = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256", "sasl.jaas.config": jaas(),
            "ssl.truststore.type": "PEM", "ssl.truststore.location": "/etc/ca.pem",
            "max.poll.records": 500, "enable.idempotence": False}
    assert spark_kafka_options(cfg_with(java)) == {
        "kafka.bootstrap.servers": "b1:9093,b2:9093", "kafka.security.protocol": "SASL_SSL",
        "kafka.sasl.mechanism": "SCRAM-SHA-256", "kafka.sasl.jaas.config": jaas(),
        "kafka.ssl.truststore.type": "PEM", "kafka.ssl.truststore.location": "/etc/ca.pem",
        "kafka.max.poll.records": "500", "kafka.enable.idempotence": "false"}


def test_nested_keys_from_environment_overrides_join_with_dots():
    cfg = load_config(files=[], env={"RECO__KAFKA__CLIENT_OPTIONS__SECURITY__PROTOCOL": "SASL_PLAINTEXT",
                                     "RECO__KAFKA__CLIENT_OPTIONS__SASL__MECHANISM": "SCRAM-SHA-512",
                                     "RECO__KAFKA__CLIENT_OPTIONS__SASL__JAAS__CONFIG": jaas()})
    assert client_options(cfg) == {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                                   "sasl.jaas.config": jaas()}
    assert kafka_options(cfg)["sasl_plain_password"] == PASSWORD
    assert spark_kafka_options(cfg)["kafka.sasl.jaas.config"] == jaas()


def test_no_options_means_plaintext_and_nulls_are_left_out():
    assert kafka_options(cfg_with({})) == {"bootstrap_servers": ["b1:9093", "b2:9093"],
                                           "security_protocol": "PLAINTEXT"}
    assert kafka_options(cfg_with({"sasl.jaas.config": None}))["security_protocol"] == "PLAINTEXT"
    assert spark_kafka_options(cfg_with(None)) == {"kafka.bootstrap.servers": "b1:9093,b2:9093"}


@pytest.mark.parametrize("text, expected", [
    (f'{SCRAM} required username="a" password="{PASSWORD}";', ("a", PASSWORD)),
    (f"  {SCRAM}\n  REQUIRED\n  username=a\n  password={PASSWORD} ;  ", ("a", PASSWORD)),
    (f'{SCRAM} required password="p w;=\\"x\\"\\\\" username="a";', ("a", 'p w;="x"\\')),
    (f'kafkashaded.{SCRAM} optional username="a" password="{PASSWORD}";', ("a", PASSWORD)),
])
def test_jaas_entries_are_parsed_as_the_java_client_reads_them(text, expected):
    module, entries = parse_jaas_config(text)
    assert module.endswith(SCRAM) and (entries["username"], entries["password"]) == expected


# -- SSL with PEM files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pem_files(tmp_path_factory):
    """A CA certificate and a client key + certificate chain in one PEM file (the Java keystore
    layout), the key encrypted with KEY_PASSWORD."""
    folder = tmp_path_factory.mktemp("pem")
    ca, keystore = folder / "ca.pem", folder / "client.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=reco-test",
                        "-keyout", str(folder / "key.pem"), "-out", str(ca), "-passout", f"pass:{KEY_PASSWORD}"],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"openssl cannot make a test certificate: {err}")
    keystore.write_text((folder / "key.pem").read_text() + ca.read_text())
    return ca, keystore


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_ssl_with_pem_files_translates_and_loads(pem_files, protocol):
    ca, keystore = pem_files
    java = {"security.protocol": protocol, "ssl.truststore.type": "PEM", "ssl.truststore.location": str(ca),
            "ssl.keystore.type": "pem", "ssl.keystore.location": str(keystore), "ssl.key.password": KEY_PASSWORD,
            "ssl.endpoint.identification.algorithm": ""}
    if protocol == "SASL_SSL":
        java.update({"sasl.mechanism": "SCRAM-SHA-512", "sasl.jaas.config": jaas()})
    options = kafka_options(cfg_with(java))
    assert {k: options[k] for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password",
                                    "ssl_check_hostname")} == {
        "ssl_cafile": str(ca), "ssl_certfile": str(keystore), "ssl_keyfile": str(keystore),
        "ssl_password": KEY_PASSWORD, "ssl_check_hostname": False}
    assert isinstance(options["ssl_password"], Secret) and KEY_PASSWORD not in repr(options)
    # What kafka-python does with them: the files load as a CA and a client certificate chain.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(options["ssl_cafile"])
    context.load_cert_chain(options["ssl_certfile"], options["ssl_keyfile"], options["ssl_password"])


def test_ssl_without_a_truststore_uses_the_system_cas_and_checks_host_names():
    options = kafka_options(cfg_with({"security.protocol": "SSL"}))
    assert options["security_protocol"] == "SSL" and "ssl_cafile" not in options
    assert kafka_options(cfg_with({"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": "HTTPS"})
                         )["ssl_check_hostname"] is True


# -- refused, with the option named and no value -------------------------------------------------
@pytest.mark.parametrize("name", ["max.poll.records", "sasl.kerberos.service.name", "sasl.login.callback.handler.class",
                                  "ssl.protocol", "ssl.truststore.certificates", "ssl.keystore.key",
                                  "ssl.truststore.password", "ssl.keystore.password", "client.dns.lookup"])
def test_other_java_options_are_refused_by_name(name):
    message = refused({name: PASSWORD, "security.protocol": "SSL"}, repr(name), "sasl.jaas.config", "PEM")
    assert message.startswith(f"kafka.client_options {name!r} is not supported")


def test_kafka_python_names_and_the_servers_get_a_hint():
    refused({"sasl_plain_password": PASSWORD}, "'sasl_plain_password'", "Java client's", "not sasl_mechanism")
    refused({"bootstrap.servers": "b:1"}, "kafka.bootstrap_servers")


def test_the_documented_jaas_config_reaches_kafka_python_only_as_settings_it_knows(caplog):
    """Before: kafka-python got ``sasl_jaas_config`` and failed at start-up with "Unrecognized
    configs" and the password in the message. Now only names it knows reach it, and its own debug
    dump of the configuration (logged before it checks the names) shows the password hidden."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    options = kafka_options(cfg_with({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                                      "sasl.jaas.config": jaas()}))
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(options) <= set(client.DEFAULT_CONFIG)
    caplog.set_level(logging.DEBUG, logger="kafka")
    with pytest.raises(Exception, match="Unrecognized configs") as caught:
        KafkaAdminClient(**options, no_such_setting=1)    # fails before any connection
    assert "sasl_plain_username" in caplog.text and "[hidden]" in caplog.text
    assert PASSWORD not in caplog.text and PASSWORD not in str(caught.value)


@pytest.mark.parametrize("options, expected", [
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.jaas.config": jaas()}, ("sasl.mechanism", "GSSAPI")),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "GSSAPI", "sasl.jaas.config": jaas()},
     ("sasl.mechanism", "SCRAM-SHA-512")),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "OAUTHBEARER"}, ("sasl.mechanism",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN"}, ("sasl.jaas.config", "not set")),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.jaas.config": jaas(SCRAM)},
     ("sasl.jaas.config", "PlainLoginModule")),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256", "sasl.jaas.config": jaas(PLAIN)},
     ("sasl.jaas.config", "ScramLoginModule")),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": jaas(extra=" tokenauth=true")}, ("'tokenauth'", "only username and password")),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": jaas(user="")}, ("no username",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": jaas()[:-1]}, ("end with ';'",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": jaas() + " " + jaas()}, ("more than one login module",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": f'{SCRAM} required username="a" password="{PASSWORD};'}, ("unterminated quote",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": f"{PASSWORD}"}, ("not a JAAS entry",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": f"{SCRAM} {PASSWORD} username=a;"}, ("control flag",)),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
      "sasl.jaas.config": f"{SCRAM} required username a password {PASSWORD};"}, ('key="value"',)),
    ({"sasl.mechanism": "PLAIN", "sasl.jaas.config": jaas(PLAIN)}, ("sasl.", "PLAINTEXT", "SASL_PLAINTEXT")),
    ({"security.protocol": "SASL_PLAINTEXT", "ssl.truststore.location": "/x", "sasl.mechanism": "PLAIN",
      "sasl.jaas.config": jaas(PLAIN)}, ("ssl.truststore.location", "SSL or SASL_SSL")),
    ({"security.protocol": PASSWORD}, ("security.protocol", "SASL_SSL")),
    ({"security.protocol": "SSL", "ssl.truststore.location": "/etc/ca.jks"}, ("ssl.truststore.type: PEM",)),
    ({"security.protocol": "SSL", "ssl.truststore.location": "/etc/ca.p12", "ssl.truststore.type": "PKCS12"},
     ("ssl.truststore.location", "only PEM")),
    ({"security.protocol": "SSL", "ssl.keystore.type": "JKS"}, ("ssl.keystore.type", "only PEM")),
    ({"security.protocol": "SSL", "ssl.truststore.location": f"/nonexistent/{PASSWORD}.pem",
      "ssl.truststore.type": "PEM"}, ("ssl.truststore.location", "does not exist")),
    ({"security.protocol": "SSL", "ssl.key.password": KEY_PASSWORD}, ("ssl.key.password", "ssl.keystore.location")),
    ({"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": PASSWORD},
     ("ssl.endpoint.identification.algorithm", "https")),
])
def test_unusable_settings_name_the_option_and_never_a_value(options, expected):
    refused(options, *expected)


def test_client_options_must_be_a_mapping():
    refused([f"sasl.jaas.config={PASSWORD}"], "must be a mapping")


def test_every_supported_option_is_documented_in_the_default_config():
    from models.config import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text()
    for name in SUPPORTED_CLIENT_OPTIONS:
        assert name in text


# -- other places an error could quote a client option's value ------------------------------------
def test_a_config_file_that_is_not_valid_yaml_is_reported_without_the_line(tmp_path):
    """PyYAML quotes the offending line; here that line holds the password."""
    bad = tmp_path / "reco.yaml"
    bad.write_text(f'kafka:\n  client_options:\n    sasl.jaas.config: {SCRAM} required username="a" '
                   f'password="{PASSWORD}: x";\n')
    with pytest.raises(ConfigError) as caught:
        load_config(files=[bad], env={})
    assert str(bad) in str(caught.value) and "line 3" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("value, expected", [(f'"{PASSWORD}', "is not valid YAML"),
                                             (PASSWORD, "there is no setting 'kafka.client_secret'")])
def test_batch_set_errors_name_the_key_not_the_value(value, expected):
    from batch_training.__main__ import build_config, parse_args

    key = "kafka.client_options.sasl.jaas.config" if value.startswith('"') else "kafka.client_secret"
    with pytest.raises(ConfigError) as caught:
        build_config(parse_args(["--set", f"{key}={value}"]))
    assert expected in str(caught.value) and key in str(caught.value) and PASSWORD not in str(caught.value)
