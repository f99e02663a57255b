"""Session-wide fixtures: one broker, one DynamoDB endpoint, one SparkSession for the whole run.

The services are the real ones, started by the project's own infra code on test ports under
.run/test (so a demo running beside the tests is left alone) and stopped at the end.
Integration tests check before they start that each service still answers, so a service that
died mid-session fails the tests that need it with a message naming it, instead of a hang.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.config import REPO_ROOT, Config, load_config
from models.logging_setup import setup_logging

TEST_RUN_DIR = REPO_ROOT / ".run" / "test"
# Ports of the test services: distinct from the defaults used by the demo.
TEST_OVERRIDES = {
    "run_dir": str(TEST_RUN_DIR),
    "kafka.local.port": 19092,
    "kafka.local.controller_port": 19093,
    "kafka.bootstrap_servers": "127.0.0.1:19092",
    "dynamodb.local.port": 18000,
    "dynamodb.endpoint_url": "http://127.0.0.1:18000",
    "model_store.s3_endpoint_url": "http://127.0.0.1:18000",
    "model_store.uri": str(TEST_RUN_DIR / "models"),
    "spark.shuffle_partitions": 2,
    "spark.driver_memory": "3g",
    "streaming.metrics.port": 0,        # any free port: jobs of several tests (and a demo) side by side
}


def pytest_configure(config):
    setup_logging("INFO")


@pytest.fixture(scope="session")
def cfg() -> Config:
    """The test configuration: defaults plus the test ports and run folder."""
    return load_config(files=[], env={}).with_overrides(TEST_OVERRIDES)


@pytest.fixture(scope="session")
def _services(cfg):
    """Start the services (or reuse running ones); stop them when the last test session using them ends.

    Several test sessions may run at once on one machine (a developer's and an editor's); each
    registers itself under .run/test/sessions, and only the last one out stops the services.
    """
    from infra.services import all_services

    sessions = TEST_RUN_DIR / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    mine = sessions / str(os.getpid())
    mine.touch()
    services = all_services(cfg)
    for service in services.values():
        service.start()
    yield services
    mine.unlink(missing_ok=True)
    others = [f for f in sessions.iterdir() if _pid_alive(int(f.name))] if sessions.exists() else []
    if not others and os.environ.get("RECO_TEST_KEEP_SERVICES") != "1":
        for service in services.values():
            service.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _alive(service):
    """The service, or a test failure naming it (never a hang) when it died mid-session."""
    from infra.process import ServiceError

    try:
        service.check()
    except ServiceError as err:
        pytest.fail(f"local service down: {err}", pytrace=False)
    return service


@pytest.fixture
def kafka_broker(_services, cfg):
    """The running broker (checked alive); its bootstrap address is cfg's."""
    return _alive(_services["kafka"])


@pytest.fixture
def dynamodb_endpoint(_services):
    """The running DynamoDB endpoint (checked alive)."""
    return _alive(_services["dynamodb"])


@pytest.fixture(scope="session")
def spark(cfg):
    """One SparkSession for the whole test run (a JVM start costs 10-19 s here)."""
    from models.spark import build_spark

    session = build_spark(cfg.with_overrides({"spark.checkpoint_dir": str(TEST_RUN_DIR / "spark-checkpoints")}),
                          "reco-tests")
    yield session
    session.stop()


@pytest.fixture
def shared_datasets() -> Path:
    """The public purchase datasets kept beside the repository (read-only)."""
    path = Path(os.environ.get("RECO_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
    if not path.is_dir():
        pytest.fail(f"public datasets not found at {path}: set RECO_SHARED_DATASETS")
    return path
