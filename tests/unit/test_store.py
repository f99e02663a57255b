"""The versioned model store on a local folder: round trip, publishing, refusing broken versions."""
from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from models.artifact import ModelArtifact, new_version
from models.store import ModelLoadError, ModelStore, ModelStoreError

START = datetime(2026, 11, 27, 3, 15, tzinfo=timezone.utc)


def make_artifact(seed: int = 0, version: str | None = None, n_items: int = 40, n_users: int = 25,
                  rank: int = 4) -> ModelArtifact:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([rng.choice(n_items, n, replace=False) for n in lengths]).astype(np.int32)
    return ModelArtifact(
        version=version or new_version(START + timedelta(minutes=seed)), model_type="als",
        item_ids=np.array([f"P{i:04d}" for i in rng.permutation(n_items)]),
        item_factors=rng.normal(size=(n_items, rank)).astype(np.float32),
        user_ids=np.array([f"C{i}" for i in range(n_users)]),
        user_factors=rng.normal(size=(n_users, rank)).astype(np.float32),
        popularity=rng.integers(0, 50, n_items).astype(np.float64),
        user_items_indptr=indptr, user_items_indices=indices,
        user_items_counts=rng.integers(1, 4, indptr[-1]).astype(np.float32),
        params={"rank": rank, "reg_param": 0.1, "alpha": 1.0, "implicit_prefs": True, "scaling": "log"},
        cutoff_time="2026-11-26T23:59:00.000Z", stats={"events": 1234}, metrics={"map": 0.12})


def assert_same_artifact(loaded: ModelArtifact, original: ModelArtifact) -> None:
    assert loaded.version == original.version and loaded.model_type == original.model_type
    np.testing.assert_array_equal(loaded.item_ids, original.item_ids)
    np.testing.assert_array_equal(loaded.user_ids, original.user_ids)
    np.testing.assert_array_equal(loaded.item_factors, original.item_factors)
    np.testing.assert_array_equal(loaded.user_factors, original.user_factors)
    np.testing.assert_array_equal(loaded.popularity, original.popularity)
    for got, expected in zip(loaded.user_items, original.user_items):
        np.testing.assert_array_equal(got, expected)
    assert (loaded.params, loaded.cutoff_time, loaded.stats, loaded.metrics, loaded.created_at) == \
        (original.params, original.cutoff_time, original.stats, original.metrics, original.created_at)
    assert loaded.item_factors.dtype == np.float32 and loaded.popularity.dtype == np.float64


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(str(tmp_path / "models"))


def test_round_trip_keeps_everything(store):
    artifact = make_artifact()
    assert store.write(artifact) == artifact.version
    assert_same_artifact(store.load(artifact.version), artifact)
    metadata = store.load_metadata(artifact.version)
    assert set(metadata["files"]) == {"item_factors.npy", "user_factors.npy", "items.parquet",
                                      "users.parquet", "user_items.parquet"}
    assert store.current_version() is None, "write alone must not publish"


def test_publish_switches_current(store):
    first, second = make_artifact(1), make_artifact(2)
    assert store.current_pointer_etag() is None
    store.publish(first)
    tag = store.current_pointer_etag()
    assert store.current_version() == first.version
    assert_same_artifact(store.load(), first)
    store.publish(second)
    assert store.current_version() == second.version and store.current_pointer_etag() != tag
    assert_same_artifact(store.load(), second)
    assert store.current_pointer()["published_at"].endswith("Z")


def test_load_without_current_names_the_store(store):
    with pytest.raises(ModelLoadError, match="no current model in .*models"):
        store.load()


def test_existing_version_is_never_overwritten(store):
    artifact = make_artifact(3)
    store.write(artifact)
    with pytest.raises(ModelStoreError, match="already exists"):
        store.write(make_artifact(4, version=artifact.version))
    assert_same_artifact(store.load(artifact.version), artifact)


def _version_dir(store: ModelStore, version: str):
    return store.backend.root / "versions" / version


def _missing_file(folder):
    (folder / "user_factors.npy").unlink()


def _truncated_file(folder):
    path = folder / "item_factors.npy"
    path.write_bytes(path.read_bytes()[:-8])


