"""Event-to-record latency as a fixed-bucket histogram, the one form every part of the job shares.

The executors score and write; the driver only learns when the batch's writes were done. So each
executor counts, per purchase it refreshed, the purchase's *age at the batch start* (the driver's
batch start time, handed over with the served model, minus the purchase's Kafka timestamp) into
these buckets, and the driver shifts the summed histogram by the batch's duration: latency =
(writes done - batch start) + age at batch start, as when the driver timed every event itself.
The work and the data per batch are O(buckets), never O(events).

Buckets are 25 ms wide up to 3 s (the target is p95 <= 1.5 s), then wider; their edges include
the Prometheus buckets the exporter publishes (streaming/observability.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# Lower edges (ms); the last bucket is open-ended.
EDGES_MS = np.concatenate([np.arange(0, 3000, 25), np.arange(3000, 10_000, 250), np.arange(10_000, 60_000, 2500),
                           np.arange(60_000, 600_001, 10_000)]).astype(np.int64)
N_BUCKETS = len(EDGES_MS)
# A bucket's representative value (its middle; the open last bucket: its lower edge).
_MIDDLES_MS = np.append((EDGES_MS[:-1] + EDGES_MS[1:]) / 2, EDGES_MS[-1]).astype(np.float64)


def bucket_of(values_ms: np.ndarray) -> np.ndarray:
    """The bucket index of each value (negative values, e.g. clock skew, count as 0)."""
    return np.searchsorted(EDGES_MS, np.maximum(np.asarray(values_ms, dtype=np.float64), 0), side="right") - 1


def counts_of(values_ms: Sequence[float] | np.ndarray) -> np.ndarray:
    """The histogram (int64 per bucket) of ``values_ms``."""
    return np.bincount(bucket_of(values_ms), minlength=N_BUCKETS).astype(np.int64)


def to_sparse(counts: np.ndarray) -> dict[str, int]:
    """{bucket index: count} for the non-empty buckets (what an executor sends; JSON keys are text)."""
    return {str(int(i)): int(counts[i]) for i in np.flatnonzero(counts)}


def from_sparse(sparse: dict) -> np.ndarray:
    counts = np.zeros(N_BUCKETS, dtype=np.int64)
    for index, count in (sparse or {}).items():
        counts[int(index)] += int(count)
    return counts


def shifted(counts: np.ndarray, by_ms: float) -> np.ndarray:
    """The histogram of (value + ``by_ms``), each bucket moved as its middle moves (within a bucket
    width of exact)."""
    moved = np.zeros(N_BUCKETS, dtype=np.int64)
    np.add.at(moved, bucket_of(_MIDDLES_MS + by_ms), counts)
    return moved


def percentiles(counts: np.ndarray, points: Iterable[float] = (50, 95, 99)) -> dict[str, float] | None:
    """{"p50": ms, ...} and "events", interpolated linearly within a bucket; None when empty."""
    total = int(counts.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(counts)
    upper = np.append(EDGES_MS[1:], EDGES_MS[-1]).astype(np.float64)
    result: dict[str, float] = {}
    for point in points:
        rank = max(point / 100 * total, 1e-9)     # p0: the first non-empty bucket
        index = int(np.searchsorted(cumulative, rank, side="left"))
        below = cumulative[index - 1] if index > 0 else 0
        share = (rank - below) / counts[index] if counts[index] else 0.0
        result[f"p{point:g}"] = float(EDGES_MS[index] + share * (upper[index] - EDGES_MS[index]))
    result["events"] = total
    return result


def middles_ms() -> np.ndarray:
    """Each bucket's representative value (for a sum of the values)."""
    return _MIDDLES_MS.copy()


def cumulative_at(counts: np.ndarray, bounds_ms: Iterable[float]) -> list[int]:
    """How many values fall below each bound (a bucket edge): Prometheus' cumulative ``le`` counts."""
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    return [int(cumulative[np.searchsorted(EDGES_MS, bound, side="left")]) for bound in bounds_ms]
