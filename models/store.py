"""The versioned model store: a local folder or ``s3://bucket/prefix``.

Layout under the root::

    versions/<version>/item_factors.npy    float32 [n_items, rank]
                       items.parquet       item_index, product_id, popularity
                       (format 1: the users written inline by one process, ``write(artifact)``)
                       user_factors.npy    float32 [n_users, rank]
                       users.parquet       user_index, customer_id
                       user_items.parquet  user_index, item_index, count (grouped by user, in order)
                       (format 2: the users in parts, each written where it was computed,
                       ``write_user_part``, then ``write(item_side, user_parts=entries)``)
                       users/part-00000.parquet ...   customer_id str, items list<int32>,
                                          counts list<float32>, factors list<float32> (rank values)
                       metadata.json
                       published.json (once made current: {"version", "published_at"})
    CURRENT            {"version": ..., "published_at": ...}

``metadata.json`` is written last and lists every other file with its size and sha256 (a part
also with its ``rows``), so a version whose writer died half-way (some parts, no metadata) is
recognisable as incomplete. Format 2 adds ``"user_parts": [names]``: user index = position in
the parts concatenated in that order, so it loads to exactly the artifact of an inline version;
``n_users`` is the sum of their rows. Inline versions are still written as format 1 (a format-1
reader reads them); this reader reads both and refuses a newer format by name.

``set_current`` verifies a version before switching the pointer (an inline one by loading it, one
with parts file by file, never holding more than one part), and switches it in one step (rename
locally, one PutObject on S3), so readers see either the old or the new model, never a broken one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from models.artifact import VERSION_PATTERN, ModelArtifact, ModelValidationError, utc_now_iso
from models.config import resolve_path
from models.scorers import needs_vectors
from models.store_format import (
    FORMAT_VERSION,  # noqa: F401 - re-exported: the newest format read
    MAX_PART,
    USERS_DIR,
    PartError,
    build_metadata,
    decode,
    encode_files,
    encode_part,
    metadata_problem,
    part_name,
    sha256,
    user_parts_problem,
    verify_parts,
)

log = logging.getLogger(__name__)

METADATA = "metadata.json"
POINTER = "CURRENT"
PUBLISHED = "published.json"     # written into a version's folder when it is made current
VERSIONS = "versions"


class ModelStoreError(RuntimeError):
    """The store cannot be read or written (missing bucket, permissions, an existing version)."""


class ModelLoadError(ModelStoreError):
    """A version that cannot be used: missing, incomplete, corrupted or inconsistent."""


# -- backends ---------------------------------------------------------------------------------
class LocalBackend:
    """Files under a folder; every write is a temp file renamed into place."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Names of the entries directly under ``prefix`` (files and folders)."""
        folder = self.root / prefix
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def tag(self, key: str) -> str | None:
        try:
            stat = (self.root / key).stat()
        except FileNotFoundError:
            return None
        return f"{stat.st_mtime_ns}-{stat.st_size}-{stat.st_ino}"

    def delete(self, prefix: str) -> None:
        """Remove the file ``prefix`` or the folder ``prefix`` with everything under it."""
        path = self.root / prefix
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class S3Backend:
    """Objects under ``s3://bucket/prefix`` through boto3."""

    def __init__(self, bucket: str, prefix: str, client):
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        response = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return None if response is None else response["Body"].read()

    def exists(self, key: str) -> bool:
        return self.tag(key) is not None

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix).rstrip("/") + "/"
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        for page in self._call("list", prefix, lambda: list(pages)) or []:
            names.update(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(base):] for o in page.get("Contents", []))
        return sorted(n for n in names if n)

    def tag(self, key: str) -> str | None:
        response = self._call("read", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return None if response is None else response["ETag"]

    def delete(self, prefix: str) -> None:
        """Remove the object ``prefix`` and every object under ``prefix/``."""
        key = self._key(prefix).rstrip("/")
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=key + "/")
        keys = [key] + [o["Key"] for page in self._call("list", prefix, lambda: list(pages)) or []
                        for o in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):      # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            response = self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket,
                                  Delete={"Objects": batch, "Quiet": True}) or {}
            if response.get("Errors"):
                error = response["Errors"][0]
                raise ModelStoreError(f"cannot delete s3://{self.bucket}/{error.get('Key')}: "
                                      f"{error.get('Code')} {error.get('Message')}")

    def _call(self, action: str, key: str, method, **kwargs):
        """Run a boto3 call; a missing object is None, every other failure a ModelStoreError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(**kwargs)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code == "NoSuchBucket":
                raise ModelStoreError(f"bucket {self.bucket!r} does not exist ({self.describe(key)}): "
                                      "create it or fix model_store.uri") from err
            raise ModelStoreError(f"cannot {action} {self.describe(key)}: {code} {err}; check the "
                                  "credentials and model_store.s3_endpoint_url") from err
        except BotoCoreError as err:
            raise ModelStoreError(f"cannot {action} {self.describe(key)}: {err}; is the S3 endpoint "
                                  "reachable (model_store.s3_endpoint_url)?") from err


# -- the store --------------------------------------------------------------------------------
class ModelStore:
    """Write, verify, publish and load model versions (see the module docstring)."""

    def __init__(self, uri: str, s3_client=None):
        self.uri = str(uri)
        if self.uri.startswith("s3://"):
            bucket, _, prefix = self.uri[len("s3://"):].partition("/")
            if not bucket:
                raise ModelStoreError(f"model store uri {self.uri!r} names no bucket: use s3://bucket/prefix")
            if s3_client is None:
                import boto3
                s3_client = boto3.client("s3")
            self.backend = S3Backend(bucket, prefix, s3_client)
        else:
            path = self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri
            self.backend = LocalBackend(Path(path))

    @classmethod
    def from_config(cls, cfg) -> ModelStore:
        """The store at ``model_store.uri`` (a folder, relative to the repository, or s3://)."""
        uri = cfg.text("model_store.uri")
        if uri.startswith("s3://"):
            from models.clients import s3_client
            return cls(uri, s3_client(cfg))
        return cls(str(resolve_path(uri[len("file://"):] if uri.startswith("file://") else uri)))

    def __repr__(self) -> str:
        return f"ModelStore({self.uri!r})"

    # -- writing ---------------------------------------------------------------------------
    def write(self, artifact: ModelArtifact, user_parts: list[dict] | None = None) -> str:
        """Write a new version (metadata last); an existing complete version is never replaced.

        With ``user_parts`` (the entries ``write_user_part`` returned, in user order) the artifact
        carries the item side only and the users are those parts: nothing user-sized passes through
        this process. Their content is checked by ``set_current`` (``verify``), not here."""
        try:
            artifact.validate()
        except ModelValidationError as err:
            raise ModelStoreError(f"refusing to write version {artifact.version!r} to {self.uri}: {err}") from err
        folder = self._writable_folder(artifact.version, "version")
        parts = None if user_parts is None else self._checked_parts(artifact, user_parts)
        files = encode_files(artifact, with_users=parts is None)
        for name, data in files.items():
            self.backend.put_bytes(f"{folder}/{name}", data)
        metadata = build_metadata(artifact, files, parts)
        self.backend.put_bytes(f"{folder}/{METADATA}", json.dumps(metadata, indent=2, sort_keys=True).encode())
        users = f"{metadata['n_users']} users" + ("" if parts is None else f" in {len(parts)} parts")
        log.info("model version %s written to %s (%s: %d items, %s%s)", artifact.version,
                 self.backend.describe(folder), artifact.model_type, artifact.n_items, users,
                 f", rank {artifact.rank}" if needs_vectors(artifact.model_type) else "")
        return artifact.version

    def write_user_part(self, version: str, part: int, frame) -> dict:
        """Write part ``part`` of ``version``'s users; returns its entry for ``write(..., user_parts)``.

        Meant to run where the part was computed (a Spark task building its own store), so the
        users are never gathered on the driver. ``frame`` (pandas) has the columns customer_id
        (str), items (lists of item indices), counts (lists, as long as items) and factors (lists of
        rank values, empty for rank 0). A retried task rewrites its part with the same bytes."""
        if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part <= MAX_PART:
            raise ValueError(f"user part number {part!r} must be a whole number from 0 to {MAX_PART}")
        name = part_name(part)
        folder = self._writable_folder(version, f"user part {name} of version")
        try:
            data, rows = encode_part(frame)
        except ValueError as err:
            raise ModelStoreError(f"refusing to write user part {name} of version {version} to {self.uri}: "
                                  f"the frame {err}; fix the task that computed it") from None
        self.backend.put_bytes(f"{folder}/{name}", data)
        return {"name": name, "size": len(data), "sha256": sha256(data), "rows": rows}

    def _writable_folder(self, version: str, what: str) -> str:
        """The folder of ``version``, refused when the name is unusable or the version is complete."""
        if not isinstance(version, str) or not VERSION_PATTERN.match(version):
            raise ModelStoreError(f"cannot write {what} {version!r}: a version is 1-128 letters, digits, '.', "
                                  "'_' or '-' (use models.artifact.new_version())")
        folder = f"{VERSIONS}/{version}"
        if self.backend.exists(f"{folder}/{METADATA}"):
            raise ModelStoreError(f"cannot write {what} {version}: it already exists at "
                                  f"{self.backend.describe(folder)}: versions are immutable, "
                                  "write the model under a new version (models.artifact.new_version())")
        return folder

    def _checked_parts(self, artifact: ModelArtifact, user_parts: list[dict]) -> list[dict]:
        refuse = f"refusing to write version {artifact.version} to {self.uri} with user parts:"
        if artifact.n_users or len(artifact.user_items_indices):
            raise ModelStoreError(f"{refuse} the artifact holds {artifact.n_users} users too; give it the "
                                  "item side only (empty user_ids) or write it without user_parts")
        problem = user_parts_problem(user_parts)
        if problem:
            raise ModelStoreError(f"{refuse} {problem}")
        for entry in user_parts:
            key = f"{VERSIONS}/{artifact.version}/{entry['name']}"
            if not self.backend.exists(key):
                raise ModelStoreError(f"{refuse} {self.backend.describe(key)} does not exist: the task that "
                                      "wrote it failed or wrote another version; rerun the job")
        return [dict(entry) for entry in user_parts]

    def set_current(self, version: str) -> None:
        """Make ``version`` current after verifying it completely; the switch is one atomic write."""
        try:
            self.verify(version)
        except ModelLoadError as err:
            raise ModelLoadError(f"refusing to make version {version} current in {self.uri}: {err}") from err
        pointer = {"version": version, "published_at": utc_now_iso()}
        # The version's own record that it was published (the gate may have written versions it
        # refused): the streaming job falls back only to such versions.
        self.backend.put_bytes(f"{VERSIONS}/{version}/{PUBLISHED}", json.dumps(pointer).encode())
        self.backend.put_bytes(POINTER, json.dumps(pointer).encode())
        log.info("model version %s is now current in %s", version, self.uri)

    def publish(self, artifact: ModelArtifact) -> str:
        """``write`` then ``set_current``; returns the version."""
        version = self.write(artifact)
        self.set_current(version)
        return version

    # -- reading ---------------------------------------------------------------------------
    def current_pointer(self) -> dict | None:
        """The CURRENT pointer ({"version", "published_at"}), or None before the first publish."""
        raw = self.backend.get_bytes(POINTER)
        if raw is None:
            return None
        try:
            pointer = json.loads(raw)
            str(pointer["version"])
        except (ValueError, TypeError, KeyError):
            raise ModelLoadError(f"the current-model pointer {self.backend.describe(POINTER)} is not valid "
                                 "JSON with a 'version': publish a model again to rewrite it") from None
        return pointer

    def current_version(self) -> str | None:
        pointer = self.current_pointer()
        return None if pointer is None else str(pointer["version"])

    def current_pointer_etag(self) -> str | None:
        """A cheap tag of the pointer (no download) that changes whenever a model is published."""
        return self.backend.tag(POINTER)

    def list_versions(self) -> list[str]:
        """Versions with metadata (oldest first: names sort by creation time)."""
        return sorted(v for v in self.backend.list(VERSIONS)
                      if self.backend.exists(f"{VERSIONS}/{v}/{METADATA}"))

    def published_versions(self) -> list[str]:
        """Versions that were made current at some point (oldest first), whether or not they still are."""
        return [v for v in self.list_versions() if self.backend.exists(f"{VERSIONS}/{v}/{PUBLISHED}")]

    def history(self) -> list[dict]:
        """Every published version as its published.json ({"version", "published_at"}), the most
        recently published first (a version made current again counts at its latest publish)."""
        entries = []
        for version in self.published_versions():
            raw = self.backend.get_bytes(f"{VERSIONS}/{version}/{PUBLISHED}")
            try:
                published_at = str(json.loads(raw or b"{}").get("published_at") or "")
            except (ValueError, AttributeError):
                published_at = ""
            entries.append({"version": version, "published_at": published_at})
        return sorted(entries, key=lambda e: (e["published_at"], e["version"]), reverse=True)

    def previous_published(self, version: str) -> str | None:
        """The newest published version created before ``version`` (the rollback target), or None.

        By creation order, not publish time, so that rolling back twice goes two versions back
        instead of toggling between the last two."""
        older = [v for v in self.published_versions() if v < version]
        return older[-1] if older else None

    def prune(self, keep: int, dry_run: bool = True) -> list[str]:
        """Delete old versions; returns those deleted (or, with ``dry_run``, those that would be).

        Never deleted: the current version, the version a rollback would go to, the ``keep`` most
        recently published versions, and any version created after the current one (a candidate
        not yet promoted). Without a current version nothing is deleted."""
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise ValueError(f"keep {keep!r} must be a whole number >= 0")
        current = self.current_version()
        if current is None:
            return []
        kept = {current, self.previous_published(current)}
        kept.update(e["version"] for e in self.history()[:keep])
        doomed = [v for v in self.list_versions() if v < current and v not in kept]
        if dry_run:
            return doomed
        for version in doomed:
            if self.current_version() == version:      # made current meanwhile by someone else
                continue
            folder = f"{VERSIONS}/{version}"
            # metadata.json first: a prune cut short leaves a version that reads as incomplete
            self.backend.delete(f"{folder}/{METADATA}")
            self.backend.delete(folder)
            log.info("model version %s deleted from %s", version, self.uri)
        return doomed

    def version_fingerprint(self, version: str) -> tuple:
        """Cheap tags (no download) of every file of ``version``, its user parts included: they
        change when a file is rewritten."""
        folder = f"{VERSIONS}/{version}"
        names = self.backend.list(folder)
        if USERS_DIR in names:
            names = [n for n in names if n != USERS_DIR] + \
                [f"{USERS_DIR}/{n}" for n in self.backend.list(f"{folder}/{USERS_DIR}")]
        return tuple((name, self.backend.tag(f"{folder}/{name}")) for name in sorted(names))

    def load_metadata(self, version: str) -> dict:
        """The parsed metadata.json of ``version`` (no file verification)."""
        key = f"{VERSIONS}/{version}/{METADATA}"
        raw = self.backend.get_bytes(key)
        if raw is None:
            raise ModelLoadError(f"model version {version} is missing or incomplete: "
                                 f"{self.backend.describe(key)} does not exist")
        try:
            metadata = json.loads(raw)
        except ValueError as err:
            raise ModelLoadError(f"model version {version}: {self.backend.describe(key)} is not valid JSON "
                                 f"({err})") from None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("files"), dict):
            raise ModelLoadError(f"model version {version}: {self.backend.describe(key)} lists no files")
        return metadata

    def load(self, version: str | None = None) -> ModelArtifact:
        """Load and verify ``version`` (None = the current one); ModelLoadError names the problem."""
        if version is None:
            version = self.current_version()
            if version is None:
                raise ModelLoadError(f"no current model in {self.uri}: run the batch job to publish one")
        return self._load(version, self._checked_metadata(version))

    def verify(self, version: str) -> None:
        """Check ``version`` completely (files, checksums, content) without switching anything.

        An inline version is loaded; one with user parts is checked file by file, so the check
        needs its largest part plus 8 bytes per customer, not the whole model, wherever it runs."""
        metadata = self._checked_metadata(version)
        if metadata.get("user_parts") is None:
            self._load(version, metadata)
            return
        with self._decoding(version):
            verify_parts(metadata, self._reader(version, metadata))

    def _load(self, version: str, metadata: dict) -> ModelArtifact:
        if metadata.get("user_parts") is None:     # format 1: every listed file verified up front
            files = {name: self._verified_file(version, name, entry) for name, entry in metadata["files"].items()}
            read: Callable[[str], bytes] = files.__getitem__
        else:                                      # format 2: one file at a time, as decoded
            read = self._reader(version, metadata)
        with self._decoding(version):
            return decode(metadata, read).validate()

    def _checked_metadata(self, version: str) -> dict:
        metadata = self.load_metadata(version)
        if metadata.get("version") != version:
            raise ModelLoadError(f"model version {version} in {self.uri}: its metadata.json names version "
                                 f"{metadata.get('version')!r}; the folder was copied or renamed by hand")
        problem = metadata_problem(metadata)
        if problem:
            raise ModelLoadError(f"model version {version} in {self.uri} cannot be read: its metadata.json "
                                 f"({self.backend.describe(f'{VERSIONS}/{version}/{METADATA}')}): {problem}")
        return metadata

    def _reader(self, version: str, metadata: dict) -> Callable[[str], bytes]:
        return lambda name: self._verified_file(version, name, metadata["files"][name])

    @contextmanager
    def _decoding(self, version: str) -> Iterator[None]:
        """Turn a decoding problem into a ModelLoadError naming the version (and the part)."""
        try:
            yield
        except PartError as err:
            raise ModelLoadError(f"model version {version} in {self.uri} has an unusable user part: "
                                 f"{self.backend.describe(f'{VERSIONS}/{version}/{err.name}')} {err.problem}; "
                                 "fix the writer and publish another version") from None
        except ModelValidationError as err:
            raise ModelLoadError(f"model version {version} in {self.uri} is inconsistent: {err}") from None
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise ModelLoadError(f"model version {version} in {self.uri} cannot be decoded: "
                                 f"{type(err).__name__}: {err}") from None

    def _verified_file(self, version: str, name: str, entry: dict) -> bytes:
        key = f"{VERSIONS}/{version}/{name}"
        data = self.backend.get_bytes(key)
        if data is None:
            raise ModelLoadError(f"model version {version} is incomplete: {self.backend.describe(key)} is "
                                 "missing; publish another version")
        if len(data) != entry.get("size") or sha256(data) != entry.get("sha256"):
            raise ModelLoadError(f"model version {version} is corrupted: {self.backend.describe(key)} has "
                                 f"{len(data)} bytes and a checksum that do not match metadata.json "
                                 f"({entry.get('size')} bytes); publish another version")
        return data
