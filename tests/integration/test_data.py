"""Raw rows through a column mapping: reading, cleaning with counted reasons, counting, id indices."""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from batch_training.data import (
    MAX_ID_LENGTH,
    ColumnMapping,
    DataSourceError,
    SourceSpec,
    aggregate,
    attach_ids,
    clean,
    index_ids,
    pair_stats,
    read_raw,
    source_format,
)

pytestmark = pytest.mark.integration

MAPPING = ColumnMapping(customer_id="customer_id", product_id="product_id", quantity="quantity",
                        event_time="event_time")
HEADER = "transaction_id,customer_id,product_id,quantity,event_time"
LONGEST_ID = "L" * MAX_ID_LENGTH
# (row, what cleaning must make of it): a reason, or the kept (customer, product, quantity, time).
ROWS = [
    ("t01,C1,P1,2,2025-03-04T10:21:07Z", ("C1", "P1", 2.0, datetime(2025, 3, 4, 10, 21, 7))),
    ("t02,C1,P1,,2025-03-05T08:00:00+02:00", ("C1", "P1", 1.0, datetime(2025, 3, 5, 6, 0, 0))),
    ('t03," C2 ",P2 ,0.5,2025-03-04 11:00:00', ("C2", "P2", 0.5, datetime(2025, 3, 4, 11, 0, 0))),
    ("t04,17850.0,85123A,3,2025-03-04T12:00:00Z", ("17850", "85123A", 3.0, datetime(2025, 3, 4, 12))),
    (f"t05,{LONGEST_ID},P1,1,2025-03-04T12:00:00Z", (LONGEST_ID, "P1", 1.0, datetime(2025, 3, 4, 12))),
    ("t06,,P1,1,2025-03-04T10:21:07Z", "missing_customer_id"),
    ('t07,"   ",P1,1,2025-03-04T10:21:07Z', "missing_customer_id"),
    ("t08,,P1,abc,junk", "missing_customer_id"),  # several problems: the first one counts
    ("t09,C3,,1,2025-03-04T10:21:07Z", "missing_product_id"),
    ('t10,C3," \t ",1,2025-03-04T10:21:07Z', "missing_product_id"),
    (f"t11,{LONGEST_ID}X,P1,1,2025-03-04T10:21:07Z", "malformed_customer_id"),
    ("t12,C3,P\x01X,1,2025-03-04T10:21:07Z", "malformed_product_id"),
    ('t13,C3,"P\tX",1,2025-03-04T10:21:07Z', "malformed_product_id"),
    ("t14,C3,P3,abc,2025-03-04T10:21:07Z", "non_numeric_quantity"),
    ("t15,C3,P3,NaN,2025-03-04T10:21:07Z", "non_numeric_quantity"),
    ("t16,C3,P3,0,2025-03-04T10:21:07Z", "negative_or_zero_quantity"),
    ("t17,C3,P3,-2,2025-03-04T10:21:07Z", "negative_or_zero_quantity"),
    ("t18,C3,P3,1,04/03/2025 10:21", "unparseable_time"),
    ("t19,C3,P3,1,", "unparseable_time"),
    ("t19b,C3,P3,1,2025-02-30T10:00:00Z", "unparseable_time"),  # no such day
    ("t19c,C3,P3,1,2025-13-45T25:61:00Z", "unparseable_time"),
    ("t20,C4,P4,1,2025-03-04T10:21:07Z", "filtered: transaction_id <> 't20'"),
]
FILTERS = ["transaction_id <> 't20'"]


def _write_csv(path, rows) -> str:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return str(path)


def _kept(events) -> set[tuple]:
    """The events as tuples, times as UTC datetimes (formatted by Spark, whatever the local zone)."""
    from pyspark.sql import functions as F

    rows = events.select("customer_id", "product_id", "quantity",
                         F.date_format("event_time", "yyyy-MM-dd HH:mm:ss").alias("at")).collect()
    return {(r.customer_id, r.product_id, r.quantity, r.at and datetime.fromisoformat(r.at))
            for r in rows}


def _expected_drops() -> dict[str, int]:
    drops: dict[str, int] = {}
    for _, outcome in ROWS:
        if isinstance(outcome, str):
            drops[outcome] = drops.get(outcome, 0) + 1
    return drops


