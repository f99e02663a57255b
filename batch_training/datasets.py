"""Loading a configured source: plain files through the column mapping, or a dataset's own pre-step.

A ``data:`` config section says where the raw rows are and how to map them. The presets in
``config/datasets/`` hold one for the project's generated sample data and for each public
benchmark (UCI Online Retail, Groceries, Olist). Layer one on the defaults with
``RECO_CONFIG=config/datasets/online_retail.yaml`` and point it at the files with
``RECO__DATA__DATASETS_DIR=<folder>`` (or a CLI argument that fills the same value).

Keys of the section:
- ``kind``: ``files`` (default; ``path`` read by :func:`batch_training.data.read_raw`) or
  ``olist`` (``path`` is a folder holding Olist's orders, order items and customers tables,
  joined by :func:`load_olist`).
- ``path``: a file, folder, glob or ``s3a://`` URI; may hold ``{datasets_dir}`` and ``{run_dir}``.
  A relative result is taken from the repository root, like every path in the config.
- ``format``, ``options``, ``columns``: see :class:`batch_training.data.SourceSpec`.
- ``filters``: Spark SQL conditions a row must meet, tested before cleaning and counted as drops.
- ``count_mode``: ``rows`` or ``quantity`` (see :func:`batch_training.data.aggregate`).
- ``datasets_dir``: the folder that ``{datasets_dir}`` stands for.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from batch_training.data import (
    ColumnMapping,
    DataSourceError,
    SourceSpec,
    check_mapped_columns,
    clean,
    is_uri,
    read_raw,
    read_table,
)
from models.config import REPO_ROOT

log = logging.getLogger(__name__)

PRESETS_DIR = REPO_ROOT / "config" / "datasets"
KINDS = ("files", "olist")
OLIST_TABLES = ("orders", "order_items", "customers")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def preset_path(name: str) -> Path:
    """``config/datasets/<name>.yaml``, or an error listing the presets that exist."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise DataSourceError(f"no dataset preset {name!r}: choose one of {known}")
    return path


def load_preset(name: str) -> dict[str, Any]:
    """The ``data:`` section of a preset, as a plain dict."""
    document = yaml.safe_load(preset_path(name).read_text()) or {}
    if not isinstance(document.get("data"), dict):
        raise DataSourceError(f"preset {preset_path(name)} has no 'data:' section")
    return document["data"]


def source_placeholders(cfg) -> dict[str, str | None]:
    """The values ``{run_dir}`` and ``{datasets_dir}`` stand for in ``data.path``."""
    datasets_dir = cfg.get_path("data.datasets_dir", None)
    return {"run_dir": str(cfg.path("run_dir")),
            "datasets_dir": str(datasets_dir) if datasets_dir else None}


def resolve_path(template: str, placeholders: Mapping[str, Any]) -> str:
    """``template`` with its ``{name}`` placeholders filled; a relative result is from the repo root."""
    def fill(match: re.Match) -> str:
        name = match.group(1)
        value = placeholders.get(name)
        if value in (None, ""):
            raise DataSourceError(f"data.path {template!r} needs {{{name}}}: set data.{name} "
                                  f"(RECO__DATA__{name.upper()}) or pass that folder on the command line")
        return str(value).rstrip("/")

    path = _PLACEHOLDER.sub(fill, template)
    if is_uri(path) or Path(path).is_absolute():
        return path
    return str(REPO_ROOT / path)


def load_source(spark, data: Mapping[str, Any], placeholders: Mapping[str, Any] | None = None):
    """The raw rows a ``data:`` section describes, with every mapped column checked to exist."""
    kind = data.get("kind") or "files"
    values = {"datasets_dir": data.get("datasets_dir"), **(placeholders or {})}
    if not data.get("path"):
        raise DataSourceError("data.path is not set: give the file or folder of raw transactions")
    path = resolve_path(str(data["path"]), values)
    spec = SourceSpec.from_config(data, path=path)
    if kind == "files":
        return read_raw(spark, spec)
    if kind == "olist":
        raw = load_olist(spark, path, files=data.get("files"), options=spec.options)
        check_mapped_columns(raw.columns, spec.columns, f"the Olist join of {path}")
        return raw
    raise DataSourceError(f"data.kind {kind!r} is not supported: use one of {KINDS}")


def load_events(spark, data: Mapping[str, Any], placeholders: Mapping[str, Any] | None = None,
                max_future_skew_ms: int | None = None):
    """``(events, CleaningReport)``: :func:`load_source`, then the section's filters and cleaning
    (rows dated more than ``max_future_skew_ms`` after now dropped as ``future_time``)."""
    raw = load_source(spark, data, placeholders)
    mapping = ColumnMapping.from_config(data.get("columns") or {})
    return clean(raw, mapping, filters=list(data.get("filters") or []), max_future_skew_ms=max_future_skew_ms)


def load_olist(spark, folder: str, files: Mapping[str, str] | None = None,
               options: Mapping[str, Any] | None = None):
    """One row per Olist order item line, with its order's status and time and the real customer.

    Olist keeps the purchase in three tables: the item lines (product) belong to an order (time,
    status), whose ``customer_id`` is a fresh key per order; only ``customers.customer_unique_id``
    identifies the person across orders. Left joins keep an item line whose order or customer is
    missing, so cleaning counts it (missing customer id) instead of it vanishing in a join.
    Columns: ``order_id, order_item_id, product_id, seller_id, price, order_status,
    order_purchase_timestamp, customer_id, customer_unique_id, customer_state``.
    ``files`` names a table's file inside ``folder`` (default: ``orders.csv.gz`` or Kaggle's
    ``olist_orders_dataset.csv``, and so on).
    """
    tables = {table: read_table(spark, _olist_file(folder, table, (files or {}).get(table)),
                                options=options)
              for table in OLIST_TABLES}
    orders = tables["orders"].select("order_id", "customer_id", "order_status", "order_purchase_timestamp")
    customers = tables["customers"].select("customer_id", "customer_unique_id", "customer_state")
    items = tables["order_items"].select("order_id", "order_item_id", "product_id", "seller_id", "price")
    buyers = orders.join(customers, "customer_id", "left")
    return items.join(buyers, "order_id", "left")


def _olist_file(folder: str, table: str, configured: str | None) -> str:
    """The file holding ``table``: the configured name, else the first known name present."""
    base = folder.rstrip("/")
    if configured:
        return f"{base}/{configured}"
    candidates = [f"{table}.csv.gz", f"{table}.csv", f"olist_{table}_dataset.csv",
                  f"olist_{table}_dataset.csv.gz"]
    if is_uri(base):
        return f"{base}/{candidates[0]}"  # remote folders cannot be listed cheaply here
    for name in candidates:
        if (Path(base) / name).is_file():
            return f"{base}/{name}"
    raise DataSourceError(f"no Olist {table} table in {folder}: looked for {candidates}; "
                          f"name it with data.files.{table}")

