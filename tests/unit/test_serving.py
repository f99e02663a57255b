"""ServingModel.prepare and the holder: a model whose cutoff lies in the future is never served."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from models.artifact import ModelArtifact
from streaming.serving import ModelHolder, ModelNotServable, ServingModel
from tests.small_models import small_als as model

FUTURE_CUTOFF = "2099-01-01T00:00:00.000Z"


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_a_future_cutoff_is_not_servable():
    with pytest.raises(ModelNotServable,
                       match=r"model v9 is refused: cutoff_time '2099-01-01T00:00:00.000Z'.*in the future"):
        ServingModel.prepare(model("v9", FUTURE_CUTOFF))


def test_a_cutoff_within_the_clock_skew_allowance_is_served():
    soon = iso(datetime.now(UTC) + timedelta(minutes=5))
    assert ServingModel.prepare(model(cutoff_time=soon)).artifact.cutoff_time == soon


class OneVersionStore:
    """A store whose current version is whatever ``current`` holds (load skips the store's checks)."""

    def __init__(self, *artifacts: ModelArtifact):
        self.artifacts = {a.version: a for a in artifacts}
        self.current = artifacts[0].version

    def current_version(self) -> str:
        return self.current

    def load(self, version: str) -> ModelArtifact:
        return self.artifacts[version]


def test_the_holder_keeps_serving_the_old_model_when_the_new_cutoff_is_in_the_future(caplog):
    store = OneVersionStore(model("v1"), model("v2", FUTURE_CUTOFF))
    holder = ModelHolder(store, poll_ms=0)
    assert holder.current().version == "v1"
    store.current = "v2"
    assert holder.current().version == "v1"
    assert "v2" in holder.refused
    assert any("REFUSED model v2" in r.getMessage() and "in the future" in r.getMessage() for r in caplog.records)