def test_each_bad_row_is_counted_under_its_reason_and_good_rows_kept(spark, tmp_path):
    path = _write_csv(tmp_path / "transactions.csv", [row for row, _ in ROWS])
    raw = read_raw(spark, SourceSpec(path=path, columns=MAPPING))

    events, report = clean(raw, MAPPING, filters=FILTERS)

    expected_kept = {outcome for _, outcome in ROWS if isinstance(outcome, tuple)}
    assert _kept(events) == expected_kept
    assert {k: v for k, v in report.dropped_by_reason.items() if v} == _expected_drops()
    assert (report.raw_rows, report.clean_rows) == (len(ROWS), len(expected_kept))
    assert report.raw_rows == report.clean_rows + report.dropped_rows
    assert [f.simpleString() for f in events.schema.fields] == [
        "customer_id:string", "product_id:string", "quantity:double", "event_time:timestamp"]


def test_rows_dated_beyond_the_future_skew_are_dropped_as_future_time(spark, tmp_path, caplog):
    """One row dated 2099 must not become the model's cutoff (the stream would ignore every purchase)."""
    from batch_training.data import FUTURE_TIME
    from streaming.events import FUTURE_TIME as STREAM_FUTURE_TIME

    soon = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = _write_csv(tmp_path / "t.csv", ["f1,C5,P5,1,2099-01-01T00:00:00Z", f"f2,C5,P6,1,{soon}",
                                           "f3,C6,P5,1,2025-03-04T10:21:07Z", "f4,C6,P6,1,junk"])
    raw = read_raw(spark, SourceSpec(path=path, columns=MAPPING))

    events, report = clean(raw, MAPPING, max_future_skew_ms=86_400_000)   # against the wall clock
    assert FUTURE_TIME == STREAM_FUTURE_TIME == "future_time"
    assert {(r.customer_id, r.product_id) for r in events.collect()} == {("C5", "P6"), ("C6", "P5")}
    assert (report.dropped_by_reason["unparseable_time"], report.dropped_by_reason["future_time"]) == (1, 1)
    assert list(report.dropped_by_reason)[-2:] == ["unparseable_time", "future_time"]
    assert any(r.getMessage() == "cleaning: dropped future_time: 1 (25.0%)" for r in caplog.records)

    reference_ms = int(datetime(2025, 3, 4, 10, 21, 7, tzinfo=UTC).timestamp() * 1000)
    _, at_reference = clean(raw, MAPPING, max_future_skew_ms=0, reference_ms=reference_ms)
    assert (at_reference.clean_rows, at_reference.dropped_by_reason["future_time"]) == (1, 2)
    _, unchecked = clean(raw, MAPPING)
    assert "future_time" not in unchecked.dropped_by_reason and unchecked.clean_rows == 3


def test_report_lines_use_thousands_separators():
    from batch_training.data import CleaningReport

    report = CleaningReport(raw_rows=1_215_193, clean_rows=902_792,
                            dropped_by_reason={"missing_customer_id": 312_401})
    lines = report.log_lines()
    assert lines[0] == "raw rows: 1,215,193"
    assert "dropped missing_customer_id: 312,401 (25.7%)" in lines
    assert lines[-1].startswith("clean rows: 902,792")


def test_without_quantity_or_time_columns_every_row_is_one_unit_at_an_unknown_time(spark, tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["t1,C1,P1,-5,junk", "t2,C1,P2,abc,"])
    mapping = ColumnMapping(customer_id="customer_id", product_id="product_id")
    events, report = clean(read_raw(spark, SourceSpec(path=path, columns=mapping)), mapping)
    assert _kept(events) == {("C1", "P1", 1.0, None), ("C1", "P2", 1.0, None)}
    assert report.dropped_by_reason == {"missing_customer_id": 0, "malformed_customer_id": 0,
                                        "missing_product_id": 0, "malformed_product_id": 0}


