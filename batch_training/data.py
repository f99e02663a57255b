"""Raw purchase rows -> clean events -> (customer, product) counts -> integer ids for ALS.

Every source (the project's generated sample, UCI Online Retail, Groceries, Olist, a client's
export) reaches the job through a :class:`ColumnMapping`, so none of the code below knows any
dataset's column names. Bad rows are never silently lost: :func:`clean` drops them and counts
each by a stable reason, so an operator can see *why* the job that this product replaced went
from 1.2 M raw rows to 0.9 M.

Stages and the frames they pass on:
- :func:`read_raw`: the source as it is (CSV columns all strings, so a malformed value can be
  counted rather than turned into a null by type inference).
- :func:`clean`: ``customer_id string, product_id string, quantity double, event_time timestamp``.
- :func:`aggregate`: ``customer_id, product_id, count double, last_time timestamp``, one row per pair.
- :func:`index_ids`: ``user int, item int, count double, last_time timestamp`` plus the id maps.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "json")
COUNT_MODES = ("rows", "quantity")
# Longer ids are data errors (the streaming job dead-letters them at the same limit).
MAX_ID_LENGTH = 64
# ALS stores user and item ids as Java ints.
MAX_ALS_ID = 2**31 - 1

# Drop reasons, in the order they are tested: a row is counted under the first that applies.
MISSING_CUSTOMER_ID = "missing_customer_id"
MALFORMED_CUSTOMER_ID = "malformed_customer_id"
MISSING_PRODUCT_ID = "missing_product_id"
MALFORMED_PRODUCT_ID = "malformed_product_id"
NON_NUMERIC_QUANTITY = "non_numeric_quantity"
NEGATIVE_OR_ZERO_QUANTITY = "negative_or_zero_quantity"
UNPARSEABLE_TIME = "unparseable_time"
# data.columns.time_format values for numbers since 1970-01-01 UTC (else: a Spark datetime pattern).
EPOCH_FORMATS = {"epoch_seconds": "timestamp_seconds", "epoch_millis": "timestamp_millis"}
FUTURE_TIME = "future_time"             # the stream's dead-letter reason for the same rule
FILTERED_PREFIX = "filtered: "

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".lz4", ".snappy", ".zst", ".zstd")
_EXTENSION_FORMATS = {".csv": "csv", ".parquet": "parquet",
                      ".json": "json", ".jsonl": "json", ".ndjson": "json"}
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# "17850.0" -> "17850": ids written out by a tool that read them as floats.
_INTEGER_LIKE = r"^(-?[0-9]+)\.0+$"
# Trimmed from both ends of every text value: ASCII whitespace, no-break space, a stray BOM.
_EDGE_WHITESPACE = " \t\n\r\f\u000b\u00a0\ufeff"
_CONTROL_CHARACTER = r"\p{Cc}"


class DataSourceError(ValueError):
    """A source that cannot be read as configured (missing file, unknown format, missing column)."""


@dataclass
class ColumnMapping:
    """Which source columns hold the customer, the product, the quantity and the purchase time.

    ``quantity`` unset means every row is one unit; ``event_time`` unset means the time is
    unknown (``last_time`` is then null). ``time_format`` is a Spark datetime pattern
    (``dd-MM-yyyy``), or ``epoch_seconds`` / ``epoch_millis`` for numbers since 1970 UTC; unset,
    Spark's ISO-8601 parsing is used (``2025-03-04T10:21:07Z``, ``2010-12-01 08:26:00``,
    ``2015-01-05``). ``segment`` (e.g. a country) is checked to exist
    but not used by the job yet.
    """

    customer_id: str
    product_id: str
    quantity: str | None = None
    event_time: str | None = None
    time_format: str | None = None
    segment: str | None = None

    @classmethod
    def from_config(cls, columns: Mapping[str, Any]) -> ColumnMapping:
        """From the ``data.columns`` section; an unknown key or a missing id column is an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(columns) - known)
        if unknown:
            raise DataSourceError(f"data.columns has unknown keys {unknown}: use only {sorted(known)}")
        for required in ("customer_id", "product_id"):
            if not columns.get(required):
                raise DataSourceError(f"data.columns.{required} is not set: name the source column "
                                      f"holding the {required.replace('_', ' ')}")
        if columns.get("time_format") and not columns.get("event_time"):
            raise DataSourceError("data.columns.time_format is set but data.columns.event_time is not: "
                                  "name the time column, or drop the format")
        return cls(**{key: (str(value) if value is not None else None) for key, value in columns.items()})

    def source_columns(self) -> dict[str, str]:
        """``{mapping key: source column}`` of every column the mapping names."""
        names = ("customer_id", "product_id", "quantity", "event_time", "segment")
        return {key: getattr(self, key) for key in names if getattr(self, key)}


