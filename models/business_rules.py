"""Business rules: products that must never be listed, and a margin boost, the same in both jobs.

An optional product attributes file (CSV or Parquet, columns ``product_id``, ``margin``,
``in_stock``, ``category``; ``business_rules.attributes``) drives two rules:

* exclude: a product that is out of stock (``exclude.out_of_stock``) or in one of
  ``exclude.categories`` never appears in any list (discover lists of every model type, the
  popularity and segment fallbacks, the buy-again list); lists are still filled to k from the
  allowed products when there are enough;
* boost: every score is multiplied by a function of the product's margin (``boost.function``,
  ``s`` = ``boost.strength``): ``none`` 1, ``linear`` ``1 + s * margin``, ``log``
  ``1 + s * log1p(margin)``. A negative or missing margin counts as 0 (multiplier 1): the boost
  only lifts, it never turns a score's sign. Products absent from the file are allowed, with
  multiplier 1.

The rules are applied by ``models.scorers`` (a per-product multiplier folded into the item side,
like the popularity penalty, and a banned mask every top-k honours), so the batch job's lists and
the stream's agree. Both jobs read the file on the driver and ship the parsed rules to their
tasks; the stream re-reads a changed file between micro-batches (``RulesHolder``). Model quality
is evaluated without them: they are a serving decision, not part of the model.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.config import Config, ConfigError, resolve_path

log = logging.getLogger(__name__)

BOOST_FUNCTIONS = ("none", "linear", "log")
COLUMNS = ("product_id", "margin", "in_stock", "category")
_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0"}


class AttributesError(ConfigError):
    """A product attributes file that cannot be used (the message names the file and the fix)."""


@dataclass(frozen=True)
class RulesConfig:
    """The ``business_rules`` config section, checked."""

    attributes: str | None
    out_of_stock: bool
    categories: tuple[str, ...]
    boost: str
    strength: float

    @classmethod
    def from_config(cls, cfg: Config) -> RulesConfig:
        path = cfg.get_path("business_rules.attributes")
        function = str(cfg.get_path("business_rules.boost.function"))
        if function not in BOOST_FUNCTIONS:
            raise ConfigError(f"business_rules.boost.function {function!r}: use one of {list(BOOST_FUNCTIONS)}")
        strength = cfg.get_path("business_rules.boost.strength")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
            raise ConfigError(f"business_rules.boost.strength {strength!r}: use a number >= 0")
        categories = cfg.get_path("business_rules.exclude.categories") or []
        if isinstance(categories, str) or not isinstance(categories, (list, tuple)):
            raise ConfigError(f"business_rules.exclude.categories {categories!r}: use a list of category names")
        return cls(attributes=None if path in (None, "") else str(resolve_path(str(path))),
                   out_of_stock=bool(cfg.get_path("business_rules.exclude.out_of_stock")),
                   categories=tuple(sorted(str(c) for c in categories)), boost=function, strength=float(strength))

    def as_dict(self) -> dict:
        return {"attributes": self.attributes, "exclude": {"out_of_stock": self.out_of_stock,
                                                           "categories": list(self.categories)},
                "boost": {"function": self.boost, "strength": self.strength}}


@dataclass(frozen=True)
class ItemRules:
    """The rules over one model's item index: None where a rule changes nothing."""

    key: tuple
    banned: np.ndarray | None          # bool [n_items]
    multiplier: np.ndarray | None      # float64 [n_items], > 0


@dataclass(frozen=True, eq=False)
class BusinessRules:
    """Parsed rules: per listed product whether it is banned and its score multiplier."""

    config: RulesConfig
    product_ids: np.ndarray            # str
    banned: np.ndarray                 # bool
    multiplier: np.ndarray             # float64
    sha256: str
    source: dict = field(default_factory=dict)   # path, size, mtime_ns

    @property
    def key(self) -> tuple:
        """What the lists depend on: the file's content and the rules' settings."""
        return (self.sha256, self.config.out_of_stock, self.config.categories, self.config.boost,
                self.config.strength)

    def summary(self) -> dict:
        """For the run summary and the model's params: which file and rules were applied."""
        return {**self.config.as_dict(), "sha256": self.sha256, "products": int(len(self.product_ids)),
                "banned": int(self.banned.sum()), "boosted": int((self.multiplier != 1.0).sum())}

    def for_items(self, item_index: Callable[[np.ndarray], np.ndarray], n_items: int) -> ItemRules:
        """The rules aligned to a model's items (``item_index``: product ids -> index, -1 unknown)."""
        index = np.asarray(item_index(self.product_ids), dtype=np.int64) if len(self.product_ids) else \
            np.zeros(0, dtype=np.int64)
        known = index >= 0
        banned = np.zeros(n_items, dtype=bool)
        banned[index[known]] = self.banned[known]
        multiplier = np.ones(n_items)
        multiplier[index[known]] = self.multiplier[known]
        return ItemRules(self.key, banned if banned.any() else None,
                         multiplier if (multiplier != 1.0).any() else None)


