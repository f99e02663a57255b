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
                                     "RECO__NEW__NESTED__KEY": "x"})
    assert cfg.get_path("kafka.partitions") == 6
    assert cfg.get_path("kafka.bootstrap_servers") == "b1:9092,b2:9092"
    assert cfg.get_path("spark.ui_enabled") is True
    assert cfg.get_path("new.nested.key") == "x"


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
