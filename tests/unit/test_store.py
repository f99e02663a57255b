"""The versioned model store on a local folder: round trip, publishing, refusing broken versions."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from models.artifact import ModelArtifact, new_version
from models.store import ModelLoadError, ModelStore, ModelStoreError

START = datetime(2026, 11, 27, 3, 15, tzinfo=UTC)


def make_artifact(seed: int = 0, version: str | None = None, n_items: int = 40, n_users: int = 25,
                  rank: int = 4, model_type: str = "als") -> ModelArtifact:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([rng.choice(n_items, n, replace=False) for n in lengths]).astype(np.int32)
    return ModelArtifact(
        version=version or new_version(START + timedelta(minutes=seed)), model_type=model_type,
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
    soon = datetime.now(UTC) + timedelta(minutes=5)
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


# -- users written in parts (issue 15) -------------------------------------------------------------
def user_frames(artifact: ModelArtifact, bounds: list[int]) -> list[pd.DataFrame]:
    """The artifact's users as write_user_part frames, split at ``bounds`` (user positions)."""
    indptr, indices, counts = artifact.user_items
    return [pd.DataFrame({"customer_id": artifact.user_ids[lo:hi],
                          "items": [indices[indptr[u]:indptr[u + 1]] for u in range(lo, hi)],
                          "counts": [counts[indptr[u]:indptr[u + 1]].tolist() for u in range(lo, hi)],
                          "factors": [artifact.user_factors[u] for u in range(lo, hi)]})
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def item_side(artifact: ModelArtifact) -> ModelArtifact:
    return dataclasses.replace(artifact, user_ids=np.zeros(0, dtype=str),
                               user_factors=np.zeros((0, artifact.rank), dtype=np.float32),
                               user_items_indptr=np.zeros(1, dtype=np.int64),
                               user_items_indices=np.zeros(0, dtype=np.int32),
                               user_items_counts=np.zeros(0, dtype=np.float32))


def write_in_parts(store: ModelStore, artifact: ModelArtifact, bounds=(0, 3, 3, 25), frames=None) -> list[dict]:
    """``artifact`` written as parts (by default 3 of uneven sizes, the middle one empty)."""
    frames = frames if frames is not None else user_frames(artifact, list(bounds))
    entries = [store.write_user_part(artifact.version, part, frame) for part, frame in enumerate(frames)]
    store.write(item_side(artifact), user_parts=entries)
    return entries


def assert_identical(got: ModelArtifact, expected: ModelArtifact) -> None:
    """Equal values, dtypes and shapes: a parts version must be indistinguishable from an inline one."""
    assert_same_artifact(got, expected)
    for name in ("item_ids", "user_ids", "item_factors", "user_factors", "popularity", "user_items_indptr",
                 "user_items_indices", "user_items_counts"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
    assert (got.lineage, got.n_users, got.rank) == (expected.lineage, expected.n_users, expected.rank)


@pytest.mark.parametrize("rank, model_type", [(4, "als"), (0, "popularity")])
def test_a_version_in_parts_loads_to_the_inline_artifact(tmp_path, rank, model_type):
    artifact = make_artifact(60, rank=rank, model_type=model_type)
    inline, parted = ModelStore(str(tmp_path / "inline")), ModelStore(str(tmp_path / "parts"))
    inline.write(artifact)
    entries = write_in_parts(parted, artifact)
    assert [e["rows"] for e in entries] == [3, 0, 22]
    assert [e["name"] for e in entries] == [f"users/part-{i:05d}.parquet" for i in range(3)]
    json.dumps(entries)
    parted.set_current(artifact.version)
    for loaded in (parted.load(artifact.version), parted.load()):
        assert_identical(loaded, inline.load(artifact.version))
        assert_identical(loaded, artifact)
    metadata = parted.load_metadata(artifact.version)
    assert metadata["format_version"] == 2 and inline.load_metadata(artifact.version)["format_version"] == 1
    assert metadata["user_parts"] == [e["name"] for e in entries] and metadata["n_users"] == 25
    assert set(metadata["files"]) == {"item_factors.npy", "items.parquet", *metadata["user_parts"]}
    assert metadata["files"]["users/part-00002.parquet"] == {k: entries[2][k] for k in ("size", "sha256", "rows")}
    assert not (_version_dir(parted, artifact.version) / "users.parquet").exists()


def test_parts_are_concatenated_in_the_listed_order(store):
    artifact = make_artifact(61)
    frames = user_frames(artifact, [0, 10, 25])
    entries = [store.write_user_part(artifact.version, part, frame) for part, frame in ((7, frames[1]),
                                                                                       (2, frames[0]))]
    store.write(item_side(artifact), user_parts=entries[::-1])      # part 2 first: users 0-9
    assert_identical(store.load(artifact.version), artifact)


def test_the_same_part_written_twice_gives_the_same_entry(store):
    """A retried or speculative Spark task rewrites its part: the entry the driver keeps must match."""
    artifact = make_artifact(62)
    frame = user_frames(artifact, [0, 25])[0]
    assert store.write_user_part(artifact.version, 0, frame) == store.write_user_part(artifact.version, 0, frame)


def test_a_version_in_parts_is_verified_without_loading_it_whole(store, monkeypatch):
    artifact = make_artifact(63)
    write_in_parts(store, artifact)

    def no_gathering(*args, **kwargs):
        raise AssertionError("set_current loaded the whole version")

    monkeypatch.setattr(ModelStore, "load", no_gathering)
    store.set_current(artifact.version)
    assert store.current_version() == artifact.version


def _missing_part(folder):
    (folder / "users" / "part-00002.parquet").unlink()


def _corrupted_part(folder):
    path = folder / "users" / "part-00002.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_missing_part, "incomplete: .*users/part-00002.parquet is missing"),
    (_corrupted_part, "corrupted: .*users/part-00002.parquet"),
])
def test_a_damaged_part_is_neither_loaded_nor_made_current(store, damage, message):
    good, bad = make_artifact(64), make_artifact(65)
    store.publish(good)
    write_in_parts(store, bad)
    damage(_version_dir(store, bad.version))
    with pytest.raises(ModelLoadError, match=f"version {bad.version} .*{message}"):
        store.load(bad.version)
    with pytest.raises(ModelLoadError, match=f"refusing to make version {bad.version} current.*{message}"):
        store.set_current(bad.version)
    assert store.current_version() == good.version


