"""The model the streaming job serves, and its hot swap at micro-batch boundaries.

The driver holds one ``ServingModel``. Before each micro-batch runs it checks (at most every
``model_poll_interval``) whether the store's current version changed; a new version is loaded,
verified and checked for serving, and only then replaces the old one. A version that fails is
refused with one clear error line and the old model keeps serving; it is tried again when its files
change or the pointer moves on.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models import scorers
from models.artifact import ModelArtifact, future_cutoff_problem
from models.recency import decay_weights
from streaming.state import iso_to_ms

log = logging.getLogger(__name__)


class ModelNotServable(ValueError):
    """A model that loaded but cannot be served by the streaming job (the message says why)."""


@dataclass
class ServingModel:
    """An artifact plus what the stream needs to turn its purchases into the batch job's counts."""

    artifact: ModelArtifact
    cutoff_ms: int | None
    count_mode: str                      # "rows": each purchase counts 1 | "quantity": its units
    half_life_days: float | None         # recency decay of the counts (None: none)
    recency_reference_ms: int | None

    @property
    def version(self) -> str:
        return self.artifact.version

    def event_weights(self, quantities: np.ndarray, event_times_ms: np.ndarray) -> np.ndarray:
        """What each streamed purchase adds to its (customer, product) count, exactly as the
        batch job counted its training events (units or rows, recency-decayed when it was)."""
        weights = (np.asarray(quantities, dtype=np.float64) if self.count_mode == "quantity"
                   else np.ones(len(quantities), dtype=np.float64))
        if self.half_life_days is not None:
            weights = weights * decay_weights(event_times_ms, self.recency_reference_ms, self.half_life_days)
        return weights

    @classmethod
    def prepare(cls, artifact: ModelArtifact, default_count_mode: str = "rows") -> ServingModel:
        """Check that ``artifact`` can be served, and warm its scorer (gramian, similarities) by
        scoring a few of its customers: a model that cannot score is refused before it serves."""
        params = artifact.params or {}
        if artifact.model_type not in scorers.MODEL_TYPES:
            raise ModelNotServable(f"model {artifact.version} has model_type {artifact.model_type!r}; the "
                                   f"streaming job serves {scorers.MODEL_TYPES}")
        if artifact.model_type in ("als", "blend"):
            if artifact.rank < 1:
                raise ModelNotServable(f"model {artifact.version} ({artifact.model_type}) has no item factors: "
                                       "the streaming job folds customers in from them")
            missing = [name for name in ("reg_param", "alpha") if name not in params]
            if missing:
                raise ModelNotServable(f"model {artifact.version} lacks the ALS parameter(s) {missing} needed "
                                       "for the fold-in; publish it with the training parameters in params")
        count_mode = str(params.get("count_mode") or artifact.stats.get("count_mode") or default_count_mode)
        if count_mode not in ("rows", "quantity"):
            raise ModelNotServable(f"model {artifact.version} has count_mode {count_mode!r}: use rows or quantity")
        try:
            cutoff_ms = iso_to_ms(artifact.cutoff_time)
        except ValueError:
            raise ModelNotServable(f"model {artifact.version} has an unreadable cutoff_time "
                                   f"{artifact.cutoff_time!r}") from None
        # Checked here too, not only by the store: every purchase before the cutoff is taken as
        # already in the model, so serving a future cutoff would silence the stream until then.
        future = future_cutoff_problem(artifact.cutoff_time)
        if future is not None:
            raise ModelNotServable(f"model {artifact.version} is refused: {future}")
        half_life = params.get("recency_half_life_days")
        reference = params.get("recency_reference_ms", cutoff_ms)
        if half_life is not None and reference is None:
            raise ModelNotServable(f"model {artifact.version} decays counts by recency but names no reference "
                                   "time (params.recency_reference_ms or cutoff_time)")
        model = cls(artifact=artifact, cutoff_ms=cutoff_ms, count_mode=count_mode,
                    half_life_days=None if half_life is None else float(half_life),
                    recency_reference_ms=None if reference is None else int(reference))
        model._dry_run()
        return model

    def _dry_run(self, sample: int = 20) -> None:
        """Score up to ``sample`` known customers from their trained counts; the lists must be sound."""
        artifact = self.artifact
        users = np.arange(min(sample, artifact.n_users))
        indptr, indices, counts = artifact.user_items_of(users)
        try:
            item_idx, scores, _ = scorers.recommend_from_counts(artifact, indptr, indices, counts, 10, True)
        except Exception as err:  # noqa: BLE001 - whatever breaks the scorer refuses the model
            raise ModelNotServable(f"model {artifact.version} cannot score its own customers: "
                                   f"{type(err).__name__}: {err}") from err
        if np.any(item_idx >= artifact.n_items) or np.any(np.isnan(scores[item_idx >= 0])):
            raise ModelNotServable(f"model {artifact.version} scores its own customers with invalid items or NaN")


