"""The batch job's settings read from the config and checked before Spark starts: the typed ALS
parameters, the metric, holdout and grid choices, so a bad setting fails at once (ConfigError)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from batch_training.candidates import Candidate, candidates_from_config
from batch_training.data import COUNT_MODES
from batch_training.evaluation import SPLIT_METHODS
from batch_training.train import AlsParams, params_grid
from models.business_rules import RulesConfig, load_rules
from models.config import Config, ConfigError
from models.scaling import SCALINGS

log = logging.getLogger("batch_training")

LOWER_IS_BETTER = {"rmse"}
RANKING_METRICS = ("precision", "recall", "map", "ndcg")


@dataclass(frozen=True)
class JobSettings:
    """What every stage of the job reads, checked before Spark starts."""
    cfg: Config
    data_cfg: dict              # the data section
    base: AlsParams             # batch.als
    rules: Any                  # models.business_rules' rules from the attributes file, or None
    k: int                      # batch.k
    exclude: bool               # batch.exclude_purchased
    metric: str                 # batch.selection_metric


def load_settings(cfg: Config) -> JobSettings:
    """The job's settings; ConfigError (or the rules' error) before Spark starts when one is bad."""
    base = check_settings(cfg)      # before Spark starts: a bad setting fails at once
    rules = load_rules(RulesConfig.from_config(cfg))     # so does a bad attributes file
    if rules is not None:
        log.info("business rules: %s", rules.summary())
    return JobSettings(cfg, cfg.get_path("data"), base, rules, k=int(cfg.get_path("batch.k", 10)),
                       exclude=bool(cfg.get_path("batch.exclude_purchased", True)),
                       metric=str(cfg.get_path("batch.selection_metric", "map" if base.implicit_prefs else "rmse")))


def als_params_from_config(cfg: Config) -> AlsParams:
    values = dict(cfg.get_path("batch.als", {}) or {})
    unknown = set(values) - set(AlsParams.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown batch.als setting(s) {sorted(unknown)}: "
                          f"use {sorted(AlsParams.__dataclass_fields__)}")
    params = AlsParams(**values)
    _check_als(params, "batch.als")
    return params


def _check_als(params: AlsParams, where: str) -> None:
    """Types and ranges Spark's ALS would otherwise refuse only when the first fit starts."""
    def whole(value) -> bool:     # as Spark's own check: 8 and 8.0, not 8.5, "8" or true
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()

    problems = [f"{name}={getattr(params, name)!r} (a whole number >= 1)"
                for name in ("rank", "max_iter", "blocks", "min_item_customers")
                if not whole(getattr(params, name)) or getattr(params, name) < 1]
    problems += [f"{name}={getattr(params, name)!r} (a number >= 0)" for name in ("reg_param", "alpha")
                 if not isinstance(getattr(params, name), (int, float)) or isinstance(getattr(params, name), bool)
                 or not getattr(params, name) >= 0]
    if params.scaling not in SCALINGS:
        problems.append(f"scaling={params.scaling!r} (one of {list(SCALINGS)})")
    if not isinstance(params.scaling_k1, (int, float)) or isinstance(params.scaling_k1, bool) \
            or not params.scaling_k1 >= 0:
        problems.append(f"scaling_k1={params.scaling_k1!r} (a number >= 0)")
    if not isinstance(params.scaling_b, (int, float)) or isinstance(params.scaling_b, bool) \
            or not 0 <= params.scaling_b <= 1:
        problems.append(f"scaling_b={params.scaling_b!r} (a number in [0, 1])")
    if not isinstance(params.implicit_prefs, bool):
        problems.append(f"implicit_prefs={params.implicit_prefs!r} (true or false)")
    if not whole(params.seed):
        problems.append(f"seed={params.seed!r} (a whole number)")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def check_settings(cfg: Config) -> AlsParams:
    """The batch settings checked before Spark starts, so a bad one (a typo in a ``--set``) fails
    at once with ConfigError (exit 2) instead of after the stages that precede its use."""
    base = als_params_from_config(cfg)
    try:
        grid = params_grid(base, cfg.get_path("batch.grid", {}) or {})
        configured = cfg.get_path("batch.grid", {}) or {}
        for tier in catalogue_tiers(cfg):
            grid += params_grid(base, {**configured, **_tier_values(configured, tier)})
        candidates_from_config(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    for params in grid:
        _check_als(params, "batch.grid")
    metrics = (*RANKING_METRICS, *sorted(LOWER_IS_BETTER))
    default_metric = "map" if base.implicit_prefs else "rmse"
    choices = {"batch.final_fit": ("refit", "fold_in"), "batch.topk_engine": ("auto", "driver", "spark"),
               "batch.holdout.method": ("auto", *SPLIT_METHODS), "data.count_mode": COUNT_MODES,
               "batch.selection_metric": metrics, "batch.publish.metric": metrics}
    defaults = {"batch.final_fit": "refit", "batch.topk_engine": "auto", "batch.holdout.method": "auto",
                "data.count_mode": "rows", "batch.selection_metric": default_metric,
                "batch.publish.metric": default_metric}
    for key, allowed in choices.items():
        value = cfg.get_path(key, defaults[key])
        if value not in allowed:
            raise ConfigError(f"{key} {value!r}: use one of {list(allowed)}")
    for key in ("batch.selection_metric", "batch.publish.metric"):
        if cfg.get_path(key, default_metric) in LOWER_IS_BETTER and base.implicit_prefs:
            raise ConfigError(f"{key} rmse needs explicit ratings "
                              "(batch.als.implicit_prefs: false, or --mode explicit)")
    for key, least in (("batch.k", 1), ("batch.cv_folds", 0), ("batch.executor_min_customers", 0),
                       ("batch.customers_per_partition", 1), ("batch.holdout.max_evaluated_customers", 1)):
        value = cfg.get_path(key, least)
        if value is None and key == "batch.holdout.max_evaluated_customers":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{key} {value!r}: use a whole number >= {least}")
    race = cfg.get_path("batch.cv_race_tolerance")
    if race is not None and (isinstance(race, bool) or not isinstance(race, (int, float)) or not 0 <= race < 1):
        raise ConfigError(f"batch.cv_race_tolerance {race!r}: use a fraction in [0, 1), e.g. 0.02, or null "
                          "(every ALS candidate on every fold)")
    from streaming.settings import duration_ms

    for key in ("batch.sink_outage_tolerance", "streaming.max_future_skew"):
        duration_ms(cfg.get_path(key), key)         # ConfigError names the key
    if cfg.get_path("batch.write_topic"):
        from models.clients import kafka_options

        kafka_options(cfg)          # the client options, checked before the training, not after it
    return base


def metric_for_gate(cfg: Config, base: AlsParams) -> str:
    return str(cfg.get_path("batch.publish.metric", "map" if base.implicit_prefs else "rmse"))


def split_method(cfg: Config, data_cfg: dict) -> str:
    method = str(cfg.get_path("batch.holdout.method", "auto"))
    if method == "auto":
        return "time" if (data_cfg.get("columns") or {}).get("event_time") else "random"
    return method


def grid_for_catalogue(cfg: Config, n_items: int) -> dict:
    """``batch.grid``, with the values of the first ``batch.catalogue_grids`` entry whose
    ``max_products`` is at least ``n_items`` for the keys both name: a few hundred products need
    few factors (a rank-128 fit over them only overfits at full cost), a few thousand afford more
    than a large catalogue can pay for. A key ``batch.grid`` does not race (``batch.grid: {}``)
    stays the configured ``batch.als`` value."""
    grid = dict(cfg.get_path("batch.grid", {}) or {})
    tier = next((t for t in catalogue_tiers(cfg) if n_items <= t["max_products"]), None)
    if tier is None:
        return grid
    replaced = _tier_values(grid, tier)
    if replaced and n_items:
        log.info("%s products <= %s (batch.catalogue_grids): the CV grid takes %s", f"{n_items:,}",
                 f"{tier['max_products']:,}", replaced)
    return {**grid, **replaced}


def _tier_values(grid: dict, tier: dict) -> dict:
    """The tier's values for the keys ``grid`` races."""
    return {key: values for key, values in tier["grid"].items() if key in grid}


def catalogue_tiers(cfg: Config) -> list[dict]:
    """``batch.catalogue_grids`` checked and sorted by size: ``[{"max_products": int, "grid": dict}]``."""
    entries = cfg.get_path("batch.catalogue_grids", []) or []
    if not isinstance(entries, list):
        raise ConfigError(f"batch.catalogue_grids must be a list of {{max_products, grid}} entries, got {entries!r}")
    tiers = []
    for n, entry in enumerate(entries):
        most = entry.get("max_products") if isinstance(entry, dict) else None
        grid = entry.get("grid") if isinstance(entry, dict) else None
        if isinstance(most, bool) or not isinstance(most, int) or most < 1 or not isinstance(grid, dict):
            raise ConfigError(f"batch.catalogue_grids[{n}] is {entry!r}: give max_products (a whole number "
                              ">= 1) and grid (a mapping of batch.als keys to lists of values)")
        tiers.append({"max_products": most, "grid": grid})
    return sorted(tiers, key=lambda t: t["max_products"])


def scorer_candidates(cfg: Config, metric: str) -> list[Candidate]:
    """The scorers cross-validation chooses among (only ALS in explicit mode; without CV, the first)."""
    if metric in LOWER_IS_BETTER:
        return [Candidate("als")]
    return candidates_from_config(cfg)
