"""The record writer rides out a sink outage: a DynamoDB endpoint of its own, down for longer than
the old retry budget (about 20 s) and then back, against the real broker and a real moto server.

Only the records that failed are re-sent: the topic, which stayed up, carries each record once.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from infra.services import DynamoDBEndpoint
from models.clients import ensure_table, ensure_topics
from models.records import RecommendationRecord, RecordWriter, SinkError, now_ms, read_table_item
from tests.isolation import isolated_config
from tests.topics import read_topic

pytestmark = pytest.mark.integration

OUTAGE_PORT = 18111       # nothing else of the project listens here (the test endpoint is 18000)
OUTAGE_S = 25             # longer than the old 1 + 2 + 4 + 8 s of retries


def records(n: int) -> list[RecommendationRecord]:
    stamp = now_ms()
    return [RecommendationRecord(customer_id=f"C{i}", product_ids=["P1", "P2"], scores=[0.9, 0.5],
                                 model_version="v1", strategy="personalized", last_event_ms=stamp - i,
                                 computed_at_ms=stamp, source="stream") for i in range(n)]


@pytest.fixture
def outage_cfg(cfg, kafka_broker, tmp_path):
    own = isolated_config(cfg, overrides={
        "run_dir": str(tmp_path), "dynamodb.local.port": OUTAGE_PORT,
        "dynamodb.endpoint_url": f"http://127.0.0.1:{OUTAGE_PORT}"})
    ensure_topics(own)
    endpoint = DynamoDBEndpoint(own)
    yield own, endpoint
    endpoint.stop()


def topic_messages(cfg) -> list:
    return read_topic(cfg, str(cfg.get_path("kafka.topics.recommendations")))


def test_a_table_outage_is_ridden_out_and_only_failures_are_resent(outage_cfg, caplog):
    cfg, endpoint = outage_cfg          # the endpoint is down: nothing listens on its port yet
    writer = RecordWriter(cfg)
    batch = records(30)
    outcome: dict = {}

    def write() -> None:
        try:
            outcome["summary"] = writer.write(batch, outage_tolerance_s=300, label="batch 7")
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    caplog.set_level(logging.WARNING, logger="models.records")
    started = time.monotonic()
    thread = threading.Thread(target=write)
    thread.start()
    time.sleep(OUTAGE_S)
    assert thread.is_alive(), f"the writer gave up during the outage: {outcome}"
    endpoint.start()
    ensure_table(cfg)                   # the endpoint came back empty, as a recreated table would
    thread.join(timeout=120)
    writer.close()
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert time.monotonic() - started >= OUTAGE_S
    assert summary.table_written == len(batch) and summary.attempts >= 4
    assert summary.topic_records == len(batch)
    for record in batch:
        assert read_table_item(cfg, record.customer_id)["last_event_ms"] == record.last_event_ms
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == summary.attempts - 1                       # one per failed attempt
    assert all("batch 7" in w and "table: 30 failed" in w for w in warnings)
    sent = [json.loads(m.value)["customer_id"] for m in topic_messages(cfg)]
    assert sorted(sent) == sorted(r.customer_id for r in batch)       # each once: never re-sent


def test_past_the_tolerance_the_writer_fails_with_a_clear_error(outage_cfg):
    cfg, _ = outage_cfg
    writer = RecordWriter(cfg, to_topic=False)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"past the outage tolerance of 3 s \(streaming.sink_outage_tolerance\)"
                                        r".*table: 5 failed"):
        writer.write(records(5), outage_tolerance_s=3, label="batch 8",
                     tolerance_setting="streaming.sink_outage_tolerance")
    assert 3 <= time.monotonic() - started < 60
