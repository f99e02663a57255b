"""Popularity-bias control: a personalised list's scores divided by the product's popularity to a power.

``params["popularity_penalty"]`` (``beta`` >= 0, 0 or absent: off) multiplies each product's ALS
or item-kNN score by ``(1 + buyers) ** -beta``: the best sellers, which a customer finds (and
buys) anyway, give way to products the customer is less likely to have met. Both jobs read it from
the model's params through ``models.scorers``, so batch and stream lists agree. The blend (which
mixes popularity back in on purpose), popularity itself and the buy-again list are left alone.

The multiplier is per product, so it folds into the item side: ALS ranks ``u . (m_j v_j)`` with the
same top-k, item-kNN sums the columns of ``S diag(m)``. The batch job's CV can choose ``beta``
(``batch.scorers.popularity_penalties``), trading ranking accuracy for coverage and novelty.
"""
from __future__ import annotations

import numpy as np

PENALIZED_TYPES = ("als", "item_knn")


def penalty_of(params: dict | None) -> float:
    """The model's penalty exponent (0.0 when none is set)."""
    value = (params or {}).get("popularity_penalty") or 0.0
    return float(value)


def check_penalty(value) -> str | None:
    """What is wrong with a penalty exponent, or None (for config and artifact checks)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 10.0:
        return f"popularity_penalty {value!r}: use a number in [0, 10] (0: no penalty)"
    return None


def multipliers(popularity: np.ndarray, beta: float) -> np.ndarray:
    """``(1 + buyers) ** -beta`` per product (float64)."""
    return np.power(1.0 + np.asarray(popularity, dtype=np.float64), -float(beta))


def scaled_factors(item_factors: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """Item rows whose dot products are the scores times each product's multiplier (float32): any
    per-product multiplier (this penalty, the business rules' boost) folds in the same way."""
    return (np.asarray(item_factors, dtype=np.float64) * np.asarray(multiplier, dtype=np.float64)[:, None]
            ).astype(np.float32)


def scaled_table(table, multiplier: np.ndarray):
    """A neighbour table whose summed columns are the scores times each product's multiplier."""
    import scipy.sparse as sp

    scaled = (table.astype(np.float64) @ sp.diags(np.asarray(multiplier, dtype=np.float64))).tocsr()
    scaled = scaled.astype(np.float32)
    scaled.sort_indices()
    return scaled