def _same_size_other_bytes(folder):
    path = folder / "items.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_metadata(folder):
    (folder / "metadata.json").unlink()


@pytest.mark.parametrize("damage, message", [
    (_missing_file, "incomplete: .*user_factors.npy is missing"),
    (_truncated_file, "corrupted: .*item_factors.npy"),
    (_same_size_other_bytes, "corrupted: .*items.parquet"),
    (_no_metadata, "missing or incomplete: .*metadata.json does not exist"),
])
def test_a_damaged_version_is_never_made_current(store, damage, message):
    good, bad = make_artifact(5), make_artifact(6)
    store.publish(good)
    store.write(bad)
    damage(_version_dir(store, bad.version))
    with pytest.raises(ModelLoadError, match=message):
        store.load(bad.version)
    with pytest.raises(ModelLoadError, match=f"refusing to make version {bad.version} current"):
        store.set_current(bad.version)
    assert store.current_version() == good.version
    assert_same_artifact(store.load(), good)


def test_inconsistent_content_with_valid_checksums_is_refused(store):
    artifact = make_artifact(7)
    store.write(artifact)
    folder = _version_dir(store, artifact.version)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["version"] = "20990101T000000Z-000000"
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="names version"):
        store.set_current(artifact.version)


def test_invalid_artifact_is_not_written(store):
    artifact = make_artifact(8)
    artifact.user_factors = artifact.user_factors[:-1]
    with pytest.raises(ModelStoreError, match="user_factors has 24 rows"):
        store.write(artifact)
    assert store.list_versions() == []


def test_versions_are_listed_oldest_first_and_incomplete_ones_left_out(store):
    versions = [store.write(make_artifact(seed)) for seed in (30, 10, 20)]
    broken = make_artifact(40)
    store.write(broken)
    _no_metadata(_version_dir(store, broken.version))
    assert store.list_versions() == sorted(versions)
    assert store.list_versions()[0] == versions[1]


def test_from_config_resolves_a_relative_folder(cfg, tmp_path):
    store = ModelStore.from_config(cfg.with_overrides({"model_store.uri": str(tmp_path / "m")}))
    assert store.backend.root == tmp_path / "m"
    relative = ModelStore.from_config(cfg.with_overrides({"model_store.uri": "{run_dir}/models-x"}))
    assert relative.backend.root == cfg.path("run_dir") / "models-x"