@dataclass
class SourceSpec:
    """Where the raw rows are and how to read them (``data.path/format/options/columns``).

    ``format`` None means: from the extension, compression suffixes ignored (``x.csv.gz`` is CSV).
    ``options`` are Spark reader options, passed as they are (e.g. ``sep: ";"``).
    """

    path: str
    columns: ColumnMapping
    format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Mapping[str, Any], path: str | None = None) -> SourceSpec:
        """From a ``data:`` section; ``path`` replaces ``data.path`` (e.g. once resolved)."""
        path = path or data.get("path")
        if not path:
            raise DataSourceError("data.path is not set: give the file or folder of raw transactions")
        return cls(path=str(path), columns=ColumnMapping.from_config(data.get("columns") or {}),
                   format=data.get("format"), options=dict(data.get("options") or {}))

    def resolved_format(self) -> str:
        return source_format(self.path, self.format)


@dataclass
class CleaningReport:
    """How many raw rows came in, how many survived, and why each of the others was dropped."""

    raw_rows: int
    clean_rows: int
    dropped_by_reason: dict[str, int]

    @property
    def dropped_rows(self) -> int:
        return sum(self.dropped_by_reason.values())

    def log_lines(self) -> list[str]:
        lines = [f"raw rows: {self.raw_rows:,}"]
        for reason, count in self.dropped_by_reason.items():
            lines.append(f"dropped {reason}: {count:,} ({_percent(count, self.raw_rows)})")
        lines.append(f"clean rows: {self.clean_rows:,} ({_percent(self.clean_rows, self.raw_rows)} kept)")
        return lines


def read_raw(spark, spec: SourceSpec):
    """The source rows as they are, after checking every mapped column exists.

    CSV is read with a header and every column as a string (type inference would turn a stray
    "abc" quantity into a null nobody counts); JSON primitives are read as strings too unless
    ``primitivesAsString`` is set. Parquet keeps its own types; :func:`clean` copes with both.
    """
    raw = read_table(spark, spec.path, spec.resolved_format(), spec.options)
    check_mapped_columns(raw.columns, spec.columns, spec.path)
    log.info("mapping %s", ", ".join(f"{key}={name}" for key, name in spec.columns.source_columns().items()))
    return raw


def read_table(spark, path: str, format: str | None = None, options: Mapping[str, Any] | None = None):
    """One file, folder or glob (local or ``s3a://``) read as :func:`read_raw` does, without a mapping."""
    fmt = source_format(path, format)
    _check_exists(path)
    texts = {key: _option_text(value) for key, value in (options or {}).items()}
    if fmt == "csv":
        texts = {"header": "true", **texts, "inferSchema": "false"}
    elif fmt == "json":
        texts = {"primitivesAsString": "true", **texts}
    table = spark.read.format(fmt).options(**texts).load(path)
    log.info("reading %s %s: columns %s", fmt, path, table.columns)
    return table


def source_format(path: str, format: str | None = None) -> str:
    """``format`` checked, or the format named by the path's extension (``.csv.gz`` is CSV)."""
    if format:
        if format not in FORMATS:
            raise DataSourceError(f"data.format {format!r} is not supported: use one of {FORMATS}")
        return format
    name = path.rstrip("/").lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    fmt = _EXTENSION_FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise DataSourceError(f"cannot tell the format of {path!r} from its name: "
                              f"set data.format to one of {FORMATS}")
    return fmt