def _item_index_out_of_range(artifact: ModelArtifact, frames: list[pd.DataFrame]) -> None:
    row = frames[2].at[4, "items"].copy()
    row[-1] = artifact.n_items
    frames[2].at[4, "items"] = row


def _short_factors(artifact: ModelArtifact, frames: list[pd.DataFrame]) -> None:
    frames[2]["factors"] = [f[:3] for f in frames[2]["factors"]]


def _customer_in_two_parts(artifact: ModelArtifact, frames: list[pd.DataFrame]) -> None:
    frames[2].at[5, "customer_id"] = frames[0].at[1, "customer_id"]


@pytest.mark.parametrize("spoil, message", [
    (_item_index_out_of_range, "customer 'C7' .* item index 40: .* 0 to 39"),
    (_short_factors, "customer 'C3' .* 3 factors where the model's rank is 4"),
    (_customer_in_two_parts, "repeats customer 'C1' of users/part-00000.parquet"),
])
def test_a_part_that_does_not_fit_the_model_is_refused_by_name(store, spoil, message):
    """Parts that pass write_user_part's own checks, but not against the item side or each other."""
    artifact = make_artifact(66)
    frames = user_frames(artifact, [0, 3, 3, 25])
    spoil(artifact, frames)
    write_in_parts(store, artifact, frames=frames)
    pattern = f"unusable user part: .*users/part-00002.parquet {message}"
    with pytest.raises(ModelLoadError, match=f"refusing to make version {artifact.version} current.*{pattern}"):
        store.set_current(artifact.version)
    with pytest.raises(ModelLoadError, match=f"version {artifact.version}"):
        store.load(artifact.version)
    assert store.current_version() is None


