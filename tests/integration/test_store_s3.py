"""The model store against S3 (the local moto server over HTTP, as boto3 talks to AWS)."""
from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from models.artifact import ModelArtifact, new_version
from models.clients import s3_client
from models.store import ModelLoadError, ModelStore, ModelStoreError

pytestmark = pytest.mark.integration


def make_artifact(seed: int, n_items: int = 30, n_users: int = 12, rank: int = 3) -> ModelArtifact:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 5, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    return ModelArtifact(
        version=new_version(datetime(2026, 11, 27, tzinfo=UTC) + timedelta(hours=seed)),
        model_type="als", item_ids=np.array([f"P{i}" for i in range(n_items)]),
        item_factors=rng.normal(size=(n_items, rank)).astype(np.float32),
        user_ids=np.array([f"C{i}" for i in rng.permutation(n_users)]),
        user_factors=rng.normal(size=(n_users, rank)).astype(np.float32),
        popularity=rng.integers(0, 9, n_items).astype(np.float64), user_items_indptr=indptr,
        user_items_indices=np.concatenate([rng.choice(n_items, n, replace=False) for n in lengths]),
        user_items_counts=rng.integers(1, 4, indptr[-1]).astype(np.float32),
        params={"rank": rank, "scaling": "none"}, cutoff_time="2026-11-26T12:00:00Z", metrics={"map": 0.1})


def assert_same_artifact(loaded: ModelArtifact, original: ModelArtifact) -> None:
    assert (loaded.version, loaded.params, loaded.metrics, loaded.cutoff_time) == \
        (original.version, original.params, original.metrics, original.cutoff_time)
    for name in ("item_ids", "user_ids", "item_factors", "user_factors", "popularity"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
    for got, expected in zip(loaded.user_items, original.user_items):
        np.testing.assert_array_equal(got, expected)


@pytest.fixture
def s3_cfg(cfg, dynamodb_endpoint):
    """A fresh bucket on the local endpoint and a config whose store lives under a prefix in it."""
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    s3_client(cfg).create_bucket(Bucket=bucket)
    return cfg.with_overrides({"model_store.uri": f"s3://{bucket}/reco/models"})


def test_round_trip_and_publish(s3_cfg):
    store = ModelStore.from_config(s3_cfg)
    first, second = make_artifact(1), make_artifact(2)
    assert store.current_version() is None and store.current_pointer_etag() is None
    store.publish(first)
    tag = store.current_pointer_etag()
    assert store.current_version() == first.version
    assert_same_artifact(store.load(), first)
    store.write(second)
    assert store.current_version() == first.version, "write alone must not publish"
    store.set_current(second.version)
    assert store.current_pointer_etag() != tag
    assert_same_artifact(ModelStore.from_config(s3_cfg).load(), second)
    assert store.list_versions() == sorted([first.version, second.version])
    keys = [o["Key"] for o in s3_client(s3_cfg).list_objects_v2(Bucket=store.backend.bucket)["Contents"]]
    assert f"reco/models/versions/{first.version}/metadata.json" in keys and "reco/models/CURRENT" in keys


@pytest.mark.parametrize("damage", ["delete_file", "truncate_file", "delete_metadata"])
def test_a_damaged_version_is_never_made_current(s3_cfg, damage):
    store = ModelStore.from_config(s3_cfg)
    good, bad = make_artifact(3), make_artifact(4)
    store.publish(good)
    store.write(bad)
    client, bucket = s3_client(s3_cfg), store.backend.bucket
    folder = f"reco/models/versions/{bad.version}"
    if damage == "delete_file":
        client.delete_object(Bucket=bucket, Key=f"{folder}/users.parquet")
    elif damage == "truncate_file":
        body = client.get_object(Bucket=bucket, Key=f"{folder}/user_factors.npy")["Body"].read()
        client.put_object(Bucket=bucket, Key=f"{folder}/user_factors.npy", Body=body[:-4])
    else:
        client.delete_object(Bucket=bucket, Key=f"{folder}/metadata.json")
    with pytest.raises(ModelLoadError, match=f"version {bad.version}"):
        store.load(bad.version)
    with pytest.raises(ModelLoadError, match="refusing to make version"):
        store.set_current(bad.version)
    assert store.current_version() == good.version
    assert_same_artifact(store.load(), good)


def test_a_missing_bucket_is_named(cfg, dynamodb_endpoint):
    store = ModelStore.from_config(cfg.with_overrides({"model_store.uri": "s3://no-such-bucket-xyz/m"}))
    with pytest.raises(ModelStoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.write(make_artifact(5))


def write_in_parts(s3_cfg, artifact: ModelArtifact, bounds=(0, 5, 5, 12)) -> list[dict]:
    """The users as parts, each by a store of its own (as Spark tasks on executors), then the item side."""
    indptr, indices, counts = artifact.user_items
    entries = []
    for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        frame = pd.DataFrame({"customer_id": artifact.user_ids[lo:hi],
                              "items": [indices[indptr[u]:indptr[u + 1]] for u in range(lo, hi)],
                              "counts": [counts[indptr[u]:indptr[u + 1]] for u in range(lo, hi)],
                              "factors": [artifact.user_factors[u] for u in range(lo, hi)]})
        entries.append(ModelStore.from_config(s3_cfg).write_user_part(artifact.version, part, frame))
    item_side = dataclasses.replace(artifact, user_ids=np.zeros(0, dtype=str),
                                    user_factors=np.zeros((0, artifact.rank), dtype=np.float32),
                                    user_items_indptr=np.zeros(1, dtype=np.int64),
                                    user_items_indices=np.zeros(0, dtype=np.int32),
                                    user_items_counts=np.zeros(0, dtype=np.float32))
    ModelStore.from_config(s3_cfg).write(item_side, user_parts=entries)
    return entries


def test_a_version_in_parts_round_trips_is_published_and_pruned(s3_cfg):
    store = ModelStore.from_config(s3_cfg)
    client, bucket = s3_client(s3_cfg), store.backend.bucket
    first, second, third = make_artifact(6), make_artifact(7), make_artifact(8)
    entries = write_in_parts(s3_cfg, first)
    store.set_current(first.version)
    assert_same_artifact(ModelStore.from_config(s3_cfg).load(), first)
    assert store.load_metadata(first.version)["user_parts"] == [e["name"] for e in entries]
    fingerprint = dict(store.version_fingerprint(first.version))
    assert all(fingerprint.get(e["name"]) for e in entries), fingerprint

    folder = f"reco/models/versions/{first.version}"
    body = client.get_object(Bucket=bucket, Key=f"{folder}/users/part-00002.parquet")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"{folder}/users/part-00002.parquet", Body=body[:-4])
    with pytest.raises(ModelLoadError, match=f"refusing to make version {first.version} current.*corrupted: "
                                             f"s3://{bucket}/{folder}/users/part-00002.parquet"):
        store.set_current(first.version)
    client.put_object(Bucket=bucket, Key=f"{folder}/users/part-00002.parquet", Body=body)

    for artifact in (second, third):
        write_in_parts(s3_cfg, artifact)
        store.set_current(artifact.version)
    assert store.prune(keep=0, dry_run=False) == [first.version]
    left = client.list_objects_v2(Bucket=bucket, Prefix=f"{folder}/")
    assert left["KeyCount"] == 0, [o["Key"] for o in left.get("Contents", [])]
    assert store.list_versions() == [second.version, third.version]
    assert_same_artifact(store.load(), third)
