"""The model artifact: everything the streaming job needs to score without Spark.

The batch job builds one after training, the store persists it, the streaming job loads it. It
holds the ids (position = index), the factor matrices, the popularity counts (the fallback and
the popularity ranking) and each known customer's purchase counts as trained on (CSR), from
which the streaming job folds in a customer's vector after new purchases.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from models import scoring
from models.popularity_bias import check_penalty
from models.scaling import SCALINGS
from models.scorers import MODEL_TYPES

MODEL_TYPES_WITH_FACTORS = ("als", "blend")   # scored from factors (models.scorers)
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
# The clock-skew allowance for a model's cutoff_time: how far it may lie ahead of the clock of
# whoever checks it (the store on write and load, the stream before serving). See
# future_cutoff_problem for why one day.
CUTOFF_SKEW_ALLOWANCE_MS = 86_400_000


class ModelValidationError(ValueError):
    """An artifact whose parts do not fit together; the message names the part."""


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_version(now: datetime | None = None) -> str:
    """A new version name that sorts by creation time: ``20261127T031500Z-3f9a1c``.

    The random suffix keeps two versions made in the same second apart.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _empty(dtype) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


@dataclass(eq=False)
class ModelArtifact:
    """A trained model in plain numpy arrays (see the module docstring)."""

    version: str
    model_type: str                      # one of models.scorers.MODEL_TYPES: als | blend | popularity | item_knn
    item_ids: np.ndarray                 # str [n_items]; position = item index
    item_factors: np.ndarray             # float32 [n_items, rank] (rank 0 without factors)
    user_ids: np.ndarray                 # str [n_users]; position = user index
    user_factors: np.ndarray             # float32 [n_users, rank]
    popularity: np.ndarray               # float64 [n_items]: distinct buyers per item in the fit's data
                                         # (the fallback ranking; bm25 scaling's product lengths)
    # Each known customer's purchase counts as trained on: CSR over user index.
    user_items_indptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    user_items_indices: np.ndarray = field(default_factory=lambda: _empty(np.int32))
    user_items_counts: np.ndarray = field(default_factory=lambda: _empty(np.float32))
    params: dict = field(default_factory=dict)     # rank, reg_param, alpha, implicit_prefs, scaling, ...
    cutoff_time: str | None = None               # ISO-8601 UTC of the newest training event
    stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now_iso)
    # Where the model came from (data source, config hash, params, code version, parent version);
    # written by the batch job, empty for versions written before it was recorded.
    lineage: dict = field(default_factory=dict)
    # item-kNN: each product's nearest products (models.neighbours; scipy CSR float32 [n_items,
    # n_items]); None for the other model types and for item-kNN versions written before it was stored.
    item_neighbours: Any = None
    _item_lookup: Any = field(default=None, init=False, repr=False)
    _user_lookup: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids).astype(str)
        self.user_ids = np.asarray(self.user_ids).astype(str)
        self.item_factors = _factor_matrix(self.item_factors, len(self.item_ids))
        self.user_factors = _factor_matrix(self.user_factors, len(self.user_ids))
        self.popularity = np.asarray(self.popularity, dtype=np.float64)
        if len(self.user_items_indptr) == 1 and len(self.user_ids) and not len(self.user_items_indices):
            # No purchases given: every known user has an empty row.
            self.user_items_indptr = np.zeros(len(self.user_ids) + 1, dtype=np.int64)
        self.user_items_indptr = np.asarray(self.user_items_indptr, dtype=np.int64)
        self.user_items_indices = np.asarray(self.user_items_indices, dtype=np.int32)
        self.user_items_counts = np.asarray(self.user_items_counts, dtype=np.float32)

    # -- sizes -----------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def rank(self) -> int:
        return int(self.item_factors.shape[1]) if self.item_factors.ndim == 2 else 0

    @property
    def user_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The purchase CSR as (indptr, indices, counts)."""
        return self.user_items_indptr, self.user_items_indices, self.user_items_counts

    # -- look-ups --------------------------------------------------------------------------
    def item_index(self, product_ids) -> np.ndarray:
        """Item index (int64) of each product id; -1 for products the model does not know."""
        if self._item_lookup is None:
            self._item_lookup = _lookup(self.item_ids)
        return self._item_lookup.get_indexer(np.asarray(product_ids).astype(str))

    def user_index(self, customer_ids) -> np.ndarray:
        """User index (int64) of each customer id; -1 for customers the model does not know."""
        if self._user_lookup is None:
            self._user_lookup = _lookup(self.user_ids)
        return self._user_lookup.get_indexer(np.asarray(customer_ids).astype(str))

    def popularity_order(self) -> np.ndarray:
        """Item indices by descending popularity, ties by lower item index."""
        return scoring.popularity_order(self.popularity)

    def user_items_of(self, user_indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The purchase CSR restricted to ``user_indices`` in their order (-1 = unknown: empty row)."""
        users = np.asarray(user_indices, dtype=np.int64)
        known = users >= 0
        safe = np.where(known, users, 0)
        starts = self.user_items_indptr[safe]
        lengths = np.where(known, self.user_items_indptr[safe + 1] - starts, 0)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return indptr, self.user_items_indices[take], self.user_items_counts[take]

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> ModelArtifact:
        """Raise ModelValidationError naming the first inconsistency; returns self when sound."""
        _check(isinstance(self.version, str) and VERSION_PATTERN.match(self.version) is not None,
               f"version {self.version!r} must be 1-128 letters, digits, '.', '_' or '-' "
               "(use models.artifact.new_version())")
        _check(isinstance(self.model_type, str) and self.model_type in MODEL_TYPES,
               f"model_type {self.model_type!r} is not a known scorer: use one of {MODEL_TYPES} "
               "(models.scorers.MODEL_TYPES)")
        self._validate_ids()
        self._validate_factors()
        _check(self.popularity.shape == (self.n_items,),
               f"popularity has shape {self.popularity.shape}, expected ({self.n_items},) (one per item)")
        _check(bool(np.all(np.isfinite(self.popularity))) and not np.any(self.popularity < 0),
               "popularity must be finite and non-negative")
        self._validate_user_items()
        self._validate_neighbours()
        self._validate_metadata()
        return self

    def _validate_neighbours(self) -> None:
        table = self.item_neighbours
        if table is None:
            return
        _check(table.shape == (self.n_items, self.n_items),
               f"item_neighbours has shape {table.shape}, expected ({self.n_items}, {self.n_items})")
        _check(bool(np.all(np.isfinite(table.data))) and not np.any(table.data < 0),
               "item_neighbours weights must be finite and non-negative")

    def _validate_ids(self) -> None:
        for name, ids in (("item_ids", self.item_ids), ("user_ids", self.user_ids)):
            _check(ids.ndim == 1, f"{name} must be 1-D, got shape {ids.shape}")
            duplicated = _first_duplicate(ids)
            _check(duplicated is None, f"{name} must be unique, {duplicated!r} appears more than once")

    def _validate_factors(self) -> None:
        items, users = self.item_factors, self.user_factors
        _check(items.ndim == 2 and users.ndim == 2,
               f"factor matrices must be 2-D, got item_factors {items.shape} and user_factors {users.shape}")
        _check(items.shape[0] == self.n_items,
               f"item_factors has {items.shape[0]} rows but there are {self.n_items} item_ids")
        _check(users.shape[0] == self.n_users,
               f"user_factors has {users.shape[0]} rows but there are {self.n_users} user_ids")
        _check(users.shape[1] == items.shape[1] or users.shape[1] == 0,
               f"user_factors rank {users.shape[1]} differs from item_factors rank {items.shape[1]}")
        if self.model_type in MODEL_TYPES_WITH_FACTORS:
            _check(self.rank >= 1 and self.n_items >= 1,
                   f"a {self.model_type!r} model needs item factors, got shape {items.shape}")
        for name, matrix in (("item_factors", items), ("user_factors", users)):
            _check(matrix.dtype == np.float32, f"{name} must be float32, got {matrix.dtype}")
            _check(bool(np.all(np.isfinite(matrix))), f"{name} contains NaN or infinite values")
            # All-zero factors score every product 0: the lists would be arbitrary, not personal.
            _check(self.model_type not in MODEL_TYPES_WITH_FACTORS or matrix.size == 0 or bool(np.any(matrix)),
                   f"{name} are all zero: the {self.model_type!r} model would rank every product alike; "
                   "the training failed (check the ALS parameters and the input counts); retrain")
        declared = self.params.get("rank")
        _check(declared is None or self.rank == 0 or int(declared) == self.rank,
               f"params rank {declared} differs from the factors' rank {self.rank}")

    def _validate_user_items(self) -> None:
        indptr, indices, counts = self.user_items
        _check(indptr.shape == (self.n_users + 1,),
               f"user_items indptr has {len(indptr)} entries, expected n_users + 1 = {self.n_users + 1}")
        _check(indptr[0] == 0 and not np.any(np.diff(indptr) < 0),
               "user_items indptr must start at 0 and never decrease")
        _check(indptr[-1] == len(indices) == len(counts),
               f"user_items indptr ends at {indptr[-1]} but there are {len(indices)} indices and "
               f"{len(counts)} counts")
        _check(not len(indices) or (indices.min() >= 0 and indices.max() < self.n_items),
               f"user_items item indices must lie in [0, {self.n_items})")
        _check(bool(np.all(np.isfinite(counts))), "user_items counts contain NaN or infinite values")

    def _validate_metadata(self) -> None:
        for name in ("params", "stats", "metrics", "lineage"):
            value = getattr(self, name)
            _check(isinstance(value, dict), f"{name} must be a dict, got {type(value).__name__}")
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError) as err:
                raise ModelValidationError(f"{name} must be JSON-serialisable: {err}") from None
        scaling = self.params.get("scaling", "none")
        _check(scaling in SCALINGS, f"params scaling {scaling!r} must be one of {SCALINGS}")
        problem = check_penalty(self.params.get("popularity_penalty") or 0.0)
        _check(problem is None, f"params {problem}")
        for name in ("cutoff_time", "created_at"):
            value = getattr(self, name)
            _check(value is None or _is_iso_time(value), f"{name} {value!r} is not an ISO-8601 time")
        problem = future_cutoff_problem(self.cutoff_time)
        _check(problem is None, problem or "")