def clean(raw, mapping: ColumnMapping, filters: Sequence[str] = (),
          max_id_length: int = MAX_ID_LENGTH, max_future_skew_ms: int | None = None,
          reference_ms: int | None = None):
    """``(events, CleaningReport)``: valid rows in the standard schema, and the drops by reason.

    ``filters`` are Spark SQL conditions a row must meet (e.g. ``NOT InvoiceNo LIKE 'C%'``); they
    are tested first and a row failing one is counted as ``"filtered: <condition>"`` (a null
    result fails, as in WHERE). Then, in order: a null/empty/blank customer or product id; an id
    over ``max_id_length`` characters or holding a control character (malformed); a quantity
    that is not a finite number or is <= 0 (a missing quantity means 1); with a time column, a
    missing or unparseable time; with ``max_future_skew_ms`` (the stream's
    ``streaming.max_future_skew``), a time more than that after ``reference_ms`` (default: the wall
    clock now), counted as ``future_time``: one row dated 2099 would otherwise become the model's
    cutoff, and the stream ignores every purchase at or before the cutoff. All counts come from
    one aggregation; ``events`` stays lazy (cache ``raw`` first when the source is slow to read twice).
    """
    from pyspark.sql import functions as F

    check_mapped_columns(raw.columns, mapping, "the raw rows")
    types = dict(raw.dtypes)
    customer = _id_text(mapping.customer_id, types[mapping.customer_id])
    product = _id_text(mapping.product_id, types[mapping.product_id])
    quantity = (_quantity(mapping.quantity, types[mapping.quantity]) if mapping.quantity
                else F.lit(1.0))
    event_time = (_event_time(mapping.event_time, types[mapping.event_time], mapping.time_format)
                  if mapping.event_time else F.lit(None).cast("timestamp"))

    checks = [(FILTERED_PREFIX + condition, ~F.coalesce(_condition(raw, condition), F.lit(False)))
              for condition in filters]
    checks += _id_checks(customer, MISSING_CUSTOMER_ID, MALFORMED_CUSTOMER_ID, max_id_length)
    checks += _id_checks(product, MISSING_PRODUCT_ID, MALFORMED_PRODUCT_ID, max_id_length)
    if mapping.quantity:
        checks += [(NON_NUMERIC_QUANTITY, quantity.isNull() | F.isnan(quantity)
                    | (F.abs(quantity) == float("inf"))),
                   (NEGATIVE_OR_ZERO_QUANTITY, quantity <= 0)]
    if mapping.event_time:
        checks.append((UNPARSEABLE_TIME, event_time.isNull()))
        if max_future_skew_ms is not None:
            now_ms = int(time.time() * 1000) if reference_ms is None else reference_ms
            checks.append((FUTURE_TIME, F.unix_millis(event_time.cast("timestamp"))
                           > F.lit(now_ms + max_future_skew_ms)))

    reason = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        reason = F.when(failed, F.lit(name)).otherwise(reason)
    flagged = raw.select(customer.alias("customer_id"), product.alias("product_id"),
                         quantity.alias("quantity"), event_time.cast("timestamp").alias("event_time"),
                         reason.alias("reason"))
    report = _count_reasons(flagged, [name for name, _ in checks])
    for line in report.log_lines():
        log.info("cleaning: %s", line)
    events = flagged.filter(F.col("reason").isNull()).drop("reason")
    return events, report


def aggregate(events, count_mode: str = "rows"):
    """One row per (customer, product): ``count`` (purchase rows, or summed quantity) and ``last_time``.

    Counting rows (the default) is the feedback the replaced job used: how often the customer
    bought the product, however many units each time. ``quantity`` weighs bulk buys instead.
    """
    from pyspark.sql import functions as F

    if count_mode == "rows":
        count = F.count(F.lit(1)).cast("double")
    elif count_mode == "quantity":
        count = F.sum("quantity").cast("double")
    else:
        raise ValueError(f"count_mode {count_mode!r} is not supported: use one of {COUNT_MODES}")
    return (events.groupBy("customer_id", "product_id")
            .agg(count.alias("count"), F.max("event_time").alias("last_time")))


