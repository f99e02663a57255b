"""The publish gate and the publish itself: a model is written to the store and made current only
when its holdout metrics pass the gate; its lineage; the top-level files replaced atomically."""
from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from batch_training.data import DataSourceError
from batch_training.datasets import source_placeholders
from batch_training.job_settings import LOWER_IS_BETTER
from batch_training.outputs import jsonable
from models.config import Config

log = logging.getLogger("batch_training")


class PublishRefused(RuntimeError):
    """The publish gate kept the current model; the message says why."""


def publish(cfg: Config, artifact, metrics: dict, metric: str, exclude: bool,
            user_parts: list[dict] | None = None) -> tuple[bool, str]:
    """The publish gate: beat popularity by a margin and do not fall behind the current model.
    ``user_parts``: the user side's parts the executors wrote (per_customer.py), or None."""
    from models.store import ModelStore

    store = ModelStore.from_config(cfg)
    store.write(artifact, user_parts=user_parts)
    ok, reason = gate_decision(cfg, metrics, metric, exclude, _current_metrics(store))
    if not cfg.get_path("batch.publish.enabled", True):
        # The verdict anyway: whoever promotes this version later wants to know what the gate says.
        reason = (f"publishing disabled (batch.publish.enabled=false); version {artifact.version} written, not "
                  f"current; the gate {'would publish' if ok else 'would REFUSE'} it: {reason}")
        log.info("%s", reason)
        return False, reason
    if ok:
        store.set_current(artifact.version)
        log.info("published model %s as current: %s", artifact.version, reason)
    else:
        log.error("model %s NOT published, the current model stays: %s", artifact.version, reason)
    return ok, reason


def gate_decision(cfg: Config, metrics: dict, metric: str, exclude: bool,
                  current: dict | None) -> tuple[bool, str]:
    """Decide from the holdout metrics; ``current`` is the current model's recorded metrics."""
    table_key = "exclude_purchased" if exclude else "include_purchased"
    lift = float(cfg.get_path("batch.publish.min_lift_over_popularity", 0.1))
    tolerance = float(cfg.get_path("batch.publish.max_drop_vs_current", 0.1))
    if metric in LOWER_IS_BETTER:
        return _gate_rmse(cfg, metrics, metric, current)
    model = metrics[table_key]["model"][metric]
    baseline = metrics[table_key]["popularity"][metric]
    if metrics.get("selection", {}).get("model_type") == "popularity":
        return _gate_popularity(metrics, metric, table_key, tolerance, current)
    if not model >= baseline * (1 + lift) or not np.isfinite(model):
        return False, (f"{metric}@{metrics['k']} {model:.4f} does not beat popularity {baseline:.4f} by the "
                       f"required {lift:.0%} (batch.publish.min_lift_over_popularity)")
    reason = f"{metric}@{metrics['k']} {model:.4f} vs popularity {baseline:.4f} ({model / baseline:.1f}x)" \
        if baseline > 0 else f"{metric}@{metrics['k']} {model:.4f} vs popularity 0"
    previous = ((current or {}).get(table_key) or {}).get("model", {}).get(metric)
    if previous is not None and model < previous * (1 - tolerance):
        return False, (f"{metric}@{metrics['k']} {model:.4f} is more than {tolerance:.0%} below the current "
                       f"model's {previous:.4f} (batch.publish.max_drop_vs_current)")
    if previous is not None:
        reason += f"; current model had {previous:.4f}"
    return True, reason


def _gate_rmse(cfg: Config, metrics: dict, metric: str, current: dict | None) -> tuple[bool, str]:
    """Explicit mode: no popularity model predicts counts, so the holdout RMSE is compared with the
    current model's only. Refused when it was not measured or is not a number, or when it is more
    than ``batch.publish.max_rmse_rise_vs_current`` (relative) above the test RMSE the current
    model recorded; published when the current model recorded none (an implicit model, or none)."""
    rise = float(cfg.get_path("batch.publish.max_rmse_rise_vs_current", 0.1))
    value = (metrics.get("rmse") or {}).get("test")
    if value is None:
        return False, f"the gate metric {metric} was not measured (explicit mode only)"
    if not np.isfinite(value):
        return False, f"test {metric} {value} is not a number"
    reason = f"test {metric} {value:.4f} (explicit mode has no popularity comparison)"
    previous = ((current or {}).get("rmse") or {}).get("test")
    if previous is None:
        return True, reason + ("; the current model recorded no RMSE to compare with" if current is not None
                               else "; no current model")
    if value > previous * (1 + rise):
        return False, (f"test {metric} {value:.4f} is more than {rise:.0%} above the current model's "
                       f"{previous:.4f} (batch.publish.max_rmse_rise_vs_current)")
    return True, reason + f"; current model had {previous:.4f}"


