"""Recency weighting of purchase counts: an exponential decay with a configurable half-life.

A purchase ``half_life_days`` older than the reference time counts half, twice that a quarter.
The batch job weighs every event by its age relative to the model's cutoff (the newest training
event) before summing counts; the streaming job applies the same ``decay_weights`` to the events
in its state with the same reference (the artifact's ``params["recency_reference_ms"]``), so an
event counts the same in both. Events after the reference count more than 1, as the newest do.
"""
from __future__ import annotations

import numpy as np
import pandas as pd  # module level: the pandas UDF's type hints are resolved from here

MS_PER_DAY = 86_400_000


def decay_weights(event_ms, reference_ms: int, half_life_days: float | None) -> np.ndarray:
    """``0.5 ** ((reference - event) / half_life)`` per event (float64); 1 for an unknown time (NaN)
    or when ``half_life_days`` is None (no decay)."""
    event_ms = np.asarray(event_ms, dtype=np.float64)
    if half_life_days is None:
        return np.ones_like(event_ms)
    if not half_life_days > 0:
        raise ValueError(f"recency half-life must be a positive number of days, got {half_life_days!r}")
    age_days = (float(reference_ms) - event_ms) / MS_PER_DAY
    return np.where(np.isfinite(age_days), np.power(0.5, age_days / float(half_life_days)), 1.0)


def weighted_events(events, reference_ms: int, half_life_days: float, count_mode: str):
    """Spark events with ``quantity`` replaced by the event's decayed weight (times its units when
    ``count_mode`` is ``quantity``): summing ``quantity`` then gives the decayed counts.

    The weights come from ``decay_weights`` itself (in a pandas UDF), the function the stream uses.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("double")
    def weight(event_ms: pd.Series) -> pd.Series:
        return pd.Series(decay_weights(event_ms.to_numpy(dtype=np.float64, na_value=np.nan), reference_ms,
                                       half_life_days))

    units = F.col("quantity").cast("double") if count_mode == "quantity" else F.lit(1.0)
    return events.withColumn("quantity", weight(F.unix_millis(F.col("event_time"))) * units)
