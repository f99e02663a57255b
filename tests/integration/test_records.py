"""The one record writer: topic message format, idempotent and newest-wins table writes."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from models.clients import ensure_table, kafka_options
from models.records import RecommendationRecord, RecordWriter, build_records, read_table_item

pytestmark = pytest.mark.integration


@pytest.fixture
def sink_cfg(cfg, kafka_broker, dynamodb_endpoint):
    suffix = uuid.uuid4().hex[:8]
    own = cfg.with_overrides({"dynamodb.table": f"recs-{suffix}",
                              "kafka.topics.recommendations": f"recs-{suffix}"})
    ensure_table(own)
    return own


def _record(customer: str, event_ms: int, computed_ms: int, products: list[str]) -> RecommendationRecord:
    return RecommendationRecord(customer_id=customer, product_ids=products,
                                scores=[1.0 / (i + 1) for i in range(len(products))],
                                model_version="v1", strategy="personalized", last_event_ms=event_ms,
                                computed_at_ms=computed_ms, source="stream",
                                source_offsets={"transactions-0": 41})


def test_newer_result_wins_and_older_is_refused(sink_cfg):
    writer = RecordWriter(sink_cfg, to_topic=False)
    newest = _record("C1", event_ms=2_000, computed_ms=5_000, products=["P2", "P1"])
    older_event = _record("C1", event_ms=1_000, computed_ms=9_000, products=["P9"])
    summary = writer.write([newest])
    assert summary.table_written == 1
    summary = writer.write([older_event])
    assert (summary.table_written, summary.table_skipped_stale) == (0, 1)
    assert writer.write([newest]).table_written == 1  # the same record again: idempotent
    stored = read_table_item(sink_cfg, "C1")
    assert [r["product_id"] for r in stored["recommendations"]] == ["P2", "P1"]
    assert stored["last_event_ms"] == 2_000
    recomputed = _record("C1", event_ms=2_000, computed_ms=6_000, products=["P3"])  # e.g. a new model
    assert writer.write([recomputed]).table_written == 1
    assert read_table_item(sink_cfg, "C1")["recommendations"][0]["product_id"] == "P3"
    writer.close()


def test_topic_message_is_keyed_by_customer_with_documented_fields(sink_cfg):
    from kafka import KafkaConsumer

    records = build_records(["C7", "C8"], np.array([[2, 0, -1], [1, -1, -1]]),
                            np.array([[0.9, 0.5, np.nan], [0.7, np.nan, np.nan]], dtype=np.float32),
                            np.array(["A", "B", "C"]), "v42", ["personalized", "popularity"],
                            [1_700_000_000_000, None], source="batch")
    writer = RecordWriter(sink_cfg, to_table=False)
    assert writer.write(records).topic_records == 2
    writer.close()
    consumer = KafkaConsumer(sink_cfg.get_path("kafka.topics.recommendations"), **kafka_options(sink_cfg),
                             auto_offset_reset="earliest", consumer_timeout_ms=10000)
    messages = {m.key.decode(): json.loads(m.value) for m in consumer}
    consumer.close()
    assert set(messages) == {"C7", "C8"}
    c7 = messages["C7"]
    assert [r["product_id"] for r in c7["recommendations"]] == ["C", "A"]  # padding dropped
    assert [r["rank"] for r in c7["recommendations"]] == [1, 2]
    assert c7["last_event_time"] == "2023-11-14T22:13:20.000Z"
    assert c7["model_version"] == "v42" and c7["source"] == "batch" and c7["schema_version"] == 2
    assert messages["C8"]["strategy"] == "popularity" and messages["C8"]["last_event_time"] is None
    assert messages["C8"]["last_event_ms"] is None and messages["C8"]["source_offsets"] is None


def _raw_item(cfg, customer: str) -> dict:
    from models.clients import dynamodb_client

    return dynamodb_client(cfg).get_item(TableName=cfg.get_path("dynamodb.table"), Key={"customer_id": {"S": customer}},
                                         ConsistentRead=True)["Item"]


def test_the_item_has_the_messages_types_and_leaves_out_what_is_unknown(sink_cfg):
    writer = RecordWriter(sink_cfg, to_topic=False)
    known = _record("C1", event_ms=2_000, computed_ms=5_000, products=["P2", "P1"])
    unknown = RecommendationRecord(customer_id="C2", product_ids=["P3"], scores=[0.5], model_version="v1",
                                   strategy="popularity", last_event_ms=None, computed_at_ms=7_000, source="batch")
    assert writer.write([known, unknown]).table_written == 2
    writer.close()
    raw = _raw_item(sink_cfg, "C1")
    assert raw["source_offsets"] == {"M": {"transactions-0": {"N": "41"}}}           # a map, not JSON text
    assert read_table_item(sink_cfg, "C1")["source_offsets"] == {"transactions-0": 41}
    stored = read_table_item(sink_cfg, "C2")
    assert not {"last_event_ms", "last_event_time", "source_offsets"} & set(stored)    # null on the topic
    assert stored["schema_version"] == 2 and stored["computed_at_ms"] == 7_000


def _write_one(writer: RecordWriter, event_ms: int | None, computed_ms: int, product: str) -> bool:
    """Whether the table took the record (the conditional newest-wins write)."""
    record = RecommendationRecord(customer_id="C1", product_ids=[product], scores=[1.0], model_version="v1",
                                  strategy="personalized", last_event_ms=event_ms, computed_at_ms=computed_ms,
                                  source="batch")
    summary = writer.write([record])
    assert summary.table_written + summary.table_skipped_stale == 1
    return summary.table_written == 1


def test_an_unknown_last_event_orders_as_the_oldest(sink_cfg):
    """(last_event_ms, computed_at_ms) with an unknown last_event_ms as 0: the record's order_key."""
    writer = RecordWriter(sink_cfg, to_topic=False)
    try:
        assert _write_one(writer, None, 5_000, "A")             # nothing stored
        assert not _write_one(writer, None, 4_000, "B")         # both unknown: computed earlier loses
        assert _write_one(writer, None, 5_000, "C")             # the same pair again: taken
        assert not _write_one(writer, 0, 4_999, "D")            # 0 is unknown's rank: computed decides
        assert _write_one(writer, 0, 6_000, "E")
        assert _write_one(writer, None, 6_000, "F")             # stored 0 against unknown: equal
        assert _write_one(writer, 1, 1, "G")                    # any known event beats unknown
        assert not _write_one(writer, None, 10**13, "H")        # unknown never beats a known event
        assert not _write_one(writer, 0, 10**13, "I")
        assert _write_one(writer, 2, 1, "J")
    finally:
        writer.close()
    stored = read_table_item(sink_cfg, "C1")
    assert stored["recommendations"][0]["product_id"] == "J" and stored["last_event_ms"] == 2


