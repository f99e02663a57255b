"""Configuration layering: defaults, files, then RECO__ environment overrides."""
from __future__ import annotations

import pytest

from models.config import ConfigError, load_config


def test_defaults_load_with_every_section():
    cfg = load_config(files=[], env={})
    for section in ("spark", "kafka", "dynamodb", "model_store"):
        assert section in cfg
    assert cfg.get_path("kafka.topics.transactions") == "transactions"


def test_environment_overrides_keep_types(tmp_path):
    cfg = load_config(files=[], env={"RECO__KAFKA__PARTITIONS": "6",
                                     "RECO__KAFKA__BOOTSTRAP_SERVERS": "b1:9092,b2:9092",
                                     "RECO__SPARK__UI_ENABLED": "true",
                                     "RECO__SPARK__EXTRA_CONF__SPARK__SQL__ADAPTIVE__ENABLED": "false"})
    assert cfg.get_path("kafka.partitions") == 6
    assert cfg.get_path("kafka.bootstrap_servers") == "b1:9092,b2:9092"
    assert cfg.get_path("spark.ui_enabled") is True
    assert cfg.get_path("spark.extra_conf.spark.sql.adaptive.enabled") is False   # an open mapping


def test_files_layer_over_defaults_and_env_over_files(tmp_path):
    extra = tmp_path / "prod.yaml"
    extra.write_text("kafka:\n  partitions: 12\n  topics:\n    transactions: tx-prod\n")
    cfg = load_config(env={"RECO_CONFIG": str(extra), "RECO__KAFKA__PARTITIONS": "24"})
    assert cfg.get_path("kafka.topics.transactions") == "tx-prod"
    assert cfg.get_path("kafka.topics.recommendations") == "recommendations"  # merged, not replaced
    assert cfg.get_path("kafka.partitions") == 24


def test_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(files=[tmp_path / "missing.yaml"], env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(files=[bad], env={})
    with pytest.raises(ConfigError, match="RECO__KAFKA__NOPE"):
        load_config(files=[], env={}).get_path("kafka.nope")


# -- unknown keys, placeholders, printing ------------------------------------------------------
def test_an_unknown_key_is_refused_with_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"RECO__KAFKA__BOOTSTRAP_SERVER: there is no setting "
                                          r"'kafka.bootstrap_server'; did you mean 'kafka.bootstrap_servers'\?"):
        load_config(files=[], env={"RECO__KAFKA__BOOTSTRAP_SERVER": "b:9092"})
    typo = tmp_path / "typo.yaml"
    typo.write_text("streaming:\n  state_tll: 30 days\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: there is no setting 'streaming.state_tll'; "
                                          r"did you mean 'streaming.state_ttl'\?"):
        load_config(files=[typo], env={})
    with pytest.raises(ConfigError, match="there is no setting 'nothing.like.it'"):
        load_config(files=[], env={"RECO__NOTHING__LIKE__IT": "1"})


def test_every_shipped_config_file_and_open_mapping_loads():
    from models.config import REPO_ROOT

    for preset in sorted((REPO_ROOT / "config" / "datasets").glob("*.yaml")):
        load_config(files=[preset], env={})
    cfg = load_config(files=[], env={"RECO__DATA__COLUMNS__SEGMENT": "country",
                                     "RECO__KAFKA__CLIENT_OPTIONS__SECURITY__PROTOCOL": "SASL_SSL"})
    assert cfg.get_path("data.columns.segment") == "country"


def test_placeholders_take_secrets_from_the_environment(tmp_path):
    layer = tmp_path / "prod.yaml"
    layer.write_text('aws:\n  secret_access_key: "${RECO_TEST_SECRET}"\n  access_key_id: "id-${RECO_TEST_ID}"\n')
    cfg = load_config(files=[layer], env={"RECO_TEST_SECRET": "s3cr3t", "RECO_TEST_ID": "42"})
    assert cfg.get_path("aws.secret_access_key") == "s3cr3t" and cfg.get_path("aws.access_key_id") == "id-42"
    with pytest.raises(ConfigError, match=r"aws.secret_access_key refers to \$\{RECO_TEST_SECRET\}, which is not set"):
        load_config(files=[layer], env={"RECO_TEST_ID": "42"})


def test_the_printed_config_redacts_every_secret(tmp_path):
    from models.config import config_text

    jaas = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" password="pw-9f3";'
    cfg = load_config(files=[], env={"RECO__AWS__SECRET_ACCESS_KEY": "aws-9f3",
                                     "RECO__KAFKA__LOCAL__SASL_USERS__ADMIN": "local-9f3"}).with_overrides(
        {"kafka.client_options": {"sasl.jaas.config": jaas, "security.protocol": "SASL_SSL"}})
    text = config_text(cfg)
    assert "9f3" not in text and text.count("<redacted>") == 3
    assert "security.protocol: SASL_SSL" in text and "bootstrap_servers: 127.0.0.1:9092" in text


def test_the_jobs_print_their_config_and_exit(tmp_path):
    import os
    import subprocess
    import sys

    from models.config import REPO_ROOT

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECO")},
           "RECO__AWS__SECRET_ACCESS_KEY": "${RECO_TEST_SECRET}", "RECO_TEST_SECRET": "never-printed"}
    for module in ("streaming", "batch_training"):
        result = subprocess.run([sys.executable, "-m", module, "--print-config"], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "secret_access_key: <redacted>" in result.stdout and "never-printed" not in result.stdout
