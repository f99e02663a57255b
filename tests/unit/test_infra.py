"""The local services' own helpers: the broker's cluster id, the standalone cluster's workers,
and python -m infra pack (what spark-submit ships to executors)."""
from __future__ import annotations

import ast
import zipfile
from pathlib import Path

import pytest

from infra.process import ServiceError
from infra.services import SparkStandalone, new_cluster_id, worker_ports
from models.config import REPO_ROOT, load_config


def test_a_cluster_id_never_starts_with_a_dash():
    draws = iter([b"\xfb" + bytes(15), bytes(range(16))])      # the first encodes to "-..."
    cluster_id = new_cluster_id(lambda: next(draws))
    assert cluster_id == "AAECAwQFBgcICQoLDA0ODw" and len(cluster_id) == 22


# -- the local Spark standalone cluster ----------------------------------------------------------
def local_cluster(**settings):
    return load_config(files=[], env={}).with_overrides(
        {"run_dir": "/srv/reco-run", **{f"spark.local_cluster.{k}": v for k, v in settings.items()}})


def test_the_default_cluster_has_two_one_core_workers_on_consecutive_ports():
    cluster = SparkStandalone(local_cluster())
    assert (cluster.port, [w.port for w in cluster.workers]) == (7077, [7078, 7079])
    commands = [cluster.worker_command(w) for w in cluster.workers]
    for worker, command in zip(cluster.workers, commands):
        assert command[command.index("--cores") + 1] == "1"            # per worker
        assert command[command.index("--port") + 1] == str(worker.port)
        assert command[command.index("--work-dir") + 1] == str(cluster.work_dir(worker))
        assert command[command.index("org.apache.spark.deploy.worker.Worker") + 1] == "spark://127.0.0.1:7077"
    assert len({w.home for w in cluster.workers}) == len({w.pid_file for w in cluster.workers}) == 2


def test_worker_ports_follow_the_setting_and_never_take_the_master_port():
    assert worker_ports(local_cluster(workers=3, worker_port=9000)) == [9000, 9001, 9002]
    with pytest.raises(ServiceError, match="falls among the worker ports"):
        worker_ports(local_cluster(workers=2, port=7078, worker_port=7077))
    with pytest.raises(ServiceError, match="1 or more"):
        worker_ports(local_cluster(workers=0))


# -- python -m infra pack ------------------------------------------------------------------------
def test_the_packed_environment_holds_the_runtime_dependencies_and_no_dev_tool():
    from infra.pack import project_requirements, runtime_distributions

    names = {d.metadata["Name"].lower().replace("_", "-") for d in runtime_distributions(project_requirements())}
    assert {"pyspark", "py4j", "numpy", "pandas", "pyarrow", "kafka-python", "boto3", "botocore", "pyyaml",
            "prometheus-client"} <= names
    assert not names & {"reco", "pytest", "hypothesis", "moto", "venv-pack", "jsonschema"}


def test_the_environment_key_changes_with_what_is_packed(monkeypatch):
    import infra.pack as pack
    from infra.pack import environment_key, project_requirements, runtime_distributions

    dists = runtime_distributions(project_requirements())
    key = environment_key(dists)
    assert environment_key(dists) == key and len(key) == 16
    assert environment_key(dists[:-1]) != key
    monkeypatch.setattr(pack, "EXCLUDE", ())
    assert environment_key(dists) != key


def test_the_project_zip_holds_the_job_packages_sources_and_data(tmp_path):
    from infra.pack import JOB_PACKAGES, zip_packages

    names = zipfile.ZipFile(zip_packages(JOB_PACKAGES["streaming"], tmp_path / "code.zip")).namelist()
    assert {"models/__init__.py", "models/scoring.py", "streaming/__init__.py", "streaming/state.py",
            "streaming/event.schema.json"} <= set(names)
    assert {n.split("/")[0] for n in names} == {"models", "streaming"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


# Run on the driver only (never imported by a task), so they may import anything.
DRIVER_ONLY = {"streaming/bench.py"}


@pytest.mark.parametrize("job", ["streaming", "batch"])
def test_the_zipped_packages_import_no_other_project_package(job):
    """What the executors import comes from the job's zip: a module in it that imports a project
    package left out of the zip would fail on an executor (and only there)."""
    from infra.pack import JOB_PACKAGES

    project = {"batch_training", "streaming", "models", "infra", "tools"}
    shipped = set(JOB_PACKAGES[job])
    outside = []
    for package in shipped:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            name = path.relative_to(REPO_ROOT).as_posix()
            if name in DRIVER_ONLY:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                outside += [f"{name}: {m}" for m in modules if m.split(".")[0] in project - shipped]
    assert not outside


def test_the_submit_command_ships_the_archives_the_jars_and_the_worker_python(tmp_path):
    from infra.pack import Packed, link_driver_environment, submit_command

    cfg = load_config(files=[], env={})
    packed = Packed(tmp_path / "reco-env.tar.gz", tmp_path / "reco-streaming.zip", "streaming",
                    reused=True, seconds=0.1)
    command = submit_command(cfg, packed, "spark://127.0.0.1:7077", options=["--driver-memory", "1g"])
    argv = command.argv
    assert argv[0].endswith("/spark-submit") and argv[argv.index("--master") + 1] == "spark://127.0.0.1:7077"
    assert argv[argv.index("--archives") + 1] == f"{tmp_path}/reco-env.tar.gz#environment"
    assert argv[argv.index("--py-files") + 1] == f"{tmp_path}/reco-streaming.zip"
    assert "spark.pyspark.python=./environment/bin/python" in argv
    assert any(a.startswith("spark.pyspark.driver.python=") for a in argv)
    jars = argv[argv.index("--jars") + 1].split(",")
    assert all(Path(j).is_file() for j in jars) and any("spark-sql-kafka" in j for j in jars)
    assert argv[-3:] == ["--driver-memory", "1g", str(REPO_ROOT / "streaming/__main__.py")]
    assert command.env["SPARK_LOCAL_IP"] == "127.0.0.1" and command.env["PYSPARK_DRIVER_PYTHON"]
    # The driver's own Python runners find ./environment/bin/python in spark-submit's folder.
    assert command.cwd == tmp_path
    link = link_driver_environment(tmp_path)
    assert (command.cwd / "environment" / "bin" / "python").exists() and link_driver_environment(tmp_path) == link