RULED = "ruled"       # first element of the scorer cache keys that depend on the rules in force


def aligned(rules: BusinessRules, cache: dict, item_index: Callable[[np.ndarray], np.ndarray],
            n_items: int) -> ItemRules:
    """``rules`` over a model's items, kept in the model's scorer ``cache``; new rules drop what the
    old ones cached there (one set of rules is in force at a time, so the cache stays bounded)."""
    held: ItemRules | None = cache.get(RULED)
    if held is None or held.key != rules.key:
        for key in [key for key in cache if isinstance(key, tuple) and key[0] == RULED]:
            del cache[key]
        held = cache[RULED] = rules.for_items(item_index, n_items)
    return held


def banned_of(item_rules: ItemRules | None) -> np.ndarray | None:
    """The banned mask to hand a top-k (None: nothing banned)."""
    return None if item_rules is None else item_rules.banned


def boost_of(item_rules: ItemRules | None) -> np.ndarray | None:
    """The per-item boost (None: no boost)."""
    return None if item_rules is None else item_rules.multiplier


def boosted(popularity: np.ndarray, item_rules: ItemRules | None) -> np.ndarray:
    """The popularity a fallback ranks by: times the boost when there is one."""
    boost = boost_of(item_rules)
    return popularity if boost is None else np.asarray(popularity, dtype=np.float64) * boost


