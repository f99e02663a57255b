"""The model registry (python -m tools models) and the store methods under it, on a real store folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.config import REPO_ROOT, load_config
from models.store import ModelStore
from tests.small_models import small_als
from tools import EXIT_BAD_INPUT, EXIT_NOTHING, EXIT_OK
from tools.registry import main

# Names sort by creation time, as models.artifact.new_version() makes them.
A, B, C, D, E = (f"2026010{i}T000000Z-00000{i}" for i in range(1, 6))


POPULARITY_MAP = 0.02      # popularity's MAP@10 on every version's holdout below


def job_metrics(model_map: float, popularity_map: float = POPULARITY_MAP, model_type: str = "als",
                test_rmse: float | None = None) -> dict:
    """Holdout metrics shaped as the batch job records them in a version's metadata (the selected
    model's row as "model", beside each candidate's and popularity's, purchased products excluded
    and included; the selection; the RMSE in explicit mode)."""
    def row(map_value: float) -> dict:
        return {"k": 10, "precision": map_value * 1.5, "recall": map_value * 1.4, "map": map_value,
                "ndcg": map_value * 2, "users": 2, "coverage": 0.05, "novelty": 6.0, "diversity": 0.3}

    metrics: dict = {"k": 10, "exclude_purchased_main": True, "selected": model_type, "split": "time",
                     "cross_validation": None,
                     "selection": {"selected": model_type, "model_type": model_type, "blend_weight": None,
                                   "metric": "rmse" if test_rmse is not None else "map",
                                   "params": {"rank": 3, "reg_param": 0.1, "alpha": 1.0},
                                   "by": "configuration (no cross-validation)"}}
    for table, factor in (("exclude_purchased", 1.0), ("include_purchased", 2.5)):
        model = row(model_map * factor)
        metrics[table] = {"model": model, model_type: model, "popularity": row(popularity_map * factor)}
    if test_rmse is not None:
        metrics["rmse"] = {"train": test_rmse / 2, "test": test_rmse}
    return metrics


def registry_model(version: str, map_value: float, reg_param: float = 0.1, **metrics):
    """A small model whose metadata holds metrics as the batch job writes them (``job_metrics``)."""
    artifact = small_als(version)
    artifact.metrics = job_metrics(map_value, **metrics)
    artifact.params["reg_param"] = reg_param
    artifact.lineage = {"source": {"path": "data/t.csv", "format": "csv", "raw_rows": 10, "clean_rows": 9},
                        "parent_version": None}
    return artifact.validate()


@pytest.fixture
def store(tmp_path, monkeypatch) -> ModelStore:
    """A published; B written only, refused by the gate (MAP@10 below popularity's); C and D
    published (D current); E a newer candidate written with --no-publish that the gate passes."""
    for name in [n for n in os.environ if n.startswith("RECO")]:
        monkeypatch.delenv(name)             # the gate's settings are the defaults (batch.publish)
    store = ModelStore(str(tmp_path / "models"))
    store.publish(registry_model(A, 0.10))
    store.write(registry_model(B, 0.019))
    store.publish(registry_model(C, 0.11))
    store.publish(registry_model(D, 0.12, reg_param=0.5))
    store.write(registry_model(E, 0.13))
    return store


def _corrupt(store: ModelStore, version: str) -> None:
    path = store.backend.root / "versions" / version / "item_factors.npy"
    path.write_bytes(path.read_bytes()[:-8])


def run(store: ModelStore, *argv: str) -> int:
    return main([*argv, "--store", store.uri])


def cli(store: ModelStore, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    return subprocess.run([sys.executable, "-m", "tools", "models", *argv, "--store", store.uri],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


# -- the store ----------------------------------------------------------------------------------
def test_history_and_rollback_target(store):
    assert [e["version"] for e in store.history()] == [D, C, A]
    assert all(e["published_at"] for e in store.history())
    assert store.previous_published(D) == C and store.previous_published(C) == A
    assert store.previous_published(A) is None
    assert store.previous_published(E) == D


def test_lineage_round_trips_and_is_optional(store):
    assert store.load(D).lineage["source"]["raw_rows"] == 10
    old = small_als("20250101T000000Z-000000").validate()
    store.write(old)
    assert store.load(old.version).lineage == {}


@pytest.mark.parametrize("keep, doomed", [(0, [A, B]), (1, [A, B]), (3, [B])])
def test_prune_spares_current_rollback_target_newest_published_and_candidates(store, keep, doomed):
    assert store.prune(keep, dry_run=True) == doomed
    assert store.list_versions() == [A, B, C, D, E], "a dry run deletes nothing"
    assert store.prune(keep, dry_run=False) == doomed
    assert store.list_versions() == [v for v in (A, B, C, D, E) if v not in doomed]
    assert not any((store.backend.root / "versions" / v).exists() for v in doomed)
    assert store.current_version() == D and store.load().version == D
    assert store.load(E).version == E and store.load(C).version == C


def test_prune_refuses_a_negative_keep_and_does_nothing_before_a_publish(store, tmp_path):
    with pytest.raises(ValueError, match="keep"):
        store.prune(-1)
    empty = ModelStore(str(tmp_path / "empty"))
    empty.write(registry_model(A, 0.1))
    assert empty.prune(0, dry_run=False) == [] and empty.list_versions() == [A]


# -- the commands -------------------------------------------------------------------------------
def test_list_on_the_command_line(store):
    done = cli(store, "list", "--json")
    assert done.returncode == EXIT_OK, done.stderr
    rows = {r["version"]: r for r in json.loads(done.stdout)}
    assert list(rows) == [A, B, C, D, E]
    assert rows[D]["current"] and not rows[C]["current"]
    assert rows[B]["published_at"] is None and rows[A]["published_at"]
    assert (rows[D]["key_metric"], rows[D]["key_metric_value"]) == ("map@10", 0.12)
    text = cli(store, "list")
    assert text.returncode == EXIT_OK
    line = next(row for row in text.stdout.splitlines() if D in row)
    assert line.startswith("*") and "map@10 0.1200" in line and "als" in line


def test_list_of_an_empty_store_finds_nothing(tmp_path, capsys):
    assert main(["list", "--store", str(tmp_path / "none")]) == EXIT_NOTHING
    assert "no model versions" in capsys.readouterr().err


def test_show(store, capsys):
    assert run(store, "show", C) == EXIT_OK
    out = capsys.readouterr().out
    assert "source.path" in out and "data/t.csv" in out and "map@10" in out and "0.1100" in out
    assert run(store, "show", D, "--json") == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["current"] and shown["lineage"]["source"]["clean_rows"] == 9 and "files" not in shown
    assert run(store, "show", "no-such") == EXIT_NOTHING


def test_compare(store, capsys):
    assert run(store, "compare", C, D) == EXIT_OK
    out = capsys.readouterr().out
    map_line = next(row for row in out.splitlines() if row.startswith("map@10"))
    assert "0.1100" in map_line and "0.1200" in map_line and "+9.1%" in map_line
    reg_line = next(row for row in out.splitlines() if row.startswith("reg_param"))
    assert reg_line.split() == ["reg_param", "0.1", "0.5"]
    assert "rank" not in out, "only the params that differ"


def test_promote_a_candidate_the_gate_passes(store, capsys):
    """E was written with --no-publish; the gate passes it (it beats popularity and the current D)."""
    assert run(store, "promote", E) == EXIT_OK
    captured = capsys.readouterr()
    assert f"promoted {E}" in captured.out and "the publish gate passes it" in captured.out
    assert "0.1300" in captured.out and "current model had 0.1200" in captured.out
    assert "WARNING" not in captured.err
    assert store.current_version() == E and E in store.published_versions()
    assert run(store, "promote", E) == EXIT_OK and "already current" in capsys.readouterr().out


def test_promote_of_a_version_the_gate_refused_needs_force(store, capsys):
    assert run(store, "promote", B) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"the publish gate refuses {B}" in err
    assert "0.0190 does not beat popularity 0.0200" in err and "min_lift_over_popularity" in err
    assert f"the current model stays {D}" in err and f"promote {B} --force" in err
    assert store.current_version() == D and B not in store.published_versions()

    assert run(store, "promote", B, "--force") == EXIT_OK
    captured = capsys.readouterr()
    warning = next(line for line in captured.err.splitlines() if line.startswith("WARNING"))
    assert "--force" in warning and B in warning and "does not beat popularity" in warning
    assert f"promoted {B}" in captured.out and "FORCED" in captured.out
    assert store.current_version() == B and B in store.published_versions()


def test_refused_promote_on_the_command_line(store):
    done = cli(store, "promote", B)
    assert done.returncode == EXIT_BAD_INPUT and "does not beat popularity" in done.stderr
    assert "--force" in done.stderr and store.current_version() == D
    forced = cli(store, "promote", B, "--force")
    assert forced.returncode == EXIT_OK, forced.stderr
    assert "WARNING: --force" in forced.stderr and store.current_version() == B


def test_the_gate_compares_with_the_current_model_and_reads_its_settings_from_the_config(store, capsys,
                                                                                     monkeypatch):
    """A beats popularity but is more than 10% below the current D (0.10 < 0.9 x 0.12); C is within."""
    assert run(store, "promote", A) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "more than 10% below the current model's 0.1200" in err and "max_drop_vs_current" in err
    assert store.current_version() == D
    assert run(store, "promote", C) == EXIT_OK and store.current_version() == C
    monkeypatch.setenv("RECO__BATCH__PUBLISH__MAX_DROP_VS_CURRENT", "0.5")
    assert run(store, "promote", A) == EXIT_OK and store.current_version() == A


def test_force_never_promotes_a_version_that_does_not_verify(store, capsys):
    _corrupt(store, E)
    assert run(store, "promote", E) == EXIT_BAD_INPUT
    assert "corrupted" in capsys.readouterr().err
    _corrupt(store, B)
    assert run(store, "promote", B, "--force") == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "corrupted" in captured.err and "WARNING" not in captured.err
    assert store.current_version() == D and not {B, E} & set(store.published_versions())
    assert run(store, "promote", "no-such") == EXIT_NOTHING
    assert run(store, "promote", "no-such", "--force") == EXIT_NOTHING
    assert store.current_version() == D


def test_an_explicit_model_is_gated_by_its_rmse(store, capsys):
    """An explicit-ratings version (--mode explicit) is judged on its test RMSE, as the job judges
    it, whatever the configured ranking metric: the current D recorded no RMSE to compare with."""
    explicit = "20260106T000000Z-000006"
    artifact = registry_model(explicit, 0.001, test_rmse=1.2)      # far below popularity on MAP: no matter
    artifact.params["implicit_prefs"] = False
    store.write(artifact)
    assert run(store, "promote", explicit) == EXIT_OK
    assert "test rmse 1.2000" in capsys.readouterr().out and store.current_version() == explicit
    worse = "20260107T000000Z-000007"
    artifact = registry_model(worse, 0.2, test_rmse=1.5)             # 25% above the current 1.2
    artifact.params["implicit_prefs"] = False
    store.write(artifact)
    assert run(store, "promote", worse) == EXIT_BAD_INPUT
    assert "max_rmse_rise_vs_current" in capsys.readouterr().err and store.current_version() == explicit


def test_a_version_without_the_gates_metrics_is_refused_unless_forced(store, capsys):
    old = small_als("20260108T000000Z-000008")
    old.metrics = {"map": 0.5}                   # not what the batch job records: nothing to gate
    store.write(old.validate())
    assert run(store, "promote", old.version) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cannot judge" in err and "'exclude_purchased'" in err and "--force" in err
    assert run(store, "promote", old.version, "--force") == EXIT_OK
    assert "cannot judge" in capsys.readouterr().err and store.current_version() == old.version


def test_promote_a_popularity_model_the_job_selected(store, capsys):
    """The popularity model (chosen when nothing beats popularity) is not held to the lift."""
    version = "20260109T000000Z-000009"
    store.write(registry_model(version, 0.115, popularity_map=0.115, model_type="popularity"))
    assert run(store, "promote", version) == EXIT_OK
    assert "popularity model" in capsys.readouterr().out and store.current_version() == version


def test_rollback_on_the_command_line(store):
    done = cli(store, "rollback")
    assert done.returncode == EXIT_OK, done.stderr
    assert f"rolled back to {C}" in done.stdout and store.current_version() == C
    assert cli(store, "rollback").returncode == EXIT_OK and store.current_version() == A
    last = cli(store, "rollback")
    assert last.returncode == EXIT_NOTHING and "nothing to roll back" in last.stderr
    assert store.current_version() == A


def test_rollback_skips_a_version_that_does_not_verify(store, capsys):
    _corrupt(store, C)
    assert run(store, "rollback") == EXIT_OK
    captured = capsys.readouterr()
    assert f"skipped {C}" in captured.err and f"rolled back to {A}" in captured.out
    assert store.current_version() == A


def test_prune_is_a_dry_run_without_yes(store, capsys):
    assert run(store, "prune", "--keep", "0") == EXIT_OK
    assert "would delete 2 versions" in capsys.readouterr().out and store.list_versions() == [A, B, C, D, E]
    assert run(store, "prune", "--keep", "0", "--yes") == EXIT_OK
    assert store.list_versions() == [C, D, E]
    assert run(store, "prune", "--keep", "0", "--yes") == EXIT_OK
    assert "nothing to prune" in capsys.readouterr().out
    assert run(store, "prune", "--keep", "-1") == EXIT_BAD_INPUT


# -- the batch job's lineage ----------------------------------------------------------------------
def test_lineage_builder(store):
    from batch_training.publish import build_lineage

    cfg = load_config(files=[], env={}).with_overrides({"model_store.uri": store.uri,
                                                        "data.path": "/data/in.parquet", "data.format": "parquet"})
    lineage = build_lineage(cfg, {"raw_rows": 100, "clean_rows": 97, "pairs": 50}, {"rank": 8})
    assert lineage["source"] == {"kind": "files", "path": "/data/in.parquet", "format": "parquet",
                                 "raw_rows": 100, "clean_rows": 97}
    assert lineage["parent_version"] == D and lineage["params"] == {"rank": 8}
    assert lineage["code"]["git_commit"] or lineage["code"]["package_version"]
    assert lineage["trained_at"].endswith("Z") and len(lineage["config_sha256"]) == 64
    again = build_lineage(cfg, {}, {})["config_sha256"]
    changed = build_lineage(cfg.with_overrides({"batch.k": 20}), {}, {})["config_sha256"]
    assert again == lineage["config_sha256"] != changed
    json.dumps(lineage)
