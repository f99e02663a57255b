"""Issue 13, defect 7 ("table lost"): `python -m tools refill-table` rebuilds the recommendations
table from the published batch lists and the streaming state, newest record per customer, and
never overwrites a newer item.

The real batch job trains and publishes a small model (its lists are the batch records), the real
streaming job runs over a few events on the real broker so the state holds customers, then the
table is deleted and re-filled: once by the command in a subprocess (its own JVM), once more
in-process after newer items were written for two customers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta

import pandas as pd
import pytest

from models.clients import dynamodb_client, ensure_table, ensure_topics, kafka_options
from models.config import REPO_ROOT
from models.records import RecommendationRecord, RecordWriter, read_table_item
from models.store import ModelStore
from streaming.state import iso_to_ms
from tests.isolation import isolated_config

pytestmark = pytest.mark.integration

SUMMARY = re.compile(r"re-filled: model (\S+): ([\d,]+) batch records, ([\d,]+) state customers \(([\d,]+) with "
                     r"purchases since the cutoff, re-scored\), ([\d,]+) items written, ([\d,]+) skipped")


@pytest.fixture(scope="module")
def published(spark, cfg, tmp_path_factory):
    """The batch job (no CV, a small ALS) on generated data: a published model and its lists."""
    from batch_training.generate import write
    from batch_training.job import run

    folder = tmp_path_factory.mktemp("refill")
    write(folder / "data", factor=0.02, seed=13, fmt="csv")
    job_cfg = cfg.with_overrides({
        "data.path": str(folder / "data" / "transactions.csv"), "batch.output_dir": str(folder / "out"),
        "model_store.uri": str(folder / "models"), "batch.cv_folds": 0, "batch.scorers.candidates": ["als"],
        "batch.als.rank": 8, "batch.als.max_iter": 5, "batch.final_fit": "fold_in",
        "batch.publish.min_lift_over_popularity": -1.0,   # publish whatever it is: the gate is not tested here
    })
    result = run(job_cfg, spark=spark)
    assert result.published
    return folder, job_cfg, result.version


def _own_config(job_cfg, folder):
    own = isolated_config(job_cfg, overrides={
        "streaming.checkpoint_dir": str(folder / f"checkpoints-{uuid.uuid4().hex[:8]}")})
    ensure_topics(own)
    ensure_table(own)
    return own


def _produce(cfg, events: list[dict]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka_options(cfg), acks="all", linger_ms=5)
    for event in events:
        producer.send(cfg.get_path("kafka.topics.transactions"), key=event["customer_id"].encode(),
                      value=json.dumps(event).encode())
    producer.flush(timeout=30)
    producer.close()


def _latest_on_topic(cfg, customers: set[str], timeout_s: float = 60) -> dict[str, dict]:
    """The newest record per customer on the recommendations topic, read until every one of
    ``customers`` has one (a slow first fetch must not pass for an empty topic)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(cfg.get_path("kafka.topics.recommendations"), **kafka_options(cfg),
                             auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    latest: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=1000).values()
            for message in (m for batch in batches for m in batch):
                record = json.loads(message.value)
                previous = latest.get(record["customer_id"])
                if previous is None or (record["last_event_ms"], record["computed_at_ms"]) >= \
                        (previous["last_event_ms"], previous["computed_at_ms"]):
                    latest[record["customer_id"]] = record
            if not batches and customers <= set(latest):
                break
    finally:
        consumer.close()
    return latest


def _scan(cfg) -> dict[str, dict]:
    from boto3.dynamodb.types import TypeDeserializer

    deserializer = TypeDeserializer()
    pages = dynamodb_client(cfg).get_paginator("scan").paginate(TableName=cfg.get_path("dynamodb.table"),
                                                                ConsistentRead=True)
    items = [{k: deserializer.deserialize(v) for k, v in item.items()} for page in pages for item in page["Items"]]
    return {item["customer_id"]: item for item in items}


