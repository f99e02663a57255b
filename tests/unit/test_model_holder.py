"""The streaming job's model holder against a real store folder: never serving nothing silently.

A corrupt current model at start-up falls back to the newest published version that verifies; a
refused version is retried once its files are repaired; a missing pointer is named as such.
"""
from __future__ import annotations

import json
import logging

from models.store import ModelStore
from streaming.serving import ModelHolder
from tests.small_models import small_als as model


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def corrupt(store: ModelStore, version: str) -> bytes:
    """Truncate a factor file behind the store's back; returns the original bytes."""
    path = store.backend.root / "versions" / version / "item_factors.npy"
    original = path.read_bytes()
    path.write_bytes(original[:-64])
    return original


def test_a_corrupt_current_model_at_start_up_falls_back_to_the_newest_published_one(tmp_path, caplog):
    store = ModelStore(str(tmp_path))
    for version in ("v1", "v2"):
        store.publish(model(version))
    store.write(model("v3"))            # written, never published (as when the gate refuses it)
    store.publish(model("v4"))
    corrupt(store, "v4")
    holder = ModelHolder(store, poll_ms=10_000, clock=Clock())
    with caplog.at_level(logging.INFO, logger="streaming"):
        served = holder.current()
    assert served is not None and served.version == "v2"    # not v3: it was never published
    assert "v4" in holder.refused
    assert any(r.levelno == logging.ERROR and "FALLBACK" in r.getMessage() and "v2" in r.getMessage()
               for r in caplog.records)


def test_without_any_good_published_version_nothing_is_served_and_the_reason_is_kept(tmp_path):
    store = ModelStore(str(tmp_path))
    store.publish(model("v1"))
    corrupt(store, "v1")
    holder = ModelHolder(store, poll_ms=10_000, clock=Clock())
    assert holder.current() is None
    assert "v1 is refused" in holder.describe_absence()


def test_a_refused_version_is_retried_once_its_files_are_repaired(tmp_path, caplog):
    store = ModelStore(str(tmp_path))
    store.publish(model("v1"))
    clock = Clock()
    holder = ModelHolder(store, poll_ms=10_000, clock=clock)
    assert holder.current().version == "v1"
    store.publish(model("v2"))
    original = corrupt(store, "v2")
    clock.now += 11
    assert holder.current().version == "v1" and "v2" in holder.refused
    clock.now += 11
    holder.current()                    # unchanged files: not loaded again, not logged again
    assert sum("REFUSED model v2" in r.getMessage() for r in caplog.records) == 1
    (store.backend.root / "versions" / "v2" / "item_factors.npy").write_bytes(original)
    clock.now += 11
    assert holder.current().version == "v2" and "v2" not in holder.refused


def test_a_missing_pointer_is_not_called_no_model_published(tmp_path, caplog):
    store = ModelStore(str(tmp_path))
    empty = ModelHolder(ModelStore(str(tmp_path / "empty")), poll_ms=10_000, clock=Clock())
    assert empty.current() is None and "no model published" in empty.describe_absence()
    store.publish(model("v1"))
    clock = Clock()
    holder = ModelHolder(store, poll_ms=10_000, clock=clock)
    assert holder.current().version == "v1"
    (tmp_path / "CURRENT").unlink()
    clock.now += 11
    with caplog.at_level(logging.WARNING, logger="streaming"):
        assert holder.current().version == "v1"            # keeps serving what it has
    assert "CURRENT pointer" in holder.describe_absence() and "1 version(s) exist" in holder.describe_absence()
    assert any("still serving v1" in r.getMessage() for r in caplog.records)


def test_publishing_records_the_version_as_published(tmp_path):
    store = ModelStore(str(tmp_path))
    store.publish(model("v1"))
    store.write(model("v2"))
    assert store.published_versions() == ["v1"]
    assert json.loads((tmp_path / "versions" / "v1" / "published.json").read_text())["version"] == "v1"
