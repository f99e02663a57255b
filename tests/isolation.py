"""A config of a test's own on the shared services: its topics and table, and its model store and
checkpoints, so tests never see each other's messages, items, models or state."""
from __future__ import annotations

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