def test_items_written_by_schema_version_1_are_ordered_as_before(sink_cfg):
    """An item of version 1 (last_event_ms 0 when unknown, source_offsets as JSON text) is replaced
    by a newer record and kept against an older one."""
    from models.clients import dynamodb_client

    table = sink_cfg.get_path("dynamodb.table")

    def put_v1(event_ms: int, computed_ms: int) -> None:
        dynamodb_client(sink_cfg).put_item(TableName=table, Item={
            "customer_id": {"S": "C1"}, "schema_version": {"N": "1"}, "strategy": {"S": "personalized"},
            "recommendations": {"L": [{"M": {"rank": {"N": "1"}, "product_id": {"S": "OLD"}, "score": {"N": "1"}}}]},
            "model_version": {"S": "v0"}, "last_event_ms": {"N": str(event_ms)},
            "computed_at_ms": {"N": str(computed_ms)},
            "computed_at": {"S": "2025-01-01T00:00:00.000Z"}, "source": {"S": "stream"},
            "source_offsets": {"S": json.dumps({"transactions-0": 3})}})

    writer = RecordWriter(sink_cfg, to_topic=False)
    try:
        put_v1(0, 5_000)                                        # a version 1 item with an unknown event
        assert not _write_one(writer, None, 4_000, "A")
        assert _write_one(writer, None, 5_000, "B")
        put_v1(3_000, 5_000)
        assert not _write_one(writer, 2_999, 9_000, "C")
        assert not _write_one(writer, None, 9_000, "D")
        assert _write_one(writer, 3_000, 5_001, "E")
    finally:
        writer.close()
    stored = read_table_item(sink_cfg, "C1")
    assert stored["recommendations"][0]["product_id"] == "E" and stored["schema_version"] == 2
    assert "source_offsets" not in stored                      # the whole item is replaced