def pair_stats(pairs) -> dict[str, float | int]:
    """Pairs, distinct customers and products, and the mean, sd and max of ``count``, in one pass."""
    from pyspark.sql import functions as F

    row = pairs.agg(F.count(F.lit(1)).alias("pairs"),
                    F.countDistinct("customer_id").alias("customers"),
                    F.countDistinct("product_id").alias("products"),
                    F.mean("count").alias("count_mean"),
                    F.stddev_samp("count").alias("count_sd"),
                    F.max("count").alias("count_max")).first()
    stats = row.asDict()
    log.info("pairs: %s customer-product pairs, %s customers, %s products; count mean %.2f, sd %.2f, "
             "max %s", f"{stats['pairs']:,}", f"{stats['customers']:,}", f"{stats['products']:,}",
             stats["count_mean"] or 0.0, stats["count_sd"] or 0.0, _number(stats["count_max"] or 0))
    return stats


@dataclass
class IdMaps:
    """The id <-> index maps: ``customers (customer_id, user)`` and ``products (product_id, item)``."""

    customers: Any
    products: Any
    n_users: int
    n_items: int

    def unpersist(self) -> None:
        self.customers.unpersist()
        self.products.unpersist()


def index_ids(pairs):
    """``(indexed pairs, IdMaps)``: the pairs as ``user int, item int, count, last_time``.

    ALS needs dense integer ids below 2^31, while real catalogues use codes ("85123A", 32-char
    hashes, "whole milk"), so every distinct id gets an index 0..n-1. Indices go by descending
    number of pairs, ties by id: the same data always gives the same indices (models and maps
    from two runs can be compared), and the busiest ids get the smallest ones. ``pairs`` is read
    three times: persist it first. The maps are persisted here (``IdMaps.unpersist`` frees them).
    """
    # Persisted: small, and used at least twice (counted here, joined, later exported).
    customers = _dense_index(pairs, "customer_id", "user").persist()
    products = _dense_index(pairs, "product_id", "item").persist()
    n_users, n_items = customers.count(), products.count()
    for name, size in (("customers", n_users), ("products", n_items)):
        if size > MAX_ALS_ID:
            raise ValueError(f"{size:,} distinct {name} exceed the {MAX_ALS_ID:,} ALS can index: "
                             "split the data (e.g. by segment) before training")
    indexed = (pairs.join(customers, "customer_id").join(products, "product_id")
               .select("user", "item", "count", "last_time"))
    log.info("indexed ids: %s customers -> user 0..%s, %s products -> item 0..%s",
             f"{n_users:,}", f"{n_users - 1:,}", f"{n_items:,}", f"{n_items - 1:,}")
    return indexed, IdMaps(customers=customers, products=products, n_users=n_users, n_items=n_items)


def attach_ids(frame, maps: IdMaps):
    """``frame`` with ``customer_id``/``product_id`` put back beside its ``user``/``item`` columns."""
    if "user" in frame.columns:
        frame = frame.join(maps.customers, "user", "left")
    if "item" in frame.columns:
        frame = frame.join(maps.products, "item", "left")
    return frame


def _dense_index(pairs, id_column: str, index_column: str):
    """``(id, index int)``: 0..n-1 by descending pair count, ties by id (a total, stable order)."""
    from pyspark.sql import functions as F

    ranked = (pairs.groupBy(id_column).agg(F.count(F.lit(1)).alias("_pairs"))
              .orderBy(F.desc("_pairs"), F.asc(id_column)))
    # zipWithIndex numbers the globally sorted rows without gathering them into one partition.
    return (ranked.zipWithIndex("_index")
            .select(id_column, F.col("_index").cast("int").alias(index_column)))


def _count_reasons(flagged, reasons: list[str]) -> CleaningReport:
    from pyspark.sql import functions as F

    sums = [F.sum(F.when(F.col("reason") == name, 1).otherwise(0)).alias(f"_r{i}")
            for i, name in enumerate(reasons)]
    row = flagged.agg(F.count(F.lit(1)).alias("_raw"),
                      F.sum(F.when(F.col("reason").isNull(), 1).otherwise(0)).alias("_clean"),
                      *sums).first()
    dropped = {name: int(row[f"_r{i}"] or 0) for i, name in enumerate(reasons)}
    return CleaningReport(raw_rows=int(row["_raw"]), clean_rows=int(row["_clean"] or 0),
                          dropped_by_reason=dropped)