def test_pointer_switch_is_atomic_for_concurrent_readers(store):
    """Readers polling CURRENT while versions are published only ever see a whole pointer.

    Paced by conditions, not by how many reads fit in a time: after each of the 30 switches the
    writer waits until the reader has completed a read that started after the switch returned,
    and that read must name the version just made current. A starved reader thread (a loaded
    machine) makes the test slower, never flaky.
    """
    import time

    versions = [store.write(make_artifact(seed, n_items=5, n_users=3)) for seed in range(2)]
    store.set_current(versions[0])
    pointer = store.backend.root / "CURRENT"
    seen: list[bytes | str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(pointer.read_bytes())
            except OSError as err:   # a pointer missing even for an instant is a failure too
                seen.append(repr(err))

    def read_after(mark: int, timeout_s: float = 120.0):
        """The read that started after ``mark`` reads had completed (waits for it)."""
        deadline = time.monotonic() + timeout_s
        while len(seen) < mark + 2:
            assert thread.is_alive(), "the reader thread died"
            assert time.monotonic() < deadline, f"the reader made no progress in {timeout_s:.0f} s"
            time.sleep(0.001)
        return seen[mark + 1]

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    switches_seen = []
    try:
        for i in range(30):
            version = versions[(i + 1) % 2]
            store.set_current(version)
            switches_seen.append((version, read_after(len(seen))))
    finally:
        stop.set()
        thread.join()
    for version, raw in switches_seen:
        assert isinstance(raw, bytes), f"a read after the switch to {version} failed: {raw}"
        assert json.loads(raw)["version"] == version, "a read after the switch returned saw the old pointer"
    assert len(seen) > 30
    torn = [raw for raw in seen if not isinstance(raw, bytes)]
    assert not torn, f"{len(torn)} of {len(seen)} reads found no pointer, e.g. {torn[0]}"
    assert {json.loads(raw)["version"] for raw in seen} == set(versions)
    assert store.current_version() == versions[0]
    assert not [p for p in pointer.parent.iterdir() if p.name.startswith(".")], "temp files left behind"


# -- models that would mislead the stream ---------------------------------------------------------
FUTURE_CUTOFF = "2099-01-01T00:00:00.000Z"


def _future_cutoff(artifact: ModelArtifact) -> None:
    artifact.cutoff_time = FUTURE_CUTOFF


def _bogus_model_type(artifact: ModelArtifact) -> None:
    artifact.model_type = "mystery"


def _zero_item_factors(artifact: ModelArtifact) -> None:
    artifact.item_factors = np.zeros_like(artifact.item_factors)


@pytest.mark.parametrize("spoil, message", [
    (_future_cutoff, "cutoff_time '2099-01-01T00:00:00.000Z' .* in the future"),
    (_bogus_model_type, "model_type 'mystery' .* not a known scorer"),
    (_zero_item_factors, "item_factors are all zero"),
])
def test_a_model_that_would_mislead_the_stream_is_neither_written_nor_published(store, spoil, message):
    artifact = make_artifact(50)
    spoil(artifact)
    with pytest.raises(ModelStoreError, match=f"version '{artifact.version}'.*{message}"):
        store.write(artifact)
    with pytest.raises(ModelStoreError, match=f"version '{artifact.version}'.*{message}"):
        store.publish(artifact)
    assert store.list_versions() == [] and store.current_version() is None


def test_a_cutoff_within_the_clock_skew_allowance_is_accepted(store):
    artifact = make_artifact(51)
    soon = datetime.now(timezone.utc) + timedelta(minutes=5)
    artifact.cutoff_time = soon.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    store.publish(artifact)
    assert store.load().cutoff_time == artifact.cutoff_time


def _rewrite_metadata(folder, **fields) -> None:
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.update(fields)
    (folder / "metadata.json").write_text(json.dumps(metadata))


def _tamper_cutoff(folder) -> None:
    _rewrite_metadata(folder, cutoff_time=FUTURE_CUTOFF)


def _tamper_model_type(folder) -> None:
    _rewrite_metadata(folder, model_type="mystery")


def _tamper_zero_factors(folder) -> None:
    """Zero item factors with a matching size and checksum: only the content check can see it."""
    import hashlib

    path = folder / "item_factors.npy"
    zeros = np.zeros_like(np.load(path))
    np.save(path, zeros)
    data = path.read_bytes()
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"]["item_factors.npy"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "metadata.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize("tamper, message", [
    (_tamper_cutoff, "cutoff_time '2099-01-01T00:00:00.000Z' .* in the future"),
    (_tamper_model_type, "model_type 'mystery' .* not a known scorer"),
    (_tamper_zero_factors, "item_factors are all zero"),
])
def test_a_tampered_version_is_neither_loaded_nor_made_current(store, tamper, message):
    good, bad = make_artifact(52), make_artifact(53)
    store.publish(good)
    store.write(bad)
    tamper(_version_dir(store, bad.version))
    with pytest.raises(ModelLoadError, match=f"version {bad.version}.*{message}"):
        store.load(bad.version)
    with pytest.raises(ModelLoadError, match=f"refusing to make version {bad.version} current.*{message}"):
        store.set_current(bad.version)
    assert store.current_version() == good.version


def test_the_write_line_names_a_rank_only_for_models_that_score_with_factors(tmp_path, caplog):
    """A popularity model chosen by the CV still carries the fit's factors; its line must not read
    as an ALS model's."""
    caplog.set_level(logging.INFO, logger="models.store")
    store = ModelStore(str(tmp_path / "store"))
    als, popularity = make_artifact(seed=1), make_artifact(seed=2)
    popularity.model_type = "popularity"
    store.write(als)
    store.write(popularity)
    lines = [r.getMessage() for r in caplog.records if " written to " in r.getMessage()]
    assert "(als: 40 items, 25 users, rank 4)" in lines[0]
    assert "(popularity: 40 items, 25 users)" in lines[1]
