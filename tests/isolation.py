"""A config of a test's own on the shared services: its topics and table, and its model store and
checkpoints, so tests never see each other's messages, items, models or state."""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def isolated_config(cfg, folder: Path | None = None, overrides: Mapping[str, Any] | None = None):
    """``cfg`` with topics and a table named by a fresh suffix, and, given ``folder``, the model
    store and the streaming checkpoints in it; then ``overrides`` (dotted keys)."""
    suffix = uuid.uuid4().hex[:8]
    own: dict[str, Any] = {
        "kafka.topics.transactions": f"tx-{suffix}", "kafka.topics.recommendations": f"recs-{suffix}",
        "kafka.topics.dead_letter": f"dlq-{suffix}", "kafka.topics.quality": f"quality-{suffix}",
        "dynamodb.table": f"recs-{suffix}"}
    if folder is not None:
        own.update({"model_store.uri": str(folder / "models"), "streaming.checkpoint_dir": str(folder / "checkpoints")})
    return cfg.with_overrides({**own, **(overrides or {})})


# What a separate job process must share with the test that starts it: its services, topics,
# table, store and checkpoints. Each caller adds the settings its scenario changes.
PROCESS_KEYS = ("run_dir", "kafka.bootstrap_servers", "kafka.topics.transactions", "kafka.topics.recommendations",
                "kafka.topics.dead_letter", "kafka.topics.quality", "dynamodb.endpoint_url", "dynamodb.table",
                "model_store.uri", "streaming.checkpoint_dir", "spark.shuffle_partitions")


def process_env(cfg, extra_keys: tuple[str, ...] = (), fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a job started as its own process (``python -m streaming``,
    spark-submit) use ``cfg``: this process's environment without its RECO__ overrides, then one
    RECO__ override per key of ``PROCESS_KEYS`` and ``extra_keys`` that ``cfg`` sets, then ``fixed``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO__")}
    env.update({"RECO__" + key.upper().replace(".", "__"): str(cfg.get_path(key))
                for key in (*PROCESS_KEYS, *extra_keys) if cfg.get_path(key) is not None})
    env.update(fixed or {})
    return env