def _id_checks(text, missing: str, malformed: str, max_length: int) -> list:
    from pyspark.sql import functions as F

    return [(missing, text.isNull() | (text == "")),
            (malformed, (F.length(text) > max_length) | text.rlike(_CONTROL_CHARACTER))]


def _id_text(name: str, dtype: str):
    """The id as a trimmed string; whole-number floats ("17850.0", 17850.0) lose the ".0"."""
    from pyspark.sql import functions as F

    column = _col(name)
    if dtype in ("float", "double") or dtype.startswith("decimal"):
        whole = F.when(column == F.floor(column), column.try_cast("decimal(38,0)").cast("string"))
        text = F.when(~F.isnan(column), F.coalesce(whole, column.cast("string")))  # NaN: missing
    else:
        text = column.cast("string")
    text = _trimmed(text)
    # The regex only where it can apply: the test for "." is much cheaper than a regex per row.
    return F.when(text.contains("."), F.regexp_replace(text, _INTEGER_LIKE, "$1")).otherwise(text)


def _quantity(name: str, dtype: str):
    """The quantity as a double: null/blank -> 1, unparseable -> null (counted as non-numeric)."""
    from pyspark.sql import functions as F

    column = _col(name)
    if dtype != "string":
        return F.coalesce(column.try_cast("double"), F.lit(1.0))
    text = _trimmed(column)
    return F.when(text.isNull() | (text == ""), F.lit(1.0)).otherwise(text.try_cast("double"))


def _event_time(name: str, dtype: str, time_format: str | None):
    """The purchase time as a timestamp, or null when missing or unparseable."""
    from pyspark.sql import functions as F

    column = _col(name)
    if dtype.startswith("timestamp") or dtype == "date":
        return column.cast("timestamp")
    text = _trimmed(column.cast("string"))
    text = F.when(text != "", text)
    if time_format in EPOCH_FORMATS:
        number = text.try_cast("double")
        number = F.when(number.isNotNull() & ~F.isnan(number) & (F.abs(number) < 1e15), number)
        if time_format == "epoch_millis":
            return F.timestamp_millis(number.cast("long"))
        return F.timestamp_seconds(number)
    return F.try_to_timestamp(text, F.lit(time_format)) if time_format else F.try_to_timestamp(text)


def _trimmed(text):
    from pyspark.sql import functions as F

    return F.btrim(text, F.lit(_EDGE_WHITESPACE))


def _condition(raw, condition: str):
    """A filter as a Column, checked now so a typo names itself instead of failing mid-job."""
    from pyspark.errors import AnalysisException, ParseException
    from pyspark.sql import functions as F

    try:
        column = F.expr(condition)
        raw.select(column).schema  # noqa: B018 (analysis only: resolves names and types)
    except (AnalysisException, ParseException) as err:
        first_line = str(err).strip().splitlines()[0]
        raise DataSourceError(f"data.filters entry {condition!r} is not a valid Spark SQL condition "
                              f"on columns {raw.columns}: {first_line}") from None
    return column


def check_mapped_columns(columns: Iterable[str], mapping: ColumnMapping, where: str) -> None:
    """A clear error naming each mapped column ``where`` lacks, and the columns it has."""
    present = list(columns)
    missing = {key: name for key, name in mapping.source_columns().items() if name not in present}
    if missing:
        named = ", ".join(f"data.columns.{key}={name!r}" for key, name in missing.items())
        raise DataSourceError(f"{where} has no column for {named}; its columns are {present}. "
                              "Fix data.columns in the config (names are case-sensitive).")


def _check_exists(path: str) -> None:
    """A clear error for a local path that is not there (remote URIs are left to Spark)."""
    if is_uri(path) or any(ch in path for ch in "*?[{"):
        return
    if not Path(path).exists():
        raise DataSourceError(f"data source {path} does not exist: check data.path "
                              "(or the folder given for the datasets)")


def is_uri(path: str) -> bool:
    """``s3a://...``, ``hdfs://...``, ``file://...``: a location only Spark can check."""
    return bool(_URI.match(path))


def _option_text(value: Any) -> str:
    """Spark reader options are strings; YAML gives booleans and numbers."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _col(name: str):
    """A top-level column by its exact name, even with dots or spaces in it."""
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"