def _gate_popularity(metrics: dict, metric: str, table_key: str, tolerance: float,
                     current: dict | None) -> tuple[bool, str]:
    """The popularity model is published when no trained candidate beat it, unless it would fall
    too far below the current model."""
    model = metrics[table_key]["model"][metric]
    reason = (f"popularity model: no trained candidate beats popularity by the required margin "
              f"(it does not beat popularity); {metric}@{metrics['k']} {model:.4f}")
    if not np.isfinite(model):
        return False, reason + " is not a number"
    previous = ((current or {}).get(table_key) or {}).get("model", {}).get(metric)
    if previous is not None and model < previous * (1 - tolerance):
        return False, (f"{reason} is more than {tolerance:.0%} below the current model's {previous:.4f} "
                       "(batch.publish.max_drop_vs_current)")
    return True, reason + (f"; current model had {previous:.4f}" if previous is not None else "")


def _current_metrics(store) -> dict | None:
    from models.store import ModelLoadError

    if store.current_version() is None:
        return None
    try:
        return store.load_metadata(store.current_version()).get("metrics")
    except ModelLoadError as err:
        log.warning("the current model cannot be read (%s): the gate compares with popularity only", err)
        return None


def build_lineage(cfg: Config, stats: dict, params: dict) -> dict:
    """Where a model comes from, for its metadata: the data source and its row counts, the hash of
    the effective config (secrets redacted), the training parameters, the code version, the time,
    and the version that was current when it was trained (``parent_version``)."""
    import hashlib
    import subprocess
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from batch_training.datasets import resolve_path
    from models.artifact import utc_now_iso
    from models.config import REPO_ROOT, redacted
    from models.store import ModelStore, ModelStoreError

    data_cfg = cfg.get_path("data")
    try:
        path = resolve_path(str(data_cfg["path"]), source_placeholders(cfg)) if data_cfg.get("path") else None
    except (DataSourceError, ValueError, KeyError):
        path = str(data_cfg.get("path"))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        installed = package_version("reco")
    except PackageNotFoundError:
        installed = None
    try:
        parent = ModelStore.from_config(cfg).current_version()
    except ModelStoreError as err:
        log.warning("lineage: the current model version cannot be read (%s)", err)
        parent = None
    config_json = json.dumps(jsonable(redacted(dict(cfg))), sort_keys=True, default=str)
    return {"source": {"kind": data_cfg.get("kind") or "files", "path": path, "format": data_cfg.get("format"),
                       **_source_files(path),
                       "raw_rows": jsonable(stats.get("raw_rows")), "clean_rows": jsonable(stats.get("clean_rows"))},
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "params": jsonable(params),
            "code": {"git_commit": commit, "package_version": installed},
            "trained_at": utc_now_iso(), "parent_version": parent}


def _source_files(path: str | None) -> dict:
    """Size and newest modification time of a local source (a file, or every file of a folder), so
    lineage tells whether the data changed since; {} for URIs (s3a://...) and missing paths."""
    if not path or "://" in str(path) or not Path(path).exists():
        return {}
    root = Path(path)
    files = [root] if root.is_file() else \
        [f for f in root.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))]
    if not files:
        return {}
    stats = [f.stat() for f in files]
    newest = datetime.fromtimestamp(max(st.st_mtime for st in stats), UTC)
    return {"files": len(files), "bytes": sum(st.st_size for st in stats),
            "modified": newest.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}


def publish_files(run_dir: Path, output_dir: Path) -> None:
    """The run's files (those it wrote) copied over the top-level ones, which are the published model's."""
    for name in ("recommendations.csv", "recommendations.parquet", "run_summary.json", "report.html"):
        if (run_dir / name).exists():        # the report is best-effort: never fails the run
            _replace_published(run_dir / name, output_dir / name)


def _replace_published(source: Path, target: Path) -> None:
    """Copy a file or a folder of part files over the published one: a file in one rename; a folder
    in two (the old one moved aside first), so a reader sees the old or the new, or briefly none."""
    staging, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    for leftover in (staging, old):
        _remove(leftover)
    if source.is_dir():
        shutil.copytree(source, staging)
    else:
        shutil.copyfile(source, staging)
    if target.is_dir():
        os.replace(target, old)
    os.replace(staging, target)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