def test_time_format_from_the_mapping_is_used(spark, tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("member,item,day\n1808,whole milk,21-07-2015\n1808,soda,2015-07-21\n")
    mapping = ColumnMapping(customer_id="member", product_id="item", event_time="day",
                            time_format="dd-MM-yyyy")
    events, report = clean(read_raw(spark, SourceSpec(path=str(path), columns=mapping)), mapping)
    assert _kept(events) == {("1808", "whole milk", 1.0, datetime(2015, 7, 21))}
    assert report.dropped_by_reason["unparseable_time"] == 1


@pytest.mark.parametrize("time_format, stamps", [("epoch_seconds", ("1437436800", "1437440400.0")),
                                                 ("epoch_millis", ("1437436800000", "1437440400000"))])
def test_epoch_times_parse_with_their_format_and_junk_is_counted(spark, tmp_path, time_format, stamps):
    path = tmp_path / "e.csv"
    path.write_text("member,item,ts\n"
                    + "".join(f"1808,{item},{stamp}\n" for item, stamp in zip(("milk", "soda"), stamps))
                    + "1808,tea,2015-07-21\n1808,rice,1e400\n")
    mapping = ColumnMapping(customer_id="member", product_id="item", event_time="ts", time_format=time_format)
    events, report = clean(read_raw(spark, SourceSpec(path=str(path), columns=mapping)), mapping)
    assert _kept(events) == {("1808", "milk", 1.0, datetime(2015, 7, 21)),
                             ("1808", "soda", 1.0, datetime(2015, 7, 21, 1, 0))}
    assert report.dropped_by_reason["unparseable_time"] == 2


def test_a_missing_mapped_column_names_it_and_the_columns_that_exist(spark, tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["t1,C1,P1,1,2025-03-04T10:21:07Z"])
    mapping = replace(MAPPING, quantity="Qty")
    with pytest.raises(DataSourceError) as err:
        read_raw(spark, SourceSpec(path=path, columns=mapping))
    message = str(err.value)
    assert "data.columns.quantity='Qty'" in message
    assert "['transaction_id', 'customer_id', 'product_id', 'quantity', 'event_time']" in message


def test_a_missing_file_and_a_bad_filter_are_named(spark, tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        read_raw(spark, SourceSpec(path=str(tmp_path / "absent.csv"), columns=MAPPING))
    path = _write_csv(tmp_path / "t.csv", ["t1,C1,P1,1,2025-03-04T10:21:07Z"])
    raw = read_raw(spark, SourceSpec(path=path, columns=MAPPING))
    with pytest.raises(DataSourceError, match="InvoiceNo"):
        clean(raw, MAPPING, filters=["NOT InvoiceNo LIKE 'C%'"])


def test_mapping_from_config_names_what_is_wrong():
    mapping = ColumnMapping.from_config({"customer_id": "CustomerID", "product_id": "StockCode",
                                         "quantity": None, "segment": "Country"})
    assert (mapping.customer_id, mapping.quantity, mapping.segment) == ("CustomerID", None, "Country")
    with pytest.raises(DataSourceError, match="unknown keys \\['customer'\\]"):
        ColumnMapping.from_config({"customer": "c", "customer_id": "c", "product_id": "p"})
    with pytest.raises(DataSourceError, match="data.columns.product_id is not set"):
        ColumnMapping.from_config({"customer_id": "c"})
    with pytest.raises(DataSourceError, match="time_format"):
        ColumnMapping.from_config({"customer_id": "c", "product_id": "p", "time_format": "dd-MM-yyyy"})


def test_format_comes_from_the_extension_unless_set():
    assert source_format("s3a://bucket/raw/online_retail.csv.gz") == "csv"
    assert source_format("data/part.PARQUET") == "parquet"
    assert source_format("events.jsonl") == "json"
    assert source_format("s3a://bucket/raw/", "parquet") == "parquet"
    with pytest.raises(DataSourceError, match="data.format"):
        source_format("s3a://bucket/raw/")
    with pytest.raises(DataSourceError, match="not supported"):
        source_format("x.csv", "xlsx")


def test_csv_gzip_parquet_and_json_give_the_same_events(spark, tmp_path):
    frame = pd.DataFrame({"cust": [17850.0, 13047.0, None], "sku": ["85123A", "71053", "22752"],
                          "qty": [6, 2, 1],
                          "at": pd.to_datetime(["2010-12-01 08:26:00", "2010-12-01 08:34:00",
                                                "2010-12-01 08:45:00"])})
    mapping = ColumnMapping(customer_id="cust", product_id="sku", quantity="qty", event_time="at")
    csv_gz = tmp_path / "retail.csv.gz"
    with gzip.open(csv_gz, "wt") as out:
        frame.assign(at=frame["at"].dt.strftime("%Y-%m-%d %H:%M:%S")).to_csv(out, index=False)
    parquet = tmp_path / "retail.parquet"
    frame.to_parquet(parquet, coerce_timestamps="us")  # typed: double ids, int quantity, timestamp
    json_lines = tmp_path / "retail.json"
    json_lines.write_text("\n".join(
        json.dumps({"cust": None if pd.isna(c) else c, "sku": s, "qty": q, "at": str(a)})
        for c, s, q, a in frame.itertuples(index=False, name=None)))

    expected = {("17850", "85123A", 6.0, datetime(2010, 12, 1, 8, 26)),
                ("13047", "71053", 2.0, datetime(2010, 12, 1, 8, 34))}
    for path in (csv_gz, parquet, json_lines):
        raw = read_raw(spark, SourceSpec(path=str(path), columns=mapping))
        events, report = clean(raw, mapping)
        assert _kept(events) == expected, path.name
        assert report.dropped_by_reason["missing_customer_id"] == 1, path.name


def _events(spark, rows):
    return spark.createDataFrame(
        [(c, p, q, datetime.fromisoformat(t) if t else None) for c, p, q, t in rows],
        "customer_id string, product_id string, quantity double, event_time timestamp")


PURCHASES = [("C1", "P1", 2.0, "2025-03-01T10:00:00"), ("C1", "P1", 1.0, "2025-03-03T10:00:00"),
             ("C1", "P2", 5.0, "2025-03-02T10:00:00"), ("C2", "P1", 1.0, None),
             ("C3", "P1", 4.0, "2025-03-02T09:00:00"), ("C3", "P3", 1.0, "2025-03-02T09:00:00")]


def test_aggregate_counts_rows_or_quantities_and_keeps_the_last_time(spark):
    events = _events(spark, PURCHASES)
    by_rows = {(r.customer_id, r.product_id): (r["count"], r.last_time)
               for r in aggregate(events).collect()}
    by_quantity = {(r.customer_id, r.product_id): r["count"]
                   for r in aggregate(events, count_mode="quantity").collect()}
    assert by_rows[("C1", "P1")] == (2.0, datetime(2025, 3, 3, 10))
    assert by_rows[("C2", "P1")] == (1.0, None)
    assert by_quantity == {("C1", "P1"): 3.0, ("C1", "P2"): 5.0, ("C2", "P1"): 1.0,
                           ("C3", "P1"): 4.0, ("C3", "P3"): 1.0}
    with pytest.raises(ValueError, match="count_mode"):
        aggregate(events, count_mode="units")


def test_pair_stats_in_one_pass(spark):
    stats = pair_stats(aggregate(_events(spark, PURCHASES)))
    counts = [2.0, 1.0, 1.0, 1.0, 1.0]
    mean = sum(counts) / len(counts)
    sd = math.sqrt(sum((c - mean) ** 2 for c in counts) / (len(counts) - 1))
    assert (stats["pairs"], stats["customers"], stats["products"]) == (5, 3, 3)
    assert stats["count_mean"] == pytest.approx(mean)
    assert stats["count_sd"] == pytest.approx(sd)
    assert stats["count_max"] == 2.0


def _maps(maps) -> tuple[dict, dict]:
    return ({r.customer_id: r.user for r in maps.customers.collect()},
            {r.product_id: r.item for r in maps.products.collect()})


def test_ids_map_to_dense_indices_by_frequency_and_back(spark):
    pairs = aggregate(_events(spark, PURCHASES))
    indexed, maps = index_ids(pairs)
    users, items = _maps(maps)
    # P1 is in 3 pairs; P2 and P3 in one each (tie broken by id). C1 and C3 have 2 pairs each.
    assert items == {"P1": 0, "P2": 1, "P3": 2}
    assert users == {"C1": 0, "C3": 1, "C2": 2}
    assert (maps.n_users, maps.n_items) == (3, 3)
    assert dict(indexed.dtypes) == {"user": "int", "item": "int", "count": "double",
                                    "last_time": "timestamp"}

    back = attach_ids(indexed, maps)
    assert {(r.customer_id, r.product_id, r["count"]) for r in back.collect()} == \
        {(r.customer_id, r.product_id, r["count"]) for r in pairs.collect()}
    maps.unpersist()


def test_indices_do_not_depend_on_row_order_or_partitioning(spark):
    rows = [(f"C{n % 97}", f"P{(n * 7) % 131}", 1.0, None) for n in range(3000)]
    first = _events(spark, rows)
    second = _events(spark, list(reversed(rows))).repartition(5)
    first_maps, second_maps = index_ids(aggregate(first))[1], index_ids(aggregate(second))[1]
    users, items = _maps(first_maps)
    assert (users, items) == _maps(second_maps)
    assert sorted(users.values()) == list(range(len(users)))
    assert sorted(items.values()) == list(range(len(items)))
    first_maps.unpersist()
    second_maps.unpersist()
