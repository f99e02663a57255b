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


def _model(version: str, map_value: float, reg_param: float = 0.1):
    artifact = small_als(version)
    artifact.metrics = {"k": 10, "selection": {"metric": "map"},
                        "exclude_purchased": {"model": {"map": map_value, "ndcg": map_value * 2, "users": 2}}}
    artifact.params["reg_param"] = reg_param
    artifact.lineage = {"source": {"path": "data/t.csv", "format": "csv", "raw_rows": 10, "clean_rows": 9},
                        "parent_version": None}
    return artifact.validate()


@pytest.fixture
def store(tmp_path) -> ModelStore:
    """A published, B written only, C and D published (D current), E a newer candidate."""
    store = ModelStore(str(tmp_path / "models"))
    store.publish(_model(A, 0.10))
    store.write(_model(B, 0.05))
    store.publish(_model(C, 0.11))
    store.publish(_model(D, 0.12, reg_param=0.5))
    store.write(_model(E, 0.13))
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
    empty.write(_model(A, 0.1))
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
    line = next(l for l in text.stdout.splitlines() if D in l)
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
    map_line = next(l for l in out.splitlines() if l.startswith("map@10"))
    assert "0.1100" in map_line and "0.1200" in map_line and "+9.1%" in map_line
    reg_line = next(l for l in out.splitlines() if l.startswith("reg_param"))
    assert reg_line.split() == ["reg_param", "0.1", "0.5"]
    assert "rank" not in out, "only the params that differ"


def test_promote_a_candidate_and_refuse_a_corrupt_one(store, capsys):
    _corrupt(store, E)
    assert run(store, "promote", E) == EXIT_BAD_INPUT
    assert "corrupted" in capsys.readouterr().err
    assert store.current_version() == D and E not in store.published_versions()
    assert run(store, "promote", B) == EXIT_OK          # written with publishing off, promoted later
    assert store.current_version() == B and B in store.published_versions()
    assert run(store, "promote", "no-such") == EXIT_NOTHING
    assert store.current_version() == B


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
    from batch_training.job import build_lineage

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
