"""The streaming driver's /metrics and /healthz, scraped from a running job on the real services.

The figures are checked against what the test sent: messages read, valid and invalid by reason,
purchases by outcome, customers refreshed, one latency per new purchase, the served model, the
state's rows and a Kafka lag of 0 once the job caught up.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.clients import ensure_table, ensure_topics
from models.store import ModelStore
from tests.isolation import isolated_config
from tests.small_models import small_als
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

AFTER_CUTOFF = "2025-02-01T10:00:00Z"


@pytest.fixture
def job_cfg(cfg, kafka_broker, dynamodb_endpoint, tmp_path):
    own = isolated_config(cfg, tmp_path, {
        "streaming.trigger_interval": "1 second", "streaming.dead_letter_trigger_interval": "1 second",
        "streaming.metrics.port": 0})
    ensure_topics(own)
    ensure_table(own)
    ModelStore.from_config(own).publish(small_als("v-metrics").validate())
    return own


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(port: int) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape."""
    _, text = scrape(port)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_running_job_reports_what_it_was_sent(spark, job_cfg):
    from kafka import KafkaProducer

    from models.clients import kafka_options
    from streaming.job import StreamingJob

    job = StreamingJob(job_cfg, spark).start()
    try:
        port = job.metrics_port
        wait_for(lambda: scrape(port, "/healthz")[0] == 200, 120, "the job to report ready")
        purchases = [{"event_id": f"m-{i}", "customer_id": customer, "product_id": f"P{i}", "quantity": 1,
                      "event_time": AFTER_CUTOFF} for i, customer in enumerate(["K1", "K1", "K2", "NEW-1"])]
        bad = [b"not json", b'{"event_id":"b1","customer_id":"C\\u001b[31m","product_id":"P1",'
                            b'"event_time":"2025-02-01T10:00:00Z"}', json.dumps({"event_id": "b2"}).encode()]
        producer = KafkaProducer(**kafka_options(job_cfg), acks="all")
        for value in [json.dumps(p).encode() for p in purchases] + bad:
            producer.send(job_cfg.get_path("kafka.topics.transactions"), value=value)
        producer.flush()
        producer.close()

        def settled():
            current = samples(port)
            done = (current.get(("reco_customers_refreshed_total", ()), 0) >= 3
                    and current.get(("reco_input_rows_total", ()), 0) >= 7      # progress comes a bit later
                    and sum(v for (name, _), v in current.items() if name == "reco_invalid_rows_total") >= 3)
            return current if done else None

        figures = wait_for(settled, 180, "the purchases scored and the bad messages dead-lettered")
        assert figures[("reco_input_rows_total", ())] == 7
        assert figures[("reco_valid_rows_total", ())] == 4
        assert {labels[0][1]: v for (name, labels), v in figures.items() if name == "reco_invalid_rows_total"} \
            == {"not_json": 1, "invalid_text": 1, "missing_field": 1}
        assert figures[("reco_purchases_total", (("outcome", "new"),))] == 4
        assert figures[("reco_customers_refreshed_total", ())] == 3
        assert figures[("reco_event_to_record_latency_seconds_count", ())] == 4
        assert figures[("reco_unscored_purchases_total", ())] == 0
        assert figures[("reco_model_info", (("version", "v-metrics"),))] == 1
        assert figures[("reco_state_rows", ())] == 3
        lags = {labels: v for (name, labels), v in figures.items() if name == "reco_kafka_lag_messages"}
        assert len(lags) == int(job_cfg.get_path("kafka.partitions")) and set(lags.values()) == {0}
        status, body = scrape(port, "/healthz")
        assert status == 200 and body.startswith("ok")
        # Spark's own metrics system has each query as a source too (spark.sql.streaming.metricsEnabled).
        metrics_system = spark.sparkContext._jsc.sc().env().metricsSystem()
        for query in job.queries:
            assert metrics_system.getSourcesByName(f"spark.streaming.{query.name}").size() == 1, query.name
    finally:
        job.stop()
    assert job.health() == (False, "not running")
    with pytest.raises(OSError):
        scrape(port, "/healthz")            # the endpoint went away with the job


def test_a_taken_metrics_port_is_a_clear_error():
    import socket

    from streaming.observability import Exporter, serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve metrics on 127.0.0.1:{port} .*streaming.metrics.port"):
            serve(Exporter(), lambda: (True, "ok"), "127.0.0.1", port)