def test_ids_sharing_a_hash_are_compared_exactly(store, monkeypatch):
    """Every id hashing alike (a collision) must not read as a customer in two parts, nor hide one."""
    from models import store_format

    monkeypatch.setattr(store_format, "_hashes", lambda ids: np.zeros(len(ids), dtype=np.uint64))
    artifact = make_artifact(67)
    write_in_parts(store, artifact)
    store.set_current(artifact.version)
    twice = make_artifact(68)
    frames = user_frames(twice, [0, 3, 3, 25])
    _customer_in_two_parts(twice, frames)
    write_in_parts(store, twice, frames=frames)
    with pytest.raises(ModelLoadError, match="part-00002.parquet repeats customer 'C1'"):
        store.set_current(twice.version)


def _column_missing(frame):
    return frame.drop(columns=["counts"])


def _lengths_differ(frame):
    frame.at[1, "counts"] = [1.0]
    return frame


def _negative_index(frame):
    frame.at[2, "items"] = [-1]
    frame.at[2, "counts"] = [1.0]
    return frame


def _fractional_index(frame):
    frame["items"] = [np.asarray(i, dtype=np.float64) + 0.5 for i in frame["items"]]
    return frame


def _repeated_customer(frame):
    frame.at[3, "customer_id"] = frame.at[0, "customer_id"]
    return frame


def _uneven_factors(frame):
    frame.at[2, "factors"] = [1.0]
    return frame


def _infinite_count(frame):
    frame.at[4, "counts"] = [float("inf")]
    return frame


@pytest.mark.parametrize("spoil, message", [
    (_column_missing, r"has columns \['customer_id', 'items', 'factors'\], expected exactly"),
    (_lengths_differ, "customer 'C1' \\(row 1\\) has 2 items but 1 counts"),
    (_negative_index, "customer 'C2' .* item index -1"),
    (_fractional_index, "column 'items' must hold lists of int32, got list<item: double>"),
    (_repeated_customer, "customer 'C0' .* appears more than once in the part"),
    (_uneven_factors, "customer 'C2' .* has 1 factors where row 0 has 4"),
    (_infinite_count, "customer 'C4' .* NaN or infinite value in counts"),
])
def test_write_user_part_refuses_a_bad_frame_by_part(store, spoil, message):
    version = new_version(START)
    frame = pd.DataFrame({"customer_id": [f"C{i}" for i in range(6)],
                          "items": [[0, 1], [2, 3], [4], [5], [6], [7]],
                          "counts": [[1.0, 1.0], [1.0, 2.0], [3.0], [1.0], [1.0], [1.0]],
                          "factors": [[0.5] * 4 for _ in range(6)]})
    store.write_user_part(version, 0, frame.copy())
    with pytest.raises(ModelStoreError, match=f"user part users/part-00003.parquet of version {version} to "
                                              f".*: the frame .*{message}"):
        store.write_user_part(version, 3, spoil(frame))
    assert [p.name for p in (_version_dir(store, version) / "users").iterdir()] == ["part-00000.parquet"]


def test_write_user_part_refuses_a_complete_version(store):
    inline, parted = make_artifact(70), make_artifact(71)
    store.write(inline)
    write_in_parts(store, parted)
    for artifact in (inline, parted):
        frame = user_frames(artifact, [0, 2])[0]
        with pytest.raises(ModelStoreError, match=f"user part users/part-00009.parquet of version "
                                                  f"{artifact.version}: it already exists .* immutable"):
            store.write_user_part(artifact.version, 9, frame)
        assert not (_version_dir(store, artifact.version) / "users" / "part-00009.parquet").exists()
    assert_identical(store.load(parted.version), parted)