def _delete_table(cfg) -> None:
    client, name = dynamodb_client(cfg), cfg.get_path("dynamodb.table")
    client.delete_table(TableName=name)
    client.get_waiter("table_not_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})


def _refill_subprocess(cfg) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    env.update({
        "RECO__RUN_DIR": str(cfg.get_path("run_dir")),
        "RECO__DYNAMODB__ENDPOINT_URL": str(cfg.get_path("dynamodb.endpoint_url")),
        "RECO__DYNAMODB__TABLE": str(cfg.get_path("dynamodb.table")),
        "RECO__MODEL_STORE__URI": str(cfg.get_path("model_store.uri")),
        "RECO__BATCH__OUTPUT_DIR": str(cfg.get_path("batch.output_dir")),
        "RECO__STREAMING__CHECKPOINT_DIR": str(cfg.get_path("streaming.checkpoint_dir")),
        "RECO__SPARK__SHUFFLE_PARTITIONS": "2", "RECO__SPARK__DRIVER_MEMORY": "1g",
    })
    return subprocess.run([sys.executable, "-m", "tools", "refill-table"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _products(item: dict) -> list[str]:
    return [r["product_id"] for r in sorted(item["recommendations"], key=lambda r: r["rank"])]


def _counts(text: str) -> tuple[str, int, int, int, int, int]:
    match = SUMMARY.search(text)
    assert match, f"no summary line in the output:\n{text[-3000:]}"
    return (match.group(1), *(int(g.replace(",", "")) for g in match.groups()[1:]))


def test_a_lost_table_is_refilled_with_the_newest_record_per_customer(spark, kafka_broker, dynamodb_endpoint,
                                                                       published):
    from streaming.job import StreamingJob
    from tools.refill import refill

    folder, job_cfg, version = published
    own = _own_config(job_cfg, folder)
    store = ModelStore.from_config(own)
    model = store.load()
    lists = pd.read_parquet(folder / "out" / "versions" / version / "recommendations.parquet")
    batch_lists = {str(c): [str(p) for p in recs] for c, recs in zip(lists["customer_id"], lists["recommendations"])}
    assert len(batch_lists) == model.n_users

    # The stream: five known customers and a new one buy after the cutoff; one buys before it only
    # (the model has that purchase already: nothing enters the state for them).
    cutoff = datetime.fromisoformat(model.cutoff_time.replace("Z", "+00:00"))
    at = lambda **d: (cutoff + timedelta(**d)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # noqa: E731
    popular = [str(model.item_ids[i]) for i in model.popularity_order()[:20]]
    known = [str(c) for c in model.user_ids[:6]]
    streamed, before_cutoff_only = known[:5], known[5]
    newcomer = f"NEW-{uuid.uuid4().hex[:6]}"
    events = [{"event_id": f"e-{c}-{i}", "customer_id": c, "product_id": popular[(n + i) % 20], "quantity": 1,
               "event_time": at(hours=1, minutes=i)} for n, c in enumerate([*streamed, newcomer]) for i in range(3)]
    events.append({"event_id": "e-old", "customer_id": before_cutoff_only, "product_id": popular[0],
                   "quantity": 1, "event_time": at(days=-1)})
    _produce(own, events)
    job = StreamingJob(own, spark).start(available_now=True)
    job.await_available_now(timeout_s=300)
    state_customers = {*streamed, newcomer}
    on_topic = _latest_on_topic(own, state_customers)
    assert set(on_topic) == state_customers

    # Table lost; the command re-fills it.
    _delete_table(own)
    started = time.monotonic()
    done = _refill_subprocess(own)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    everyone = set(batch_lists) | state_customers
    assert _counts(done.stdout + done.stderr) == (
        version, len(batch_lists), len(state_customers), len(state_customers),
        len(everyone), len(state_customers & set(batch_lists)))    # stream records first: their batch writes skip
    print(f"refill subprocess: {seconds:.1f} s")

    items = _scan(own)
    assert set(items) == everyone
    created_ms = iso_to_ms(store.load_metadata(version)["created_at"])
    for customer, item in items.items():
        assert item["model_version"] == version
        if customer in state_customers:
            topic = on_topic[customer]
            assert item["source"] == "stream", customer
            assert _products(item) == [r["product_id"] for r in topic["recommendations"]], customer
            assert [float(r["score"]) for r in sorted(item["recommendations"], key=lambda r: r["rank"])] == \
                pytest.approx([r["score"] for r in topic["recommendations"]], abs=1e-5)
            assert (item["strategy"], item["last_event_ms"], item["purchases_since_cutoff"]) == \
                (topic["strategy"], topic["last_event_ms"], topic["purchases_since_cutoff"])
            assert [b["product_id"] for b in item["buy_again"]] == [b["product_id"] for b in topic["buy_again"]]
            assert "source_offsets" not in item        # the state does not keep them
        else:
            assert item["source"] == "batch", customer
            assert _products(item) == batch_lists[customer], customer
            assert (item["strategy"], item.get("last_event_ms"), item["computed_at_ms"]) == \
                ("personalized", None, created_ms)              # unknown: absent from the item
    assert items[before_cutoff_only]["source"] == "batch"

    # Newer items written since (a stream record with a later purchase, a batch record that knows
    # its purchase time) survive a second refill untouched; the rest is rewritten identically.
    newer_stream = RecommendationRecord(streamed[0], ["P-NEWER"], [1.0], "manual", "personalized",
                                        last_event_ms=int(items[streamed[0]]["last_event_ms"]) + 3_600_000,
                                        computed_at_ms=int(time.time() * 1000), source="stream")
    batch_only = sorted(set(batch_lists) - state_customers)[0]
    newer_batch = RecommendationRecord(batch_only, ["P-KNOWN"], [1.0], version, "personalized",
                                       last_event_ms=1, computed_at_ms=1, source="batch")
    writer = RecordWriter(own, to_topic=False)
    try:
        assert writer.write([newer_stream, newer_batch]).table_written == 2
    finally:
        writer.close()
    kept = {c: read_table_item(own, c) for c in (streamed[0], batch_only)}

    summary = refill(own, spark)
    assert (summary.version, summary.batch_records, summary.state_customers, summary.stream_records) == \
        (version, len(batch_lists), len(state_customers), len(state_customers))
    assert summary.skipped_older == len(state_customers & set(batch_lists)) + 2
    assert summary.written == len(state_customers) + len(batch_lists) - summary.skipped_older
    again = _scan(own)
    assert set(again) == everyone
    for customer, item in kept.items():
        assert again[customer] == item
    for customer in everyone - set(kept):
        if customer in state_customers:     # recomputed now: the same list, a later computed_at
            assert _products(again[customer]) == _products(items[customer])
            assert again[customer]["last_event_ms"] == items[customer]["last_event_ms"]
        else:
            assert again[customer] == items[customer]