class ModelHolder:
    """The current ServingModel, refreshed from the store at micro-batch boundaries.

    - A version that fails is refused and remembered with a fingerprint of its files; it is tried
      again only when its files change (repaired in place) or the pointer moves on.
    - With nothing served yet and the pointer's version refused (a corrupt model at start-up),
      the newest other *published* version that verifies is served, with an ERROR saying so;
      the pointer's next move is followed as usual.
    """

    def __init__(self, store, poll_ms: int, default_count_mode: str = "rows",
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.poll_ms = poll_ms
        self.default_count_mode = default_count_mode
        self.clock = clock
        self.model: ServingModel | None = None
        self.refused: dict[str, tuple] = {}      # version -> fingerprint of its files when refused
        self.swaps = 0
        self._checked_at: float | None = None
        self._absence = "the store was not read yet"

    def current(self) -> ServingModel | None:
        """The model to score the next micro-batch with (polling the store when due)."""
        due = self._checked_at is None or (self.clock() - self._checked_at) * 1000 >= self.poll_ms
        if due or self.model is None:
            self.poll()
        return self.model

    def describe_absence(self) -> str:
        """Why nothing is served, for the per-batch warning."""
        return self._absence

    def poll(self) -> bool:
        """Look at the store's pointer; load, check and swap in a new version. True on a swap."""
        self._checked_at = self.clock()
        try:
            version = self.store.current_version()
        except Exception as err:  # noqa: BLE001 - a store outage must not stop the stream
            self._absence = f"the model pointer cannot be read: {err}"
            log.error("cannot read the current model pointer from %s (%s); still serving %s",
                      self.store, err, self.model.version if self.model else "no model")
            return False
        if version is None:
            self._report_missing_pointer()
            return False
        if self.model is not None and version == self.model.version:
            return False
        if version in self.refused and self.refused[version] == self._fingerprint(version):
            return False
        if self._swap_to(version):
            return True
        if self.model is None:
            return self._fall_back(refused=version)
        return False

    def _report_missing_pointer(self) -> None:
        try:
            versions = self.store.list_versions()
        except Exception:  # noqa: BLE001 - only the wording of the warning depends on it
            versions = []
        if versions:
            self._absence = (f"the CURRENT pointer of {self.store} is missing although {len(versions)} "
                             f"version(s) exist (newest {versions[-1]}); publish a model again to restore it")
        else:
            self._absence = f"no model published in {self.store} yet; run the batch job to publish one"
        if self.model is not None:
            log.warning("%s; still serving %s", self._absence, self.model.version)
        else:
            log.warning("%s: purchases are kept in the state and scored once a model is served", self._absence)

    def _fall_back(self, refused: str) -> bool:
        """Serve the newest other published version that verifies (nothing is served yet)."""
        for version in reversed(self._published_versions()):
            if version == refused or version in self.refused:
                continue
            if self._swap_to(version):
                log.error("FALLBACK: the current model %s of %s is refused, so the newest published version "
                          "that verifies, %s, is served instead; publish a good model (or repair %s) to "
                          "serve it", refused, self.store, version, refused)
                return True
        self._absence = (f"the current model {refused} is refused and no other published version of "
                         f"{self.store} verifies")
        return False

    def _published_versions(self) -> list[str]:
        try:
            return self.store.published_versions()
        except Exception as err:  # noqa: BLE001 - no fallback then, said by the caller
            log.error("cannot list the published versions of %s: %s", self.store, err)
            return []

    def _fingerprint(self, version: str) -> tuple:
        try:
            return self.store.version_fingerprint(version)
        except Exception:  # noqa: BLE001 - an unreadable version keeps its last fingerprint
            return self.refused.get(version, ())

    def _swap_to(self, version: str) -> bool:
        started = time.perf_counter()
        fingerprint = self._fingerprint(version)
        try:
            candidate = ServingModel.prepare(self.store.load(version), self.default_count_mode)
        except Exception as err:  # noqa: BLE001 - any broken model is refused, never served
            self.refused[version] = fingerprint
            self._absence = f"model {version} is refused: {err}"
            log.error("REFUSED model %s from %s: %s; still serving %s (it is tried again when its files "
                      "change)", version, self.store, err,
                      self.model.version if self.model else "no model (popularity needs a model too)")
            return False
        self.refused.pop(version, None)
        previous = self.model.version if self.model else None
        self.model = candidate
        self.swaps += 1
        log.info("serving model %s (was %s): %d items, %d known customers, rank %d, cutoff %s, loaded in %.1f s",
                 version, previous, candidate.artifact.n_items, candidate.artifact.n_users,
                 candidate.artifact.rank, candidate.artifact.cutoff_time, time.perf_counter() - started)
        return True
