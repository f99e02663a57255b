"""The user-facing tools against the real broker and DynamoDB endpoint: replay, tail, lookup."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from models.clients import ensure_table, kafka_options
from models.config import REPO_ROOT
from models.records import RecommendationRecord, RecordWriter
from streaming.events import ValidationRules, validate_value
from tools.replay import InputError, ReplaySummary, replay, row_event_id
from tools.tail import tail

pytestmark = pytest.mark.integration

START = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _create_topic(cfg, name: str, partitions: int = 2) -> str:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(**kafka_options(cfg), request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


def _consume(cfg, topic: str, expected: int, timeout_s: float = 30) -> list:
    """Every message of ``topic`` (all partitions), waiting until ``expected`` arrived."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, **kafka_options(cfg), group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    messages: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                messages.extend(batch)
        # A little longer: more than expected must show up as a failure, not be missed.
        for batch in consumer.poll(timeout_ms=1000).values():
            messages.extend(batch)
    finally:
        consumer.close()
    return messages


def _transactions(n: int, customers: int, with_ids: bool = True) -> pd.DataFrame:
    """Interleaved customers, each one's purchases strictly later than the one before."""
    frame = pd.DataFrame({
        "customer_id": [f"C{i % customers:06d}" for i in range(n)],
        "product_id": [f"P{(i * 7) % 50:06d}" for i in range(n)],
        "quantity": [1 + i % 3 for i in range(n)],
        "event_time": [START + timedelta(seconds=i) for i in range(n)],
    })
    if with_ids:
        frame.insert(0, "transaction_id", [f"T{i:07d}" for i in range(n)])
    return frame


