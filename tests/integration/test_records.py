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
    assert c7["model_version"] == "v42" and c7["source"] == "batch" and c7["schema_version"] == 1
    assert messages["C8"]["strategy"] == "popularity" and messages["C8"]["last_event_time"] is None