def test_write_with_parts_refuses_what_would_not_load(store):
    artifact = make_artifact(72)
    entries = [store.write_user_part(artifact.version, i, f) for i, f in enumerate(user_frames(artifact, [0, 9, 25]))]
    with pytest.raises(ModelStoreError, match="holds 25 users too"):
        store.write(artifact, user_parts=entries)
    with pytest.raises(ModelStoreError, match="a model needs its users"):
        store.write(item_side(artifact), user_parts=[])
    with pytest.raises(ModelStoreError, match="is listed twice"):
        store.write(item_side(artifact), user_parts=[entries[0], entries[0]])
    with pytest.raises(ModelStoreError, match="sha256 'abc' is not 64 hex digits"):
        store.write(item_side(artifact), user_parts=[{**entries[0], "sha256": "abc"}])
    (_version_dir(store, artifact.version) / "users" / "part-00001.parquet").unlink()
    with pytest.raises(ModelStoreError, match="users/part-00001.parquet does not exist"):
        store.write(item_side(artifact), user_parts=entries)
    assert store.list_versions() == []


def test_a_writer_that_died_between_parts_and_metadata_leaves_an_incomplete_version(store):
    done, died = make_artifact(73), make_artifact(74)
    write_in_parts(store, done)
    for part, frame in enumerate(user_frames(died, [0, 5, 25])):
        store.write_user_part(died.version, part, frame)
    assert store.list_versions() == [done.version]
    with pytest.raises(ModelLoadError, match=f"version {died.version} is missing or incomplete"):
        store.load(died.version)
    with pytest.raises(ModelLoadError, match="refusing to make version"):
        store.set_current(died.version)


def test_prune_deletes_a_version_in_parts_completely(store):
    old, middle, new = make_artifact(75), make_artifact(76), make_artifact(77)
    for artifact in (old, middle, new):
        write_in_parts(store, artifact)
        store.set_current(artifact.version)
    assert store.prune(keep=0, dry_run=False) == [old.version]
    assert not _version_dir(store, old.version).exists()
    assert store.list_versions() == [middle.version, new.version]
    assert_identical(store.load(), new)


def test_the_fingerprint_sees_the_parts(store):
    artifact = make_artifact(78)
    entries = write_in_parts(store, artifact)
    before = store.version_fingerprint(artifact.version)
    assert [name for name, _ in before] == sorted(["item_factors.npy", "items.parquet", "metadata.json",
                                                   *(e["name"] for e in entries)])
    assert all(tag for _, tag in before)
    path = _version_dir(store, artifact.version) / "users" / "part-00002.parquet"
    path.write_bytes(path.read_bytes())                 # rewritten in place: a new file
    assert store.version_fingerprint(artifact.version) != before


def test_a_newer_format_is_refused_by_name(store):
    artifact = make_artifact(79)
    write_in_parts(store, artifact)
    _rewrite_metadata(_version_dir(store, artifact.version), format_version=3)
    with pytest.raises(ModelLoadError, match="format_version 3 .* newer release .* upgrade this reader"):
        store.load(artifact.version)


def _part_listed_twice(metadata: dict) -> None:
    metadata["user_parts"].append(metadata["user_parts"][0])


def _part_not_listed(metadata: dict) -> None:
    metadata["user_parts"].pop()


def _users_miscounted(metadata: dict) -> None:
    metadata["n_users"] += 1


def _format_1_with_parts(metadata: dict) -> None:
    metadata["format_version"] = 1


@pytest.mark.parametrize("tamper, message", [
    (_part_listed_twice, "files .* are not the item files .* plus each user part once"),
    (_part_not_listed, "files .* are not the item files .* plus each user part once"),
    (_users_miscounted, "n_users 26 differs from the 25 rows of its user parts"),
    (_format_1_with_parts, "format_version 1 cannot list user_parts"),
])
def test_a_parts_listing_that_does_not_add_up_is_refused(store, tamper, message):
    artifact = make_artifact(81)
    write_in_parts(store, artifact)
    path = _version_dir(store, artifact.version) / "metadata.json"
    metadata = json.loads(path.read_text())
    tamper(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match=f"refusing .* current .*metadata.json.*: {message}"):
        store.set_current(artifact.version)


def test_the_write_line_counts_users_and_parts(store, caplog):
    caplog.set_level(logging.INFO, logger="models.store")
    artifact = make_artifact(80)
    write_in_parts(store, artifact)
    assert "(als: 40 items, 25 users in 3 parts, rank 4)" in caplog.text