def _run(module: str, *args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def _env(cfg, **extra: str) -> dict[str, str]:
    return {"RECO__KAFKA__BOOTSTRAP_SERVERS": str(cfg.get_path("kafka.bootstrap_servers")),
            "RECO__DYNAMODB__ENDPOINT_URL": str(cfg.get_path("dynamodb.endpoint_url")), **extra}


# --------------------------------------------------------------------------------------------- replay


def test_replay_injects_malformed_and_duplicates_keyed_and_in_order(cfg, kafka_broker):
    topic = _create_topic(cfg, _unique("tx"))
    own = cfg.with_overrides({"kafka.topics.transactions": topic})
    frame = _transactions(300, customers=12)
    frame.loc[[5, 17, 250], "customer_id"] = None
    frame.loc[[40, 41], "product_id"] = ""
    summary = replay(own, frame, malformed_share=0.1, duplicate_share=0.05, seed=3)

    assert dict(summary.skipped) == {"missing customer_id": 3, "missing product_id": 2}
    assert summary.valid + summary.malformed_total == 295
    assert summary.sent == 295 + summary.duplicates and summary.failed == 0
    messages = _consume(own, topic, summary.sent)
    assert len(messages) == summary.sent

    rules, now = ValidationRules.from_config(own), int(time.time() * 1000)
    verdicts = [validate_value(m.value, rules, now) for m in messages]
    reasons = [v[-1] for v in verdicts if v[-1] is not None]
    assert len(reasons) == summary.malformed_total
    assert 0.04 < len(reasons) / 295 < 0.2
    assert len({r.split(":")[0] for r in reasons}) >= 4, reasons   # a mix of faults, not one kind

    by_customer = defaultdict(list)
    partitions = defaultdict(set)
    for message, verdict in zip(messages, verdicts):
        key = message.key.decode()
        partitions[key].add(message.partition)
        if verdict[-1] is None:
            assert verdict[1] == key                     # key = customer_id of the event
            by_customer[key].append((message.offset, verdict[0], message.value))
    assert set(partitions) <= set(frame["customer_id"].dropna())
    assert all(len(p) == 1 for p in partitions.values())  # a customer's events share one partition

    sent_rows = frame.dropna(subset=["customer_id"])
    sent_rows = sent_rows[sent_rows["product_id"] != ""]
    copies = Counter(event_id for events in by_customer.values() for _, event_id, _ in events)
    assert sum(count - 1 for count in copies.values()) == summary.duplicates > 0
    assert max(copies.values()) == 2
    for customer, events in by_customer.items():
        events.sort()                                     # offset order within the partition
        ids = [event_id for _, event_id, _ in events]
        distinct = [e for i, e in enumerate(ids) if i == 0 or ids[i - 1] != e]
        assert len(distinct) == len(set(ids))             # a duplicate comes right after its original
        expected = [t for t in sent_rows.loc[sent_rows["customer_id"] == customer, "transaction_id"]
                    if t in copies]
        assert distinct == expected                       # the file's order, per customer
        for (_, first_id, first_value), (_, second_id, second_value) in zip(events, events[1:]):
            if first_id == second_id:
                assert first_value == second_value        # the very same event re-sent


def test_replay_paces_roughly_at_the_requested_rate(cfg, kafka_broker):
    topic = _create_topic(cfg, _unique("tx-rate"))
    summary = replay(cfg, _transactions(60, customers=5), rate=40, topic=topic)
    assert summary.sent == 60
    # 60 messages at 40/s take about 1.4-1.5 s (the bucket allows a burst of 4): generous bounds.
    assert 1.2 <= summary.elapsed_s < 20
    assert summary.achieved_rate < 40 * 1.3


def test_replay_cli_filters_skips_limits_and_stamps_the_current_time(cfg, kafka_broker, tmp_path):
    topic = _create_topic(cfg, _unique("tx-cli"))
    frame = _transactions(50, customers=5, with_ids=False)
    frame.to_csv(tmp_path / "tx.csv.gz", index=False)
    before = datetime.now(UTC) - timedelta(seconds=1)
    result = _run("tools.replay", str(tmp_path / "tx.csv.gz"), "--topic", topic, "--skip", "10",
                  "--limit", "6", "--customers", "C000001,C000003", "--now", "--quiet", env=_env(cfg))
    assert result.returncode == 0, result.stderr
    assert "6 messages sent" in result.stdout

    messages = _consume(cfg, topic, 6)
    events = sorted((json.loads(m.value) for m in messages), key=lambda e: e["event_time"])
    picked = [i for i in range(10, 50) if i % 5 in (1, 3)][:6]
    assert sorted(e["event_id"] for e in events) == sorted(row_event_id(frame.iloc[i].to_dict(), i)
                                                           for i in picked)
    assert sorted(e["product_id"] for e in events) == sorted(frame.loc[picked, "product_id"])
    assert all(before <= datetime.fromisoformat(e["event_time"].replace("Z", "+00:00"))
               <= datetime.now(UTC) for e in events)


def test_replay_cli_generates_the_sample_data_and_skips_its_rows_without_ids(cfg, kafka_broker):
    from batch_training.generate import generate

    topic = _create_topic(cfg, _unique("tx-gen"))
    result = _run("tools.replay", "--generate", "0.005", "--seed", "7", "--limit", "300", "--topic", topic,
                  "--quiet", env=_env(cfg))
    assert result.returncode == 0, result.stderr
    rows_read = int(re.search(r"input rows read: ([\d,]+)", result.stdout)[1].replace(",", ""))
    rows = generate(0.005, 7)[0].head(rows_read)
    no_customer = int(rows["customer_id"].isna().sum())
    assert "300 messages sent" in result.stdout and f"missing customer_id: {no_customer}" in result.stdout
    events = [json.loads(m.value) for m in _consume(cfg, topic, 300)]
    assert len(events) == 300
    assert {e["event_id"] for e in events} <= set(rows["transaction_id"])


def test_replay_cli_exit_codes_for_bad_input_and_unreachable_broker(cfg, tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user": ["C1"], "item": ["P1"]}).to_csv(bad, index=False)
    result = _run("tools.replay", str(bad), "--quiet", env=_env(cfg))
    assert result.returncode == 2 and "customer_id" in result.stderr and "bad.csv" in result.stderr
    result = _run("tools.replay", str(tmp_path / "missing.parquet"), env=_env(cfg))
    assert result.returncode == 2 and "does not exist" in result.stderr
    pd.DataFrame({"customer_id": ["C1"], "product_id": ["P1"], "event_time": ["2025-01-01T00:00:00Z"]}
                 ).to_parquet(tmp_path / "one.parquet")
    result = _run("tools.replay", str(tmp_path / "one.parquet"), "--connect-timeout", "2", "--quiet",
                  env=_env(cfg, RECO__KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert result.returncode == 3 and "127.0.0.1:1" in result.stderr
    with pytest.raises(InputError, match="between 0 and 1"):
        replay(cfg, [], malformed_share=1.5)


def test_event_ids_are_stable_per_row_and_distinct_between_rows():
    row = {"customer_id": "C1", "product_id": "P1", "quantity": 1, "event_time": "2025-01-01T00:00:00Z"}
    assert row_event_id(row, 7) == row_event_id(dict(row), 7)
    assert row_event_id(row, 7) != row_event_id(row, 8)        # the same purchase twice in a file
    assert row_event_id({**row, "transaction_id": "T42"}, 7) == "T42"


# --------------------------------------------------------------------------------------------- tail


def _record(customer: str, products: int = 10, event_ms: int | None = None) -> RecommendationRecord:
    now = int(time.time() * 1000)
    return RecommendationRecord(customer_id=customer, product_ids=[f"P{customer[1:]}{i:02d}" for i in range(products)],
                                scores=[round(1 - i / 20, 4) for i in range(products)], model_version="v-test-7",
                                strategy="personalized", last_event_ms=event_ms or now - 1500,
                                computed_at_ms=now, source="stream")


def test_tail_prints_one_line_per_record_filters_by_customer_and_exits_as_documented(cfg, kafka_broker):
    topic = _create_topic(cfg, _unique("recs"))
    own = cfg.with_overrides({"kafka.topics.recommendations": topic})
    records = [_record(c) for c in ("C1", "C2", "C3")]
    writer = RecordWriter(own, to_table=False)
    writer.write(records)
    writer.close()
    env = _env(cfg, RECO__KAFKA__TOPICS__RECOMMENDATIONS=topic)

    result = _run("tools.tail", "recommendations", "--from-beginning", "--max", "3", "--timeout", "30", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for record in records:
        line = next(line for line in lines if f" {record.customer_id} " in line)
        assert "v-test-7" in line and "personalized" in line and "latency" in line
        assert f"{record.product_ids[0]} 1.000" in line and "(+5 more)" in line

    result = _run("tools.tail", "recommendations", "--from-beginning", "--customer", "C2", "--timeout", "6", env=env)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1 and " C2 " in result.stdout

    result = _run("tools.tail", "recommendations", "--from-beginning", "--customer", "C2", "--json",
                  "--max", "1", "--timeout", "30", env=env)
    assert json.loads(result.stdout) == json.loads(records[1].to_json_bytes())

    result = _run("tools.tail", "recommendations", "--from-beginning", "--customer", "NOBODY", "--timeout", "3",
                  env=env)
    assert (result.returncode, result.stdout) == (1, "")
    result = _run("tools.tail", "recommendations", "--customer", "NOBODY", "--timeout", "2", "--allow-empty",
                  env=env)
    assert result.returncode == 0

    result = _run("tools.tail", "transactions", "--timeout", "2", "--connect-timeout", "2",
                  env=_env(cfg, RECO__KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert result.returncode == 3 and "127.0.0.1:1" in result.stderr


def test_tail_shows_raw_bytes_of_bad_transactions_and_dead_letters(cfg, kafka_broker):
    from kafka import KafkaProducer

    tx_topic, dl_topic = _create_topic(cfg, _unique("tx-tail")), _create_topic(cfg, _unique("dl-tail"))
    producer = KafkaProducer(**kafka_options(cfg))
    good = {"event_id": "e1", "customer_id": "C9", "product_id": "P5", "quantity": 2,
            "event_time": "2025-03-04T10:21:07Z"}
    broken = b'{"event_id": "e2", "customer_id": "C9", "prod' + b"x" * 200
    producer.send(tx_topic, key=b"C9", value=json.dumps(good).encode())
    producer.send(tx_topic, key=b"C9", value=broken)
    # As the streaming job writes them: original key and bytes, reason and source in dlq.* headers.
    producer.send(dl_topic, key=b"C9", value=broken, headers=[
        ("dlq.reason", b"not_json"), ("dlq.source.topic", tx_topic.encode()), ("dlq.source.partition", b"1"),
        ("dlq.source.offset", b"17"), ("dlq.source.timestamp_ms", b"1741083667000")])
    producer.send(dl_topic, key=b"C7", value=b'{"customer_id": "C7", "quantity": -1}', headers=[
        ("dlq.reason", b"non_positive_quantity"), ("dlq.source.topic", tx_topic.encode()),
        ("dlq.source.partition", b"0"), ("dlq.source.offset", b"3")])
    producer.flush()
    producer.close()

    out = io.StringIO()
    assert tail(cfg, "transactions", topic=tx_topic, from_beginning=True, max_records=2, timeout_s=30, out=out) == 2
    good_line, bad_line = sorted(out.getvalue().splitlines(), key=lambda line: "NOT AN EVENT" in line)
    assert "C9" in good_line and "bought P5 x2" in good_line and "2025-03-04T10:21:07Z" in good_line
    assert "NOT AN EVENT" in bad_line and '"prod' in bad_line

    out = io.StringIO()
    assert tail(cfg, "dead-letter", topic=dl_topic, from_beginning=True, customers=["C9"], timeout_s=5, out=out) == 1
    line = out.getvalue().strip()
    assert "reason not_json" in line and f"{tx_topic}[1]@17" in line and "key C9" in line
    assert f"({len(broken)} chars)" in line and len(line) < 300     # the original abbreviated, its length noted

    out = io.StringIO()
    assert tail(cfg, "dead-letter", topic=dl_topic, from_beginning=True, max_records=2, timeout_s=30,
                as_json=True, out=out) == 2
    documents = {d["key"]: d for d in map(json.loads, out.getvalue().splitlines())}
    assert documents["C7"]["reason"] == "non_positive_quantity" and documents["C7"]["source_offset"] == "3"
    assert documents["C9"]["value"] == broken.decode()


# --------------------------------------------------------------------------------------------- lookup


def test_lookup_prints_the_stored_top10_and_exits_1_for_an_unknown_customer(cfg, dynamodb_endpoint):
    table = _unique("recs")
    own = cfg.with_overrides({"dynamodb.table": table})
    ensure_table(own)
    record = _record("C42", event_ms=1_741_083_667_000)
    writer = RecordWriter(own, to_topic=False)
    assert writer.write([record]).table_written == 1
    writer.close()
    env = _env(cfg, RECO__DYNAMODB__TABLE=table)

    result = _run("tools.lookup", "C42", env=env)
    assert result.returncode == 0, result.stderr
    ranked = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in ranked] == [(f"{i}.", p) for i, p in enumerate(record.product_ids, 1)]
    assert [float(r[2]) for r in ranked] == record.scores
    assert "v-test-7" in result.stdout and "2025-03-04T10:21:07.000Z" in result.stdout

    result = _run("tools.lookup", "C42", "--json", env=env)
    stored = json.loads(result.stdout)
    assert [r["product_id"] for r in stored["recommendations"]] == record.product_ids
    assert stored["last_event_ms"] == 1_741_083_667_000

    result = _run("tools.lookup", "C-UNKNOWN", env=env)
    assert result.returncode == 1 and "C-UNKNOWN" in result.stderr and table in result.stderr

    result = _run("tools.lookup", "C42", env=_env(cfg, RECO__DYNAMODB__TABLE=_unique("absent")))
    assert result.returncode == 3 and "does not exist" in result.stderr
    result = _run("tools.lookup", "C42", env=_env(cfg, RECO__DYNAMODB__TABLE=table,
                                                  RECO__DYNAMODB__ENDPOINT_URL="http://127.0.0.1:1"))
    assert result.returncode == 3 and "http://127.0.0.1:1" in result.stderr and table in result.stderr


def test_replay_summary_reports_every_count():
    summary = ReplaySummary(topic="t", rows_read=10, sent=9, valid=6, duplicates=1, elapsed_s=2.0)
    summary.malformed.update({"not_json": 2})
    summary.skipped.update({"missing customer_id": 1})
    text = str(summary)
    for fragment in ("9 messages sent", "6 valid", "2 malformed", "1 duplicates", "missing customer_id: 1",
                     "not_json 2", "4.5 messages/s"):
        assert fragment in text
