"""The bytes of a model version: its files, metadata.json and the user parts (layout: models.store).

Pure functions between an artifact and bytes; the store does the I/O and names the files in its
errors. A problem is a ValueError; a PartError also names the part file it is about.
"""
from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from models.artifact import MODEL_TYPES_WITH_FACTORS, ModelArtifact, ModelValidationError, utc_now_iso

FORMAT_INLINE = 1       # the users in users.parquet, user_items.parquet, user_factors.npy (one writer)
FORMAT_PARTS = 2        # the users in users/part-NNNNN.parquet, each written where it was computed
FORMAT_VERSION = FORMAT_PARTS      # the newest format this code writes and reads
ITEM_FILES = ("item_factors.npy", "items.parquet")
NEIGHBOURS_FILE = "item_neighbours.parquet"   # item-kNN versions only: the neighbour table's cells
USERS_DIR = "users"
PART_COLUMNS = ("customer_id", "items", "counts", "factors")
MAX_PART = 99_999                  # part numbers have 5 digits
PART_NAME = re.compile(rf"^{USERS_DIR}/part-[0-9]{{5}}\.parquet$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PartError(ValueError):
    """A user part that cannot be used; ``name`` is its file name in the version folder."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


@dataclass
class UserBlock:
    """Consecutive users (one part, or all of them): ids, their purchase CSR and their factors."""

    ids: np.ndarray          # str [n]
    indptr: np.ndarray       # int64 [n + 1]
    indices: np.ndarray      # int32
    counts: np.ndarray       # float32
    factors: np.ndarray      # float32 [n, rank]


def part_name(part: int) -> str:
    return f"{USERS_DIR}/part-{part:05d}.parquet"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- writing ------------------------------------------------------------------------------------
def encode_files(artifact: ModelArtifact, with_users: bool = True) -> dict[str, bytes]:
    """The version's files but metadata.json; without ``with_users`` the item side only."""
    import pandas as pd

    files = {
        "item_factors.npy": _npy(artifact.item_factors),
        "items.parquet": _parquet(pd.DataFrame({"item_index": np.arange(artifact.n_items, dtype=np.int32),
                                                "product_id": artifact.item_ids,
                                                "popularity": artifact.popularity})),
    }
    if artifact.item_neighbours is not None:
        table = artifact.item_neighbours.tocoo()
        files[NEIGHBOURS_FILE] = _parquet(pd.DataFrame({"item_index": table.row.astype(np.int32),
                                                        "neighbour_index": table.col.astype(np.int32),
                                                        "weight": table.data.astype(np.float32)}))
    if with_users:
        indptr, indices, counts = artifact.user_items
        user_of_entry = np.repeat(np.arange(artifact.n_users, dtype=np.int32), np.diff(indptr))
        files["user_factors.npy"] = _npy(artifact.user_factors)
        files["users.parquet"] = _parquet(pd.DataFrame({"user_index": np.arange(artifact.n_users, dtype=np.int32),
                                                        "customer_id": artifact.user_ids}))
        files["user_items.parquet"] = _parquet(pd.DataFrame({"user_index": user_of_entry, "item_index": indices,
                                                             "count": counts}))
    return files


def build_metadata(artifact: ModelArtifact, files: dict[str, bytes], parts: list[dict] | None = None) -> dict:
    """metadata.json; with ``parts`` (write_user_part entries) the users are those parts' (format 2).

    Inline versions keep format 1: their layout is unchanged, so readers of format 1 still read them."""
    entries = {name: {"size": len(data), "sha256": sha256(data)} for name, data in files.items()}
    metadata = {
        "format_version": FORMAT_INLINE if parts is None else FORMAT_PARTS,
        "version": artifact.version, "model_type": artifact.model_type, "params": artifact.params,
        "cutoff_time": artifact.cutoff_time, "stats": artifact.stats, "metrics": artifact.metrics,
        "created_at": artifact.created_at, "lineage": artifact.lineage,
        "n_items": artifact.n_items, "n_users": artifact.n_users, "rank": artifact.rank, "files": entries,
    }
    if parts is not None:
        entries.update({p["name"]: {k: p[k] for k in ("size", "sha256", "rows")} for p in parts})
        metadata["user_parts"] = [p["name"] for p in parts]
        metadata["n_users"] = sum(p["rows"] for p in parts)
    return metadata


def encode_part(frame) -> tuple[bytes, int]:
    """Parquet bytes and row count of a user part (columns PART_COLUMNS); ValueError says what is wrong.

    Written with pyarrow from fixed types, so the same frame always gives the same bytes (a retried
    task rewrites its part identically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [str(c) for c in frame.columns]
    if sorted(columns) != sorted(PART_COLUMNS):
        raise ValueError(f"has columns {columns}, expected exactly {list(PART_COLUMNS)}")
    arrays = [_string_column(frame["customer_id"]), _list_column(frame["items"], "items", pa.int32()),
              _list_column(frame["counts"], "counts", pa.float32()),
              _list_column(frame["factors"], "factors", pa.float32())]
    table = pa.Table.from_arrays(arrays, names=list(PART_COLUMNS))
    _block(table, rank=None, n_items=None)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue(), table.num_rows


def part_entry_problem(entry) -> str | None:
    """What is wrong with a part's entry ({"name", "size", "sha256", "rows"}), or None."""
    if not isinstance(entry, dict):
        return f"{entry!r} is not a dict returned by ModelStore.write_user_part"
    name = entry.get("name")
    if not isinstance(name, str) or not PART_NAME.match(name):
        return f"name {name!r} is not users/part-NNNNN.parquet"
    for key in ("size", "rows"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name}: {key} {value!r} is not a whole number >= 0"
    if not isinstance(entry.get("sha256"), str) or not SHA256.match(entry["sha256"]):
        return f"{name}: sha256 {entry.get('sha256')!r} is not 64 hex digits"
    return None


def user_parts_problem(entries) -> str | None:
    """What is wrong with the list of part entries given to ``ModelStore.write``, or None."""
    if not isinstance(entries, list) or not entries:
        return f"user_parts {entries!r} is no list of part entries: a model needs its users " \
               "(pass None to write them inline)"
    for entry in entries:
        problem = part_entry_problem(entry)
        if problem:
            return problem
    names = [entry["name"] for entry in entries]
    return f"a part is listed twice in {names}" if len(set(names)) != len(names) else None


def metadata_problem(metadata: dict) -> str | None:
    """What makes metadata.json unreadable by this code (format, parts listing), or None."""
    fmt = metadata.get("format_version", FORMAT_INLINE)
    if fmt not in (FORMAT_INLINE, FORMAT_PARTS):
        return (f"format_version {fmt!r} is not one this reader knows (1 or {FORMAT_VERSION}): it was "
                "written by a newer release of the model store; upgrade this reader")
    parts = metadata.get("user_parts")
    if fmt == FORMAT_INLINE:
        return None if parts is None else "format_version 1 cannot list user_parts"
    if not isinstance(parts, list) or not parts:
        return "format_version 2 needs a non-empty user_parts list"
    files = metadata["files"]
    for name in parts:
        entry = files.get(name)
        problem = part_entry_problem({**entry, "name": name}) if isinstance(entry, dict) else \
            f"user part {name!r} has no entry in files"
        if problem:
            return problem
    if len(set(parts)) != len(parts) or set(files) - {NEIGHBOURS_FILE} != set(ITEM_FILES) | set(parts):
        return f"files {sorted(files)} are not the item files {list(ITEM_FILES)} plus each user part once"
    rows = sum(files[name]["rows"] for name in parts)
    if metadata.get("n_users") != rows:
        return f"n_users {metadata.get('n_users')!r} differs from the {rows} rows of its user parts"
    return None


# -- reading --------------------------------------------------------------------------------------
def decode(metadata: dict, read: Callable[[str], bytes]) -> ModelArtifact:
    """The artifact (not yet validated); ``read(name)`` returns a file's verified bytes.

    A version with parts is read one part at a time, concatenated in the listed order, so it
    equals the inline version of the same content."""
    items = decode_item_side(metadata, read)
    parts = metadata.get("user_parts")
    if parts is None:
        users = _inline_users(read)
    else:
        users = concat_blocks([decode_part(read(n), n, items.rank, items.n_items, metadata["files"][n]["rows"])
                               for n in parts], items.rank)
    return replace(items, user_ids=users.ids, user_factors=users.factors, user_items_indptr=users.indptr,
                   user_items_indices=users.indices, user_items_counts=users.counts)


def decode_item_side(metadata: dict, read: Callable[[str], bytes]) -> ModelArtifact:
    """The artifact with its items and no users."""
    import pandas as pd

    items = pd.read_parquet(io.BytesIO(read("items.parquet"))).sort_values("item_index")
    item_factors = _load_npy(read("item_factors.npy"))
    rank = item_factors.shape[1] if item_factors.ndim == 2 else 0
    neighbours = None
    if NEIGHBOURS_FILE in metadata["files"]:
        from models.neighbours import from_triplets

        cells = pd.read_parquet(io.BytesIO(read(NEIGHBOURS_FILE)))
        neighbours = from_triplets(cells["item_index"].to_numpy(), cells["neighbour_index"].to_numpy(),
                                   cells["weight"].to_numpy(), len(items))
    return ModelArtifact(item_neighbours=neighbours,
        version=metadata["version"], model_type=metadata["model_type"],
        item_ids=items["product_id"].to_numpy(), item_factors=item_factors,
        user_ids=np.zeros(0, dtype=str), user_factors=np.zeros((0, rank), dtype=np.float32),
        popularity=items["popularity"].to_numpy(np.float64),
        params=metadata.get("params") or {}, cutoff_time=metadata.get("cutoff_time"),
        stats=metadata.get("stats") or {}, metrics=metadata.get("metrics") or {},
        created_at=metadata.get("created_at") or utc_now_iso(), lineage=metadata.get("lineage") or {})


def decode_part(data: bytes, name: str, rank: int, n_items: int, rows: int) -> UserBlock:
    """One part, checked on its own (schema, rows, item indices, factor length, repeated ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise PartError(name, f"is not readable parquet ({err})") from None
    if table.num_rows != rows:
        raise PartError(name, f"holds {table.num_rows} customers where metadata.json says {rows}")
    try:
        return _block(table, rank, n_items)
    except ValueError as err:
        raise PartError(name, str(err)) from None


def verify_parts(metadata: dict, read: Callable[[str], bytes]) -> None:
    """Check a version with parts without gathering it: one part in memory at a time.

    Customer ids repeated across parts are found through 8-byte hashes of every id (200 MB for 25
    million customers, not a set of strings), then confirmed on the ids of the parts that share a
    hash; the writer's partitioning by customer should make this impossible, but a bug there would
    give one customer two rows and the stream a wrong history, so it is checked, not assumed."""
    items = decode_item_side(metadata, read).validate()
    names, rows = metadata["user_parts"], [metadata["files"][n]["rows"] for n in metadata["user_parts"]]
    hashes, any_factor = [], False
    for name, n in zip(names, rows):
        block = decode_part(read(name), name, items.rank, items.n_items, n)
        hashes.append(_hashes(block.ids))
        any_factor = any_factor or bool(np.any(block.factors))
    repeated = _repeated_id(names, hashes,
                            lambda i: decode_part(read(names[i]), names[i], items.rank, items.n_items, rows[i]).ids)
    if repeated:
        customer, first, second = repeated
        raise PartError(second, f"repeats customer {customer!r} of {first}: each customer must be in one part "
                                "(partition the users by customer_id)")
    if items.model_type in MODEL_TYPES_WITH_FACTORS and sum(rows) and items.rank and not any_factor:
        raise ModelValidationError(f"invalid model artifact: user_factors are all zero: the {items.model_type!r} "
                                   "model would rank every product alike; the training failed; retrain")


def concat_blocks(blocks: list[UserBlock], rank: int) -> UserBlock:
    if not blocks:
        return UserBlock(np.zeros(0, dtype=str), np.zeros(1, np.int64), np.zeros(0, np.int32),
                         np.zeros(0, np.float32), np.zeros((0, rank), np.float32))
    starts = np.cumsum([0] + [b.indptr[-1] for b in blocks[:-1]])
    return UserBlock(
        ids=np.concatenate([b.ids for b in blocks]),
        indptr=np.concatenate([[0]] + [b.indptr[1:] + s for b, s in zip(blocks, starts)]).astype(np.int64),
        indices=np.concatenate([b.indices for b in blocks]).astype(np.int32),
        counts=np.concatenate([b.counts for b in blocks]).astype(np.float32),
        factors=np.concatenate([b.factors for b in blocks]).astype(np.float32))


# -- helpers --------------------------------------------------------------------------------------
def _inline_users(read: Callable[[str], bytes]) -> UserBlock:
    import pandas as pd

    users = pd.read_parquet(io.BytesIO(read("users.parquet"))).sort_values("user_index")
    pairs = pd.read_parquet(io.BytesIO(read("user_items.parquet")))
    n_users = len(users)
    user_of_entry = pairs["user_index"].to_numpy(np.int64)
    if len(user_of_entry) and (np.any(np.diff(user_of_entry) < 0) or user_of_entry.max() >= n_users):
        raise ValueError("user_items.parquet rows are not grouped by a known user_index in order")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(user_of_entry, minlength=n_users))])
    return UserBlock(users["customer_id"].to_numpy(), indptr, pairs["item_index"].to_numpy(np.int32),
                     pairs["count"].to_numpy(np.float32), _load_npy(read("user_factors.npy")))


def _block(table, rank: int | None, n_items: int | None) -> UserBlock:
    """A part's table as arrays, or ValueError naming the customer; ``rank`` None: any one length."""
    import pandas as pd
    import pyarrow as pa

    expected = {"customer_id": (pa.string(),), "items": (pa.list_(pa.int32()),),
                "counts": (pa.list_(pa.float32()),), "factors": (pa.list_(pa.float32()),)}
    found = {f.name: f.type for f in table.schema}
    if list(found) != list(PART_COLUMNS) or any(found[c] not in expected[c] for c in PART_COLUMNS):
        raise ValueError(f"has schema {found}, expected {({c: str(t[0]) for c, t in expected.items()})}")
    columns = {c: table.column(c).combine_chunks() for c in PART_COLUMNS}
    for column, array in columns.items():
        nulls = array.null_count + (array.flatten().null_count if column != "customer_id" else 0)
        if nulls:
            raise ValueError(f"has {nulls} missing values in {column} (use an empty list for none)")
    ids = columns["customer_id"].to_numpy(zero_copy_only=False)
    offsets = {c: np.asarray(columns[c].offsets, dtype=np.int64) for c in PART_COLUMNS[1:]}
    offsets = {c: o - o[0] for c, o in offsets.items()}
    values = {c: columns[c].flatten().to_numpy(zero_copy_only=False) for c in PART_COLUMNS[1:]}

    def fail(row: int, problem: str):
        raise ValueError(f"customer {ids[row]!r} (row {row}) {problem}")

    differ = np.flatnonzero(offsets["items"] != offsets["counts"])
    if len(differ):
        row = max(int(differ[0]) - 1, 0)
        fail(row, f"has {len(values['items'][offsets['items'][row]:offsets['items'][row + 1]])} items "
                  f"but {len(values['counts'][offsets['counts'][row]:offsets['counts'][row + 1]])} counts")
    lengths = np.diff(offsets["factors"])
    width = rank if rank is not None else (int(lengths[0]) if len(lengths) else 0)
    if np.any(lengths != width):
        row = int(np.flatnonzero(lengths != width)[0])
        fail(row, f"has {lengths[row]} factors where " +
             (f"the model's rank is {rank}" if rank is not None else f"row 0 has {width}"))
    entry_row = np.repeat(np.arange(len(ids)), np.diff(offsets["items"]))
    outside = (values["items"] < 0) | (values["items"] >= (n_items if n_items is not None else np.inf))
    if np.any(outside):
        index = int(np.flatnonzero(outside)[0])
        fail(int(entry_row[index]), f"has item index {values['items'][index]}: item indices are positions "
                                    f"in items.parquet, 0 to {'n_items - 1' if n_items is None else n_items - 1}")
    for column, row_of in (("counts", entry_row), ("factors", np.repeat(np.arange(len(ids)), lengths))):
        bad = ~np.isfinite(values[column])
        if np.any(bad):
            fail(int(row_of[np.flatnonzero(bad)[0]]), f"has a NaN or infinite value in {column}")
    repeated = pd.Index(ids).duplicated()
    if repeated.any():
        fail(int(np.flatnonzero(repeated)[0]), "appears more than once in the part")
    factors = values["factors"].astype(np.float32).reshape(len(ids), width)
    return UserBlock(ids, offsets["items"], values["items"].astype(np.int32), values["counts"].astype(np.float32),
                     factors)


def _string_column(series):
    import pyarrow as pa

    array = pa.array(series, from_pandas=False) if len(series) else pa.array([], type=pa.string())
    if pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    if not pa.types.is_string(array.type):
        raise ValueError(f"column 'customer_id' must hold strings, got {array.type}")
    return array


def _list_column(series, column: str, value_type):
    """``series`` as list<value_type>; the type is inferred first, so 1.5 is refused as an item
    index instead of being truncated to 1."""
    import pyarrow as pa

    if not len(series):                 # an empty frame's columns carry no list type
        return pa.array([], type=pa.list_(value_type))
    try:
        array = pa.array(series, from_pandas=False)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise ValueError(f"column {column!r} cannot be read as lists of {value_type}: {err}") from None
    if pa.types.is_null(array.type):
        return array.cast(pa.list_(value_type))
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)):
        raise ValueError(f"column {column!r} must hold lists, got {array.type}")
    inner = array.type.value_type
    allowed = pa.types.is_integer if pa.types.is_integer(value_type) else \
        (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t))
    if not (pa.types.is_null(inner) or allowed(inner)):
        raise ValueError(f"column {column!r} must hold lists of {value_type}, got {array.type}")
    try:
        return array.cast(pa.list_(value_type))
    except pa.ArrowException as err:
        raise ValueError(f"column {column!r} does not fit lists of {value_type}: {err}") from None


def _hashes(ids: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


def _repeated_id(names: list[str], hashes: list[np.ndarray],
                 ids_of: Callable[[int], np.ndarray]) -> tuple[str, str, str] | None:
    """(customer, first part, second part) of an id in two parts, or None; ``ids_of(i)`` re-reads
    part i, needed only for the parts that share a hash (a real repeat or a rare collision)."""
    every = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    shared = np.unique(every[1:][every[1:] == every[:-1]])
    seen: dict[str, str] = {}
    for i, part_hashes in enumerate(hashes):
        mask = np.isin(part_hashes, shared)
        if not np.any(mask):
            continue
        for customer in ids_of(i)[mask]:
            if customer in seen:
                return str(customer), seen[customer], names[i]
            seen[customer] = names[i]
    return None


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _parquet(frame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