def future_cutoff_problem(cutoff_time: str | None, now: datetime | None = None) -> str | None:
    """Why ``cutoff_time`` cannot be served (more than CUTOFF_SKEW_ALLOWANCE_MS after ``now``,
    default the wall clock), or None; an absent or unreadable time is left to the other checks.

    The stream takes every purchase at or before the cutoff as already in the model, so a future
    cutoff silences it until then. The allowance is one day, the stream's own for event times (the
    default ``streaming.max_future_skew``, which the batch job's cleaning applies too): a model
    trained on rows that rule admits is accepted, a cutoff the stream would dead-letter as an event
    time is refused. It is a constant rather than a setting so that the store (which has no
    streaming settings) and the stream judge a model alike; raise it if ``streaming.max_future_skew``
    is raised above one day, or the store refuses models whose rows the cleaning let through.
    """
    if not cutoff_time or not _is_iso_time(cutoff_time):
        return None
    cutoff = datetime.fromisoformat(str(cutoff_time).replace("Z", "+00:00"))
    if cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    ahead_ms = (cutoff - now).total_seconds() * 1000
    if ahead_ms <= CUTOFF_SKEW_ALLOWANCE_MS:
        return None
    return (f"cutoff_time {cutoff_time!r} lies {ahead_ms / 86_400_000:,.1f} days in the future (clock "
            f"{now:%Y-%m-%dT%H:%M:%SZ}, allowed skew {CUTOFF_SKEW_ALLOWANCE_MS / 3_600_000:g} h), so the stream "
            "would ignore every purchase until then: the training data has future-dated rows; drop them "
            "(the batch job does, by streaming.max_future_skew) and retrain")


def _factor_matrix(matrix, n_rows: int) -> np.ndarray:
    """float32 2-D; an empty array stands for "no factors" (rank 0)."""
    matrix = np.asarray(matrix)
    if matrix.size == 0 and matrix.shape[0] in (0, n_rows):
        rank = matrix.shape[1] if matrix.ndim == 2 and matrix.shape[0] == n_rows else 0
        return np.zeros((n_rows, rank), dtype=np.float32)
    if matrix.dtype != np.float32 and np.issubdtype(matrix.dtype, np.floating):
        matrix = matrix.astype(np.float32)
    return matrix


def _lookup(ids: np.ndarray):
    import pandas as pd

    return pd.Index(ids)


def _first_duplicate(ids: np.ndarray):
    import pandas as pd

    duplicated = pd.Index(ids).duplicated()
    return str(ids[duplicated][0]) if duplicated.any() else None


def _is_iso_time(value: str) -> bool:
    try:
        datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ModelValidationError(f"invalid model artifact: {message}")

