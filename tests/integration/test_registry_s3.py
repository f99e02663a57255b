"""The model registry on S3 (the local moto server over HTTP): a gate-checked promote (refused,
then forced), rollback and prune."""
from __future__ import annotations

import uuid

import pytest

from models.clients import s3_client
from models.store import ModelStore
from tests.unit.test_registry import registry_model
from tools import EXIT_BAD_INPUT, EXIT_OK
from tools.registry import main

pytestmark = pytest.mark.integration

A, B, C, D = (f"2026010{i}T000000Z-00000{i}" for i in range(1, 5))


@pytest.fixture
def s3_store(cfg, dynamodb_endpoint, monkeypatch):
    """A fresh bucket on the local endpoint, the store under a prefix in it, and the tools' config
    pointed at that endpoint: A and C published, B written only (the gate refused it: its MAP@10
    is below popularity's), D current. Metrics as the batch job records them."""
    bucket = f"registry-{uuid.uuid4().hex[:10]}"
    s3_client(cfg).create_bucket(Bucket=bucket)
    monkeypatch.setenv("RECO__MODEL_STORE__S3_ENDPOINT_URL", cfg.get_path("model_store.s3_endpoint_url"))
    store = ModelStore.from_config(cfg.with_overrides({"model_store.uri": f"s3://{bucket}/reco/models"}))
    for version, map_value in ((A, 0.10), (B, 0.019), (C, 0.11), (D, 0.12)):
        artifact = registry_model(version, map_value)
        store.publish(artifact) if version != B else store.write(artifact)
    return store


def _keys(store: ModelStore) -> list[str]:
    pages = store.backend.client.get_paginator("list_objects_v2").paginate(Bucket=store.backend.bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_rollback_and_a_refused_promote_on_s3(s3_store, capsys):
    assert main(["rollback", "--store", s3_store.uri]) == EXIT_OK
    assert f"rolled back to {C}" in capsys.readouterr().out
    assert s3_store.current_version() == C and s3_store.load().version == C
    client, bucket = s3_store.backend.client, s3_store.backend.bucket
    key = f"reco/models/versions/{D}/user_factors.npy"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[:-4])
    assert main(["promote", D, "--store", s3_store.uri]) == EXIT_BAD_INPUT
    assert s3_store.current_version() == C


def test_promote_of_a_refused_version_on_s3_needs_force(s3_store, capsys):
    assert main(["promote", B, "--store", s3_store.uri]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"the publish gate refuses {B}" in err and "does not beat popularity" in err and "--force" in err
    assert s3_store.current_version() == D and B not in s3_store.published_versions()
    assert main(["promote", B, "--force", "--store", s3_store.uri]) == EXIT_OK
    captured = capsys.readouterr()
    assert "WARNING: --force" in captured.err and "does not beat popularity" in captured.err
    assert s3_store.current_version() == B and s3_store.load().version == B
    assert main(["rollback", "--store", s3_store.uri]) == EXIT_OK         # B was created before C and D
    assert f"rolled back to {A}" in capsys.readouterr().out and s3_store.current_version() == A
    assert main(["promote", D, "--store", s3_store.uri]) == EXIT_OK       # the gate passes D over A
    assert "the publish gate passes it" in capsys.readouterr().out and s3_store.current_version() == D


def test_prune_on_s3(s3_store, capsys):
    before = _keys(s3_store)
    assert main(["prune", "--keep", "0", "--store", s3_store.uri]) == EXIT_OK
    assert "would delete 2 versions" in capsys.readouterr().out and _keys(s3_store) == before
    assert main(["prune", "--keep", "0", "--yes", "--store", s3_store.uri]) == EXIT_OK
    keys = _keys(s3_store)
    assert not any(f"/versions/{v}/" in k for k in keys for v in (A, B))
    assert any(f"/versions/{C}/" in k for k in keys) and "reco/models/CURRENT" in keys
    assert s3_store.list_versions() == [C, D] and s3_store.load().version == D
    assert main(["rollback", "--store", s3_store.uri]) == EXIT_OK and s3_store.current_version() == C
