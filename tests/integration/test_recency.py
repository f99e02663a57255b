"""Recency decay: the batch aggregation (Spark) and the stream's numpy weights give the same counts."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from batch_training.data import aggregate
from models.recency import MS_PER_DAY, decay_weights, weighted_events

pytestmark = [pytest.mark.integration]


def test_decay_halves_a_purchase_every_half_life():
    reference = 1_000 * MS_PER_DAY
    weights = decay_weights([reference, reference - 30 * MS_PER_DAY, reference - 60 * MS_PER_DAY, np.nan],
                            reference, 30.0)
    np.testing.assert_allclose(weights, [1.0, 0.5, 0.25, 1.0])
    np.testing.assert_array_equal(decay_weights([0.0, 5.0], reference, None), [1.0, 1.0])
    with pytest.raises(ValueError, match="half-life"):
        decay_weights([0.0], reference, 0.0)


@pytest.mark.parametrize("count_mode", ["rows", "quantity"])
def test_batch_and_stream_decay_give_the_same_counts(spark, count_mode):
    rng = np.random.default_rng(4)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    times = [start + timedelta(days=float(d)) for d in rng.uniform(0, 400, 60)]
    frame = pd.DataFrame({"customer_id": rng.choice(["a", "b", "c"], 60), "product_id": rng.choice(["x", "y"], 60),
                          "quantity": rng.integers(1, 4, 60).astype(float), "event_time": times})
    events = spark.createDataFrame(frame, "customer_id string, product_id string, quantity double, "
                                          "event_time timestamp")
    reference_ms = int(max(times).timestamp() * 1000)
    batch = aggregate(weighted_events(events, reference_ms, 45.0, count_mode), "quantity").toPandas()

    # The stream's way: its state holds each event's time in ms and units; weigh with decay_weights.
    event_ms = np.array([int(t.timestamp() * 1000) for t in times])
    units = frame["quantity"].to_numpy() if count_mode == "quantity" else np.ones(len(frame))
    stream = (frame.assign(count=decay_weights(event_ms, reference_ms, 45.0) * units)
              .groupby(["customer_id", "product_id"], as_index=False)["count"].sum())
    merged = batch.merge(stream, on=["customer_id", "product_id"], suffixes=("_batch", "_stream"))
    assert len(merged) == len(stream) == len(batch)
    np.testing.assert_allclose(merged["count_batch"], merged["count_stream"], rtol=1e-12)
    assert merged["count_batch"].max() < frame.groupby(["customer_id", "product_id"]).size().max() * 3
