"""The batch command line's exit codes, which schedulers alert on, each end to end in a subprocess:
0 published, 2 bad configuration or input, 3 the publish gate kept the current model.

Each run gets its own run folder, model store and output folder through RECO__* variables (the
README's configuration), tiny generated data and --no-cv with a small ALS, so a run that gets as
far as publishing takes well under a minute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_training.generate import write
from models.config import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SMALL = ["--no-cv", "--set", "batch.als.rank=8", "--set", "batch.als.max_iter=4"]
GATE_REFUSED = "exit 3: the publish gate kept the current model"


@pytest.fixture(scope="module")
def transactions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-data")
    write(folder, factor=0.02, seed=3, fmt="csv")      # ~13k rows, 140 customers
    return folder / "transactions.csv"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The caller's environment without any RECO setting, pointed at this test's folders."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    return {**clean, "RECO__RUN_DIR": str(tmp_path / "run"), "RECO__MODEL_STORE__URI": str(tmp_path / "models"),
            "RECO__BATCH__OUTPUT_DIR": str(tmp_path / "out"), "RECO__SPARK__DRIVER_MEMORY": "1g",
            "RECO__SPARK__SHUFFLE_PARTITIONS": "2"}


def batch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_training", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def current_version(models: Path) -> str | None:
    pointer = models / "CURRENT"
    return json.loads(pointer.read_text())["version"] if pointer.exists() else None


def versions(models: Path) -> list[str]:
    folder = models / "versions"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_exit_0_publishes_and_exit_3_keeps_the_current_model(env, tmp_path, transactions):
    models = tmp_path / "models"
    first = batch(env, "--input", str(transactions), *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    published = current_version(models)
    assert published is not None and versions(models) == [published]
    assert f"published model {published} as current" in first.stderr
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["version"] == published and summary["published"] is True

    # A deliberately useless ALS (rank 2, one iteration, huge regularisation) as the only candidate:
    # it cannot beat popularity, so the gate refuses it and the first model stays current.
    bad = batch(env, "--input", str(transactions), "--no-cv", "--set", "batch.scorers.candidates=[als]",
                "--set", "batch.als.rank=2", "--set", "batch.als.max_iter=1", "--set", "batch.als.reg_param=1000000.0")
    assert bad.returncode == 3, bad.stderr[-3000:]
    assert GATE_REFUSED in bad.stderr and "does not beat popularity" in bad.stderr
    assert current_version(models) == published
    refused = [v for v in versions(models) if v != published]
    assert len(refused) == 1, "the refused model is written for inspection, not made current"
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["version"] == published


@pytest.mark.parametrize("args, message", [
    (["--set", "batch.als.rank"], "must look like key.path=value"),
    (["--set", "batch.als.rank=[8"], "is not valid YAML"),
    (["--set", "batch.cv_fold=0"], "there is no setting 'batch.cv_fold'"),       # misspelt: was ignored
    (["--set", "batch.als.rank=eight"], "rank='eight'"),
    (["--set", "batch.grid.scaling=[none,bm52]"], "scaling='bm52' (one of ['none', 'log', 'bm25'])"),
    (["--set", "batch.als.scaling_b=2"], "scaling_b=2 (a number in [0, 1])"),
    (["--set", "batch.final_fit=refti"], "batch.final_fit 'refti'"),              # was found after the fits
    (["--set", "batch.scorers.candidates=[als,knn]"], "unknown batch.scorers.candidates ['knn']"),
    (["--set", "batch.holdout.method=latest"], "batch.holdout.method 'latest'"),
    (["--set", "batch.sink_outage_tolerance=soon"], "batch.sink_outage_tolerance: 'soon' is not a duration"),
    (["--dataset", "no_such_preset"], "no dataset preset 'no_such_preset'"),
    (["--write-topic", "--set", "kafka.client_options.sasl.login.class=x"], "'sasl.login.class' is not supported"),
])
def test_exit_2_for_a_bad_setting_before_spark_starts(env, tmp_path, transactions, args, message):
    result = batch(env, "--input", str(transactions), *SMALL, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "session 'reco-batch-training'" not in result.stderr, "a bad setting must fail before Spark starts"
    assert versions(tmp_path / "models") == []


def _without_product_column(folder: Path, transactions: Path) -> Path:
    path = folder / "no_product.csv"
    lines = transactions.read_text().splitlines()[:200]
    path.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != 2) for line in lines) + "\n")
    return path


def _header_only(folder: Path, transactions: Path) -> Path:
    path = folder / "header_only.csv"
    path.write_text(transactions.read_text().splitlines()[0] + "\n")
    return path


def _epoch_seconds(folder: Path, transactions: Path) -> Path:
    """Times as seconds since 1970, as many exports write them, with no time_format set."""
    path = folder / "epoch.csv"
    header, *rows = transactions.read_text().splitlines()[:200]
    path.write_text("\n".join([header] + [row.rsplit(",", 1)[0] + ",1737000000" for row in rows]) + "\n")
    return path


def _corrupt_gzip(folder: Path, transactions: Path) -> Path:
    path = folder / "transactions.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))     # a gzip header, then noise
    return path


@pytest.mark.parametrize("make_input, message", [
    (_without_product_column, "has no column for data.columns.product_id='product_id'"),
    (lambda folder, _: folder / "missing.csv", "does not exist"),
    (_corrupt_gzip, "cannot read"),
    (_header_only, "no usable rows"),
    (_epoch_seconds, "rows (data.columns.time_format is None): set data.columns.time_format to a Spark "
                     "datetime pattern such as 'dd/MM/yyyy HH:mm', or to epoch_seconds / epoch_millis"),
])
def test_exit_2_for_bad_input(env, tmp_path, transactions, make_input, message):
    path = make_input(tmp_path, transactions)
    result = batch(env, "--input", str(path), *SMALL)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert versions(tmp_path / "models") == [] and current_version(tmp_path / "models") is None


def _attributes_for(transactions: Path, folder: Path, bad: bool = False) -> tuple[Path, set[str]]:
    """Every product of the data: the three best sellers out of stock, the next two in a banned
    category, margins rising with the product's rank (or a margin that is not a number)."""
    import pandas as pd

    sold = pd.read_csv(transactions, dtype={"product_id": str})["product_id"].dropna().value_counts().index
    frame = pd.DataFrame({"product_id": sold, "margin": [str(i % 7) for i in range(len(sold))],
                          "in_stock": [i >= 3 for i in range(len(sold))],
                          "category": ["gifts" if i in (3, 4) else "food" for i in range(len(sold))]})
    if bad:
        frame.loc[5, "margin"] = "high"
    path = folder / ("bad_attributes.csv" if bad else "attributes.csv")
    frame.to_csv(path, index=False)
    return path, set(sold[:5])


