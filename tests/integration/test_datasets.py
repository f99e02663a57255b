"""The public datasets load from their raw files with only a preset, and match their PROVENANCE.md.

Every expected figure below is quoted from the PROVENANCE.md beside the data, not from a run.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
from pyspark.sql import functions as F

from batch_training.data import ColumnMapping, DataSourceError, aggregate, clean, pair_stats, read_table
from batch_training.datasets import load_events, load_preset, load_source, preset_path, resolve_path

pytestmark = pytest.mark.integration


def _mapping(preset: dict) -> ColumnMapping:
    return ColumnMapping.from_config(preset["columns"])


def test_online_retail(spark, shared_datasets):
    preset = load_preset("online_retail")
    raw = load_source(spark, preset, {"datasets_dir": shared_datasets}).persist()
    try:
        # "541,909 data rows" ... "4,070 distinct stock codes, 25,900 distinct invoices".
        shape = raw.agg(F.count(F.lit(1)), F.countDistinct("StockCode"), F.countDistinct("InvoiceNo"),
                        F.sum(F.col("InvoiceNo").startswith("C").cast("int"))).first()
        assert tuple(shape) == (541_909, 4_070, 25_900, 9_288)

        # Before any filtering: "missing in 135,080 rows"; "4,372 distinct customers".
        ids_only = replace(_mapping(preset), quantity=None)
        events, report = clean(raw, ids_only)
        assert report.raw_rows == 541_909
        assert report.dropped_by_reason["missing_customer_id"] == 135_080
        assert report.clean_rows == 541_909 - 135_080
        assert pair_stats(aggregate(events))["customers"] == 4_372

        # The preset: the cancellations ("9,288 rows") go first, as the filter's reason.
        events, report = clean(raw, _mapping(preset), filters=preset["filters"])
        assert report.dropped_by_reason["filtered: NOT InvoiceNo LIKE 'C%'"] == 9_288
        assert report.dropped_by_reason["unparseable_time"] == 0
        assert report.raw_rows == report.clean_rows + report.dropped_rows
        first, last = events.agg(F.min("event_time").cast("string"), F.max("event_time").cast("string")).first()
        # "the first row is 2010-12-01 08:26:00 and the last is 2011-12-09 12:50:00" (the last may
        # be dropped by cleaning, but no kept row can lie outside that range or before its day).
        assert first == "2010-12-01 08:26:00"
        assert "2011-12-09 00:00:00" <= last <= "2011-12-09 12:50:00"
        # The first rows are customer 17850 buying 85123A: ids kept as the codes they are.
        assert events.filter((F.col("customer_id") == "17850") & (F.col("product_id") == "85123A")).count() > 0
    finally:
        raw.unpersist()


def test_groceries(spark, shared_datasets):
    events, report = load_events(spark, load_preset("groceries"), {"datasets_dir": shared_datasets})
    events = events.persist()
    try:
        # "38,765 data rows"; every row has a member, an item and a dd-mm-yyyy date.
        assert (report.raw_rows, report.clean_rows, report.dropped_rows) == (38_765, 38_765, 0)
        stats = pair_stats(aggregate(events))
        # "3,898 distinct members", "167 distinct values".
        assert (stats["customers"], stats["products"]) == (3_898, 167)

        day = F.to_date("event_time")
        row = events.agg(F.countDistinct(day), F.min(day).cast("string"), F.max(day).cast("string"),
                         F.countDistinct("customer_id", day),
                         F.countDistinct("customer_id", "product_id", day)).first()
        # "728 distinct days from 2014-01-01 to 2015-12-30"; "14,963 baskets"; "759 rows repeat an
        # earlier row exactly".
        assert tuple(row) == (728, "2014-01-01", "2015-12-30", 14_963, 38_765 - 759)
        # "A member has between 2 and 36 rows".
        per_member = events.groupBy("customer_id").count().agg(F.min("count"), F.max("count")).first()
        assert tuple(per_member) == (2, 36)
    finally:
        events.unpersist()


def test_olist(spark, shared_datasets):
    preset = load_preset("olist")
    raw = load_source(spark, preset, {"datasets_dir": shared_datasets}).persist()
    try:
        # "11,252 item lines for 9,812 customers and 6,123 products, in 10,227 distinct pairs"
        events, report = clean(raw, _mapping(preset))
        assert (report.raw_rows, report.clean_rows) == (11_252, 11_252)
        stats = pair_stats(aggregate(events))
        assert (stats["pairs"], stats["customers"], stats["products"]) == (10_227, 9_812, 6_123)
        assert stats["count_mean"] * stats["pairs"] == pytest.approx(11_252)
        # "Only 366 customers bought 2 or more distinct products, and only 77 placed 2 or more orders."
        per_customer = raw.groupBy("customer_unique_id").agg(
            F.countDistinct("product_id").alias("products"), F.countDistinct("order_id").alias("orders"))
        repeat = per_customer.agg(F.sum((F.col("products") >= 2).cast("int")),
                                  F.sum((F.col("orders") >= 2).cast("int"))).first()
        assert tuple(repeat) == (366, 77)

        # The preset drops canceled and unavailable orders, counted under the filter.
        filtered_events, filtered = clean(raw, _mapping(preset), filters=preset["filters"])
        reason = "filtered: order_status NOT IN ('canceled', 'unavailable')"
        assert filtered.dropped_by_reason[reason] > 0
        assert filtered.clean_rows + filtered.dropped_by_reason[reason] == 11_252
        assert filtered_events.filter(F.col("event_time").isNull()).count() == 0
    finally:
        raw.unpersist()


def test_olist_orders_table_status_counts(spark, shared_datasets):
    orders = read_table(spark, str(shared_datasets / "olist_subset_10k" / "orders.csv.gz"))
    counts = {r.order_status: r["count"] for r in orders.groupBy("order_status").count().collect()}
    # "delivered 9,649; shipped 104; unavailable 98; canceled 57; processing 47; invoiced 43; created 2"
    assert counts == {"delivered": 9_649, "shipped": 104, "unavailable": 98, "canceled": 57,
                      "processing": 47, "invoiced": 43, "created": 2}


def test_presets_need_the_datasets_folder_and_name_the_known_ones(tmp_path):
    preset = load_preset("groceries")
    with pytest.raises(DataSourceError, match=r"\{datasets_dir\}"):
        resolve_path(preset["path"], {})
    assert resolve_path(preset["path"], {"datasets_dir": tmp_path}) == \
        str(tmp_path / "groceries" / "Groceries_dataset.csv")
    with pytest.raises(DataSourceError, match="online_retail"):
        preset_path("online-retail")


def test_sample_preset_reads_the_generated_transactions_file(spark, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "transactions.csv").write_text(
        "transaction_id,customer_id,product_id,quantity,event_time\n"
        "tx-1,C1,P1,2,2025-03-04T10:21:07Z\n"
        "tx-2,C1,P2,1,2025-03-04T10:22:00Z\n"
        "tx-3,C2,P1,0,2025-03-04T10:23:00Z\n")
    events, report = load_events(spark, load_preset("sample"), {"run_dir": tmp_path})
    assert (report.raw_rows, report.clean_rows) == (3, 2)
    assert report.dropped_by_reason["negative_or_zero_quantity"] == 1
    rows = {(r.customer_id, r.product_id, r.quantity, r.at) for r in events.select(
        "customer_id", "product_id", "quantity", F.col("event_time").cast("string").alias("at")).collect()}
    assert rows == {("C1", "P1", 2.0, "2025-03-04 10:21:07"), ("C1", "P2", 1.0, "2025-03-04 10:22:00")}
