"""The model version the driver serves for one micro-batch, handed to every task of that batch.

The driver picks (and verifies) the model at the micro-batch boundary, then sets its version and
data cutoff as Spark local properties before it runs the batch; Spark ships a job's local
properties with each of its tasks, so every executor of the batch reads the same values from its
``TaskContext`` and never decides on its own. A version the driver refused is never named here,
so a refused model's cutoff can never purge the state. A replayed batch gets the driver's choice at
replay time, which is consistent because the failed attempt committed nothing.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

VERSION_PROPERTY = "reco.served.version"
CUTOFF_PROPERTY = "reco.served.cutoff_ms"
BATCH_PROPERTY = "reco.batch.id"
STARTED_PROPERTY = "reco.batch.started_ms"   # the driver's clock at the batch start (latency)
POPULAR_PROPERTY = "reco.served.popular"  # the quality query's baseline: product ids by popularity, JSON
NO_MODEL = ""        # no model served yet: purchases are kept, none is dropped as "in the model"


def hand_to_executors(spark_context, version: str | None, cutoff_ms: int | None, batch_id: int = -1,
                      started_ms: int = 0) -> None:
    """Driver side: the served model of the batch about to run on this thread, its id and when
    it started."""
    spark_context.setLocalProperty(VERSION_PROPERTY, version or NO_MODEL)
    spark_context.setLocalProperty(CUTOFF_PROPERTY, NO_MODEL if cutoff_ms is None else str(int(cutoff_ms)))
    spark_context.setLocalProperty(BATCH_PROPERTY, str(int(batch_id)))
    spark_context.setLocalProperty(STARTED_PROPERTY, str(int(started_ms)))


def served_cutoff_ms() -> int | None:
    """Executor side: the cutoff of the model the driver serves for this task's batch (None: no
    model, or a task the driver did not hand one to, where keeping every purchase is the safe side)."""
    text = _property(CUTOFF_PROPERTY)
    return int(text) if text else None


def served_version() -> str | None:
    """Executor side: the version the driver serves for this task's batch (None: no model)."""
    return _property(VERSION_PROPERTY) or None


def served_batch() -> tuple[int, int]:
    """Executor side: (batch id, the driver's batch start in epoch ms) of this task's batch."""
    return int(_property(BATCH_PROPERTY) or -1), int(_property(STARTED_PROPERTY) or 0)


def hand_popular_to_executors(spark_context, products: list[str]) -> None:
    """Driver side: the served model's products by popularity (best first) for the quality
    query's baseline in the batch about to run on this thread."""
    import json

    spark_context.setLocalProperty(POPULAR_PROPERTY, json.dumps(products))


def served_popular() -> list[str]:
    """Executor side: the popularity list the driver handed over ([] when none is served)."""
    import json

    return json.loads(_property(POPULAR_PROPERTY) or "[]")


def _property(name: str) -> str | None:
    from pyspark import TaskContext

    context = TaskContext.get()
    value = context.getLocalProperty(name) if context is not None else None
    if value is None:
        log.warning("no %s in this task's properties: the driver did not hand over a served model", name)
    return value