def test_exit_2_for_a_bad_attributes_file(env, tmp_path, transactions):
    path, _ = _attributes_for(transactions, tmp_path, bad=True)
    result = batch(env, "--input", str(transactions), *SMALL, "--set", f"business_rules.attributes={path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{path}: column margin, row 6: 'high' is not a number" in result.stderr
    assert "Traceback" not in result.stderr and "session 'reco-batch-training'" not in result.stderr
    assert versions(tmp_path / "models") == []


def test_business_rules_shape_the_published_lists_and_are_recorded(env, tmp_path, transactions):
    import hashlib

    import pandas as pd

    path, banned = _attributes_for(transactions, tmp_path)
    result = batch(env, "--input", str(transactions), *SMALL, "--set", f"business_rules.attributes={path}",
                   "--set", "business_rules.exclude.categories=[gifts]", "--set", "business_rules.boost.function=log")
    assert result.returncode == 0, result.stderr[-3000:]
    lists = pd.read_parquet(tmp_path / "out" / "recommendations.parquet")
    listed = {p for column in ("recommendations", "buy_again") for row in lists[column] for p in row}
    assert listed and not listed & banned
    assert all(len(row) == 10 for row in lists["recommendations"])
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    recorded = summary["business_rules"]
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert recorded["attributes"] == str(path) and recorded["banned"] == 5
    assert recorded["exclude"] == {"out_of_stock": True, "categories": ["gifts"]}
    assert recorded["boost"]["function"] == "log"
    version = current_version(tmp_path / "models")
    params = json.loads((tmp_path / "models" / "versions" / version / "metadata.json").read_text())["params"]
    assert params["business_rules"] == recorded