def boost_multipliers(margin: np.ndarray, function: str, strength: float) -> np.ndarray:
    """The score multiplier of each margin (float64, >= 1; negative or NaN margins count as 0)."""
    margin = np.nan_to_num(np.asarray(margin, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    if function == "none" or strength == 0:
        return np.ones(len(margin))
    if function == "linear":
        return 1.0 + strength * margin
    if function == "log":
        return 1.0 + strength * np.log1p(margin)
    raise ConfigError(f"business_rules.boost.function {function!r}: use one of {list(BOOST_FUNCTIONS)}")


def read_attributes(path: str | Path, content: bytes | None = None) -> pd.DataFrame:
    """The attributes file as a frame (product_id str, margin float, in_stock bool, category str or
    None), checked: AttributesError names the file, the column or row, and what to do."""
    path = Path(path)
    if content is None:
        try:
            content = path.read_bytes()
        except OSError as err:
            raise AttributesError(f"business_rules.attributes: cannot read {path}: {err.strerror or err}; "
                                  "point it at a CSV or Parquet file, or set it to null for no rules") from None
    frame = _parse(path, content)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise AttributesError(f"{path}: missing column(s) {missing}; the attributes file needs the columns "
                              f"{list(COLUMNS)} (found {list(frame.columns)})")
    ids = frame["product_id"]
    if ids.isna().any():
        raise AttributesError(f"{path}: row {_row(ids.isna())} has no product_id; every row needs one")
    ids = ids.astype(str).str.strip()
    if ids.duplicated().any():
        raise AttributesError(f"{path}: product_id {ids[ids.duplicated()].iloc[0]!r} is listed twice "
                              f"(row {_row(ids.duplicated())}); list each product once")
    margin = pd.to_numeric(frame["margin"], errors="coerce")
    bad = margin.isna() & frame["margin"].notna() & (frame["margin"].astype(str).str.strip() != "")
    if bad.any():
        raise AttributesError(f"{path}: column margin, row {_row(bad)}: {frame['margin'][bad].iloc[0]!r} is not a "
                              "number; write a number (or leave it empty: no boost)")
    category = frame["category"].where(frame["category"].notna(), None)
    return pd.DataFrame({"product_id": ids.to_numpy(), "margin": margin.to_numpy(np.float64),
                         "in_stock": _booleans(path, frame["in_stock"]),
                         "category": [None if c is None else str(c) for c in category]})


def build_rules(config: RulesConfig, frame: pd.DataFrame, sha256: str, source: dict | None = None) -> BusinessRules:
    """The rules of ``config`` over a checked attributes frame (``read_attributes``)."""
    banned = frame["category"].isin(config.categories).to_numpy(bool)
    if config.out_of_stock:
        banned |= ~frame["in_stock"].to_numpy(bool)
    return BusinessRules(config, frame["product_id"].to_numpy(str), banned,
                         boost_multipliers(frame["margin"].to_numpy(), config.boost, config.strength),
                         sha256, source or {})


def load_rules(config: RulesConfig, content: bytes | None = None) -> BusinessRules | None:
    """The configured rules (None when no attributes file is configured); AttributesError if the
    file cannot be used."""
    if config.attributes is None:
        return None
    path = Path(config.attributes)
    try:
        stat = path.stat()
        content = path.read_bytes() if content is None else content
    except OSError as err:
        raise AttributesError(f"business_rules.attributes: cannot read {path}: {err.strerror or err}; point "
                              "it at a CSV or Parquet file, or set it to null for no rules") from None
    frame = read_attributes(path, content)
    return build_rules(config, frame, hashlib.sha256(content).hexdigest(),
                       {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


class RulesHolder:
    """The stream's current rules, re-read when the file changes (size, modification time, then the
    checksum), checked at most once per micro-batch by the driver. A file that cannot be used is
    logged and the rules in force stay; at start-up it is an error."""

    def __init__(self, config: RulesConfig):
        self.config = config
        self.rules = load_rules(config)
        self.reloads = 0
        self._seen = _stat(config.attributes) if config.attributes else None
        if self.rules is not None:
            log.info("business rules: %s", self.rules.summary())

    def current(self) -> BusinessRules | None:
        """The rules for the next micro-batch (re-read first when the file changed)."""
        if self.config.attributes is None:
            return None
        seen = _stat(self.config.attributes)
        if seen == self._seen:
            return self.rules
        self._seen = seen
        try:
            content = Path(self.config.attributes).read_bytes()
            if self.rules is not None and hashlib.sha256(content).hexdigest() == self.rules.sha256:
                return self.rules              # touched, not changed
            rules = load_rules(self.config, content)
        except (AttributesError, OSError) as err:
            log.error("business rules: the changed attributes file cannot be used (%s); the previous rules "
                      "(%s) stay in force until it is fixed", err, self.rules.sha256[:12] if self.rules else "none")
            return self.rules
        self.rules, self.reloads = rules, self.reloads + 1
        log.info("business rules reloaded from %s: %s", self.config.attributes, rules.summary())
        return rules


def _stat(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _parse(path: Path, content: bytes) -> pd.DataFrame:
    import io

    parquet = content[:4] == b"PAR1" or path.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            return pd.read_parquet(io.BytesIO(content))
        return pd.read_csv(io.BytesIO(content), dtype={"product_id": str, "category": str},
                           keep_default_na=False, na_values=[""])
    except Exception as err:  # noqa: BLE001 - any parser failure is the file's problem
        raise AttributesError(f"{path}: cannot be read as {'Parquet' if parquet else 'CSV'} "
                              f"({type(err).__name__}: {err}); write a CSV with a header row or a Parquet file "
                              f"with the columns {list(COLUMNS)}") from None


def _booleans(path: Path, column: pd.Series) -> np.ndarray:
    if column.dtype == bool:
        return column.to_numpy(bool)
    text = column.astype(str).str.strip().str.lower()
    bad = ~text.isin(_TRUE | _FALSE) | column.isna()
    if bad.any():
        raise AttributesError(f"{path}: column in_stock, row {_row(bad)}: {column[bad].iloc[0]!r} is not a boolean; "
                              "write true/false (or yes/no, 1/0)")
    return text.isin(_TRUE).to_numpy()


def _row(mask: pd.Series) -> int:
    """The 1-based data row (header excluded) of the first True in ``mask``."""
    return int(np.flatnonzero(np.asarray(mask))[0]) + 1
