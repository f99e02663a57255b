"""The streaming scorer end to end: the real broker, the real DynamoDB endpoint, the shared Spark.

One small implicit ALS model is trained here on generated purchases (with categories) and
published to a store of the test's own; each scenario then streams events through the job on
its own topics, table and checkpoint and checks the invariants of issue 4.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models import scoring
from models.artifact import ModelArtifact, new_version
from models.clients import ensure_table, ensure_topics, kafka_options
from models.records import read_table_item
from models.store import ModelStore
from tests.isolation import isolated_config, process_env
from tests.topics import read_topic
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

K = 10
log = logging.getLogger(__name__)


# -- the model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def purchases():
    """Clean generated purchases (one row each) and the product catalogue with categories."""
    from batch_training.generate import generate

    transactions, products = generate(factor=0.03, seed=11)
    clean = transactions.dropna(subset=["customer_id", "product_id"]).copy()
    clean["quantity"] = pd.to_numeric(clean["quantity"], errors="coerce")
    clean["event_time"] = pd.to_datetime(clean["event_time"], errors="coerce", utc=True)
    clean = clean[(clean["quantity"] > 0) & clean["event_time"].notna()]
    return clean, products


@pytest.fixture(scope="module")
def model(spark, purchases) -> ModelArtifact:
    """Implicit ALS (Spark ML, through the batch job's fit) exported into a ModelArtifact."""
    from batch_training.train import AlsParams, fit_als

    clean, _ = purchases
    pairs = clean.groupby(["customer_id", "product_id"]).size().rename("count").reset_index()
    user_ids, item_ids = np.sort(pairs["customer_id"].unique()), np.sort(pairs["product_id"].unique())
    pairs["user"] = np.searchsorted(user_ids, pairs["customer_id"])
    pairs["item"] = np.searchsorted(item_ids, pairs["product_id"])
    pairs = pairs.sort_values(["user", "item"]).reset_index(drop=True)
    params = AlsParams(rank=16, reg_param=0.1, alpha=1.0, max_iter=10, blocks=2, seed=3)
    frame = spark.createDataFrame(pairs[["user", "item"]].assign(count=pairs["count"].astype(float)))
    factors = fit_als(frame, params, len(user_ids), len(item_ids))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(pairs["user"], minlength=len(user_ids)))])
    cutoff = clean["event_time"].max()
    return ModelArtifact(
        version=new_version(), model_type="als", item_ids=item_ids, item_factors=factors.item_factors,
        user_ids=user_ids, user_factors=factors.user_factors,
        popularity=np.bincount(pairs["item"], minlength=len(item_ids)).astype(float),
        user_items_indptr=indptr, user_items_indices=pairs["item"].to_numpy(np.int32),
        user_items_counts=pairs["count"].to_numpy(np.float32), params=params.as_dict(),
        cutoff_time=cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z").validate()


def batch_top_k(model: ModelArtifact, customer_ids) -> list[list[str]]:
    """The batch job's lists: the trained user factors, purchased products excluded."""
    users = model.user_index(customer_ids)
    indptr, indices, _ = model.user_items_of(users)
    item_idx, _ = scoring.top_k(model.user_factors[users], model.item_factors, K, exclude=(indptr, indices))
    return [[str(model.item_ids[i]) for i in row if i >= 0] for row in item_idx]


def cutoff_plus(model: ModelArtifact, **delta) -> str:
    cutoff = datetime.fromisoformat(model.cutoff_time.replace("Z", "+00:00"))
    return (cutoff + timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# -- per-test services -------------------------------------------------------------------------
def own_config(cfg, folder, model: ModelArtifact):
    """Own topics, table, checkpoint and model store; the model published in the store."""
    own = isolated_config(cfg, folder, {
        "streaming.trigger_interval": "1 second", "streaming.dead_letter_trigger_interval": "1 second",
        "streaming.model_poll_interval": "1 second",
        "streaming.state_partitions": 3,   # not the session's shuffle partitions (tests/conftest.py)
    })
    ensure_topics(own)
    ensure_table(own)
    ModelStore.from_config(own).publish(model)
    return own


@pytest.fixture
def job_cfg(cfg, kafka_broker, dynamodb_endpoint, tmp_path, model):
    return own_config(cfg, tmp_path, model)


def event(event_id: str, customer_id: str, product_id: str, event_time: str, quantity=1) -> dict:
    return {"event_id": event_id, "customer_id": customer_id, "product_id": product_id,
            "quantity": quantity, "event_time": event_time}


def produce(cfg, messages: list) -> None:
    """Send dicts as JSON (bytes and None as they are), keyed by customer when there is one."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka_options(cfg), acks="all", linger_ms=5)
    for message in messages:
        if isinstance(message, dict):
            key = str(message.get("customer_id", "")).encode() or None
            value = json.dumps(message).encode()
        else:
            key, value = None, message
        producer.send(cfg.get_path("kafka.topics.transactions"), key=key, value=value)
    producer.flush(timeout=30)
    producer.close()


def consume(cfg, topic_key: str, expect_at_least: int = 1, timeout_s: float = 60) -> list:
    """Every message of the topic so far (up to its end offsets, at least ``expect_at_least``)."""
    return read_topic(cfg, str(cfg.get_path(topic_key)), expect_at_least, timeout_s)


def run_available_now(spark, cfg):
    from streaming.job import StreamingJob

    job = StreamingJob(cfg, spark).start(available_now=True)
    job.await_available_now(timeout_s=300)
    return job


def latest_records(cfg) -> dict[str, dict]:
    """The newest message per customer on the recommendations topic."""
    latest: dict[str, dict] = {}
    for message in consume(cfg, "kafka.topics.recommendations"):
        record = json.loads(message.value)
        assert message.key.decode() == record["customer_id"]
        previous = latest.get(record["customer_id"])
        if previous is None or (record["last_event_ms"], record["computed_at_ms"]) >= \
                (previous["last_event_ms"], previous["computed_at_ms"]):
            latest[record["customer_id"]] = record
    return latest


def products_of(record: dict) -> list[str]:
    return [r["product_id"] for r in record["recommendations"]]


# -- scenario: known, new and category customers, bad input, replays ---------------------------
@pytest.fixture(scope="module")
def scenario(spark, cfg, _services, tmp_path_factory, model, purchases):
    """Three runs of the job over one topic and checkpoint; returns what each run produced."""
    job_cfg = own_config(cfg, tmp_path_factory.mktemp("scenario"), model)
    clean, products = purchases
    rng = np.random.default_rng(5)
    known = [str(c) for c in rng.choice(model.user_ids, 40, replace=False)]
    explorers = _explorers(model, clean, products, exclude=known)
    newcomer = f"NEW-{uuid.uuid4().hex[:6]}"
    popular_product = str(model.item_ids[model.popularity_order()[0]])
    t1, t2 = cutoff_plus(model, hours=1), cutoff_plus(model, hours=2)

    run1 = [event(f"u-{c}", c, "UNKNOWN-PRODUCT", t1) for c in known]
    run1.append(event(f"n1-{newcomer}", newcomer, "UNKNOWN-PRODUCT", t1))
    bad = _bad_messages(t1)
    # Purchases the model already has (before its cutoff): only the cutoff the driver hands the
    # state's tasks for the batch (streaming/served.py) tells them apart from new ones.
    in_model = [event(f"old-{c}", c, popular_product, cutoff_plus(model, days=-1)) for c in known[:3]]
    good_and_bad = run1[:20] + [m for m, _ in bad] + in_model + run1[20:]
    produce(job_cfg, good_and_bad)
    first = run_available_now(spark, job_cfg)
    after_run1 = latest_records(job_cfg)

    run2 = [event(f"n2-{newcomer}", newcomer, popular_product, t2)]
    run2 += [event(f"x-{x['customer_id']}-{i}", x["customer_id"], p, t2)
             for x in explorers for i, p in enumerate(x["new_products"])]
    produce(job_cfg, run2)
    second = run_available_now(spark, job_cfg)
    after_run2 = latest_records(job_cfg)
    table_after_run2 = {c: read_table_item(job_cfg, c)
                        for c in [*known, newcomer, *(x["customer_id"] for x in explorers)]}

    produce(job_cfg, run1 + run2)   # the same events again: new offsets, same event ids
    third = run_available_now(spark, job_cfg)
    return dict(cfg=job_cfg, known=known, newcomer=newcomer, explorers=explorers, products=products,
                popular_product=popular_product, bad=bad, run1=run1, run2=run2, in_model=in_model,
                jobs=(first, second, third), after_run1=after_run1, after_run2=after_run2,
                table_after_run2=table_after_run2)


def _explorers(model, clean, products, exclude, n: int = 3, buys: int = 5) -> list[dict]:
    """The ``n`` lightest known customers, each with the most popular category they never bought
    and that category's ``buys`` most popular products (what they will buy)."""
    category_of = products.set_index("product_id")["category"]
    bought = clean.assign(category=clean["product_id"].map(category_of))
    activity = bought.groupby("customer_id").size().sort_values(kind="stable")
    item_category = pd.Series(model.item_ids).map(category_of).to_numpy()
    by_popularity = pd.Series(model.popularity).groupby(item_category).sum().sort_values(ascending=False, kind="stable")
    explorers = []
    for customer in [c for c in activity.index if c not in exclude][:n]:
        own = set(bought.loc[bought["customer_id"] == customer, "category"])
        category = next(c for c in by_popularity.index if c not in own)
        in_category = np.flatnonzero(item_category == category)
        best = in_category[np.argsort(-model.popularity[in_category], kind="stable")][:buys]
        explorers.append({"customer_id": str(customer), "category": category,
                          "new_products": [str(model.item_ids[i]) for i in best]})
    return explorers


def _bad_messages(event_time: str) -> list[tuple[bytes | dict, str]]:
    good = event("bad-0", "C-BAD", "P1", event_time)
    return [
        (b"this is not json", "not_json"),
        (b"\xff\xfe\xfa binary", "not_json"),
        (b"[1, 2, 3]", "not_object"),
        ({k: v for k, v in good.items() if k != "customer_id"}, "missing_field:customer_id"),
        ({**good, "event_id": "bad-1", "quantity": "two"}, "wrong_type:quantity"),
        ({**good, "event_id": "bad-2", "quantity": 0}, "non_positive_quantity"),
        ({**good, "event_id": "bad-3", "quantity": 10 ** 7}, "absurd_quantity"),
        ({**good, "event_id": "bad-4", "product_id": "P" * 500}, "id_too_long:product_id"),
        ({**good, "event_id": "bad-5", "event_time": "last tuesday"}, "unparseable_time"),
        ({**good, "event_id": "bad-6", "customer_id": 12345}, "wrong_type:customer_id"),
        *_hostile_messages(good),
    ]


def _hostile_messages(good: dict) -> list[tuple[bytes, str]]:
    """Input that once crash-looped the job (a lone surrogate failed the Arrow conversion of the
    validated batch) and its kin: each must be dead-lettered while the batch goes on."""
    text = json.dumps(good)
    return [
        (text.replace('"C-BAD"', '"C\\ud800x"').replace("bad-0", "bad-h1").encode(), "invalid_text:customer_id"),
        (text.replace('"P1"', '"P\\udfff"').replace("bad-0", "bad-h2").encode(), "invalid_text:product_id"),
        (text.replace("C-BAD", "C\\u001b[31mRED").replace("bad-0", "bad-h3").encode(), "invalid_text:customer_id"),
        (text.replace("bad-0", "bad-h4\\u0000").encode(), "invalid_text:event_id"),
        (b"\xef\xbb\xbf" + text.replace("bad-0", "bad-h5").encode(), "not_json"),
        (text.replace("bad-0", "bad-h6").encode("utf-16"), "not_json"),
        (text.replace("bad-0", "bad-h7").encode()[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "too_deep"),
        (json.dumps({**good, "event_id": "bad-h8", "event_time": None}).encode(), "missing_field:event_time"),
    ]


# Fold-in against trained factors: the same solve in float32, so scores agree to rounding.
SCORE_EPSILON = 1e-4


def test_known_customers_without_new_purchases_agree_with_the_batch_model(scenario, model):
    """Their only new purchase is of a product the model does not know: the fold-in of their
    trained counts must give the batch top-10. It is exact up to float rounding (the last ALS
    half-step is the same solve): each rank holds the batch list's product, or one whose batch
    score ties it within SCORE_EPSILON (a near-tie that rounding may swap), and every score is the
    batch score of its product within SCORE_EPSILON."""
    records = scenario["after_run1"]
    users = model.user_index(scenario["known"])
    indptr, indices, _ = model.user_items_of(users)
    for row, customer in enumerate(scenario["known"]):
        record = records[customer]
        assert record["strategy"] == "personalized" and record["model_version"] == model.version
        assert record["purchases_since_cutoff"] == 1     # kept in the state, but it does not score
        scores = model.item_factors @ model.user_factors[users[row]]
        scores[indices[indptr[row]:indptr[row + 1]]] = -np.inf          # purchased: excluded
        best = np.sort(scores)[::-1][:K]
        streamed = model.item_index(products_of(record))
        assert len(streamed) == K and (streamed >= 0).all()
        assert np.abs(scores[streamed] - best).max() <= SCORE_EPSILON, (customer, scores[streamed] - best)
        assert np.abs(np.array([r["score"] for r in record["recommendations"]]) - scores[streamed]).max() \
            <= SCORE_EPSILON, customer


def test_a_new_category_rises_in_the_next_top_10(scenario, model):
    """Light customers (the three with the fewest purchases) buy five products of a popular
    category they never bought. With implicit ALS a few purchases weigh little against a long
    history: on this data five such purchases raise the category in the top-10 of about 70 % of
    the lightest quarter of customers but under 10 % of the heaviest half, so light customers are
    the ones whose lists must visibly move."""
    category_of = scenario["products"].set_index("product_id")["category"]
    for explorer in scenario["explorers"]:
        before = batch_top_k(model, [explorer["customer_id"]])[0]
        after = products_of(scenario["after_run2"][explorer["customer_id"]])
        in_category = [sum(category_of.get(p) == explorer["category"] for p in ranked) for ranked in (before, after)]
        assert in_category[1] > in_category[0], f"{explorer}: {in_category} (before, after)"
        assert not set(explorer["new_products"]) & set(after)      # bought: excluded
        assert scenario["after_run2"][explorer["customer_id"]]["purchases_since_cutoff"] == 5


def test_a_new_customer_gets_popularity_then_personalised_lists(scenario, model):
    newcomer = scenario["newcomer"]
    first, second = scenario["after_run1"][newcomer], scenario["after_run2"][newcomer]
    popular = [str(model.item_ids[i]) for i in model.popularity_order()[:K]]
    assert first["strategy"] == "popularity" and products_of(first) == popular
    assert second["strategy"] == "personalized"
    assert scenario["popular_product"] not in products_of(second)
    assert products_of(second) != popular
    assert scenario["table_after_run2"][newcomer]["strategy"] == "personalized"


def test_bad_events_go_to_the_dead_letter_topic_and_good_ones_are_processed(scenario):
    cfg, bad = scenario["cfg"], scenario["bad"]
    letters = consume(cfg, "kafka.topics.dead_letter", expect_at_least=len(bad))
    assert len(letters) == len(bad)          # each bad message once
    by_value = {m.value: m for m in letters}
    for message, reason in bad:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        letter = by_value[raw]               # the original bytes, untouched
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["dlq.reason"] == reason
        assert headers["dlq.source.topic"] == cfg.get_path("kafka.topics.transactions")
        assert int(headers["dlq.source.offset"]) >= 0 and headers["dlq.source.partition"] in ("0", "1")
    good_customers = {e["customer_id"] for e in scenario["run1"]}
    assert good_customers <= set(scenario["after_run1"])
    # The per-batch figures (what the log line and the listener report) add up.
    first_run = scenario["jobs"][0].metrics
    scoring = [r for r in first_run.reports if r.query == "reco-scoring"]
    assert sum(r.input_rows for r in scoring) == len(scenario["run1"]) + len(bad) + len(scenario["in_model"])
    assert sum(r.before_cutoff_events for r in scoring) == len(scenario["in_model"])
    assert sum(r.invalid_rows for r in scoring) == len(bad) == first_run.totals["dead_lettered"]
    assert sum(r.new_events for r in scoring) == len(scenario["run1"])
    assert sum(r.customers_refreshed for r in scoring) == len(good_customers)
    assert all(r.latency_p95_ms >= r.latency_p50_ms > 0 for r in scoring if r.customers_refreshed)


def test_replayed_events_change_nothing(scenario):
    cfg, third = scenario["cfg"], scenario["jobs"][2]
    assert third.metrics.totals["new_events"] == 0
    assert third.metrics.totals["duplicate_events"] == len(scenario["run1"]) + len(scenario["run2"])
    assert third.metrics.totals["customers_refreshed"] == 0
    assert latest_records(cfg) == scenario["after_run2"]
    for customer, before in scenario["table_after_run2"].items():
        assert read_table_item(cfg, customer) == before


def test_the_state_has_the_configured_number_of_partitions(scenario):
    """streaming.state_partitions, not the session's shuffle partitions, decides how the state is
    partitioned, and the checkpoint keeps that number for the later runs (three runs here)."""
    from streaming.settings import StreamingSettings

    cfg = scenario["cfg"]
    assert cfg.get_path("spark.shuffle_partitions") != 3
    state = Path(StreamingSettings.from_config(cfg).checkpoint_dir) / "scoring" / "state" / "0"
    assert sorted(p.name for p in state.iterdir() if p.name.isdigit()) == ["0", "1", "2"]


# -- hot swap ----------------------------------------------------------------------------------
def _break_and_point_to(store: ModelStore, model: ModelArtifact) -> str:
    """Publish a version, then corrupt one of its files behind the store's back (a disk or copy
    fault); the pointer names it, so the running job must refuse it."""
    version = store.write(replace(model, version=new_version()))
    factors = store.backend.root / "versions" / version / "item_factors.npy"
    factors.write_bytes(factors.read_bytes()[:-64])
    store.backend.put_bytes("CURRENT", json.dumps({"version": version, "published_at": "now"}).encode())
    return version


def test_a_model_published_while_events_flow_is_picked_up(spark, job_cfg, model, caplog):
    """Events flow all along (a producer thread); once the job has scored with the first model a
    second is published, and once that is served a broken third is pointed at."""
    from streaming.job import StreamingJob

    store = ModelStore.from_config(job_cfg)
    customers = [str(c) for c in model.user_ids[:6]] + ["NEW-HOT-1", "NEW-HOT-2"]
    products = [str(p) for p in model.item_ids[model.popularity_order()[:40]]]
    second = replace(model, version=new_version(), cutoff_time=cutoff_plus(model, minutes=40))
    caplog.set_level(logging.INFO, logger="streaming")
    events: list[dict] = []
    stop_flow = threading.Event()

    def flow() -> None:                   # one purchase a minute (event time) after the first cutoff
        # Until the test has seen each step happen (however slow the machine): no fixed count.
        # The cap only bounds a test that hangs; its event times stay before the broken cutoff.
        while not stop_flow.is_set() and len(events) < 20_000:
            batch = [event(f"hot-{i}", customers[i % len(customers)], products[i % len(products)],
                           cutoff_plus(model, minutes=i + 1)) for i in range(len(events), len(events) + 5)]
            produce(job_cfg, batch)
            events.extend(batch)
            time.sleep(0.4)

    job = StreamingJob(job_cfg, spark).start()
    producer = threading.Thread(target=flow, daemon=True)
    producer.start()
    try:
        wait_for(lambda: job.metrics.totals["new_events"] >= 40, 240, "purchases scored with the first model")
        store.publish(second)           # purchases 1-40 min after the first cutoff are in its window
        wait_for(lambda: job.holder.model.version == second.version, 120, "the second model served")
        scored = job.metrics.totals["new_events"]
        wait_for(lambda: job.metrics.totals["new_events"] >= scored + 20, 120, "purchases scored with it")
        # A broken version with a later cutoff: were its cutoff applied, the state would drop
        # every purchase of the flow as "already in the model" and refresh nobody.
        broken = _break_and_point_to(store, replace(model, cutoff_time=cutoff_plus(second, days=30)))
        wait_for(lambda: broken in job.holder.refused, 120, "the broken model refused")
        scored = job.metrics.totals["new_events"]
        wait_for(lambda: job.metrics.totals["new_events"] >= scored + 20, 120, "purchases scored after it")
        stop_flow.set()
        producer.join(timeout=60)
        job.process_all_available()
        assert all(q.isActive and q.exception() is None for q in job.queries)   # no batch failed
    finally:
        stop_flow.set()
        job.stop()
    assert all(q.exception() is None for q in job.queries)
    assert job.holder.model.version == second.version          # the old (good) one kept serving
    assert len(events) >= 80

    messages = [json.loads(m.value) for m in consume(job_cfg, "kafka.topics.recommendations")]
    versions = [m["model_version"] for m in sorted(messages, key=lambda m: m["computed_at_ms"])]
    assert versions[0] == model.version and versions[-1] == second.version
    first_new = versions.index(second.version)
    assert set(versions[first_new:]) == {second.version}          # never back to the old model
    assert broken not in versions
    assert any(f"REFUSED model {broken}" in r.getMessage() for r in caplog.records)

    # State from before the new cutoff is gone: the last record counts only later purchases.
    latest = latest_records(job_cfg)
    cutoff_ms = _ms(second.cutoff_time)
    for customer in customers:
        since = sum(_ms(e["event_time"]) > cutoff_ms for e in events if e["customer_id"] == customer)
        assert latest[customer]["model_version"] == second.version
        assert latest[customer]["purchases_since_cutoff"] == since, customer
    reports = [r for r in job.metrics.reports if r.query == "reco-scoring"]
    assert sum(r.new_events + r.before_cutoff_events for r in reports) == len(events)
    assert sum(r.input_rows for r in reports) == len(events) and all(r.duration_ms > 0 for r in reports)
    assert any(r.latency_p50_ms is not None and r.customers_refreshed > 0 for r in reports)


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


# -- crash and restart -------------------------------------------------------------------------
def _job_env(cfg) -> dict[str, str]:
    """RECO__ overrides that make a separate ``python -m streaming`` use this test's config."""
    return process_env(cfg, ("model_store.s3_endpoint_url", "streaming.metrics.port"),
                       {"RECO__STREAMING__TRIGGER_INTERVAL": "1 second",
                        "RECO__STREAMING__MAX_OFFSETS_PER_TRIGGER": "40", "RECO__SPARK__DRIVER_MEMORY": "1g",
                        "RECO__STREAMING__MODEL_POLL_INTERVAL": "5 seconds"})


def _start_job(cfg, log_path):
    import subprocess
    import sys

    from models.config import REPO_ROOT

    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "streaming"], cwd=REPO_ROOT, env=_job_env(cfg),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(process, sig) -> None:
    import os

    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def test_sigkill_mid_stream_then_restart_counts_every_event_once(spark, job_cfg, model, tmp_path):
    import os
    import signal

    from streaming.inspect_state import read_purchase_state

    rng = np.random.default_rng(9)
    customers = [str(c) for c in rng.choice(model.user_ids, 20, replace=False)] + [f"NEW-K{i}" for i in range(5)]
    products = [str(p) for p in rng.choice(model.item_ids, 60, replace=False)] + ["UNKNOWN-K1"]
    events = [event(f"k-{i}", customers[rng.integers(len(customers))], products[rng.integers(len(products))],
                    cutoff_plus(model, seconds=10 * i + 10), quantity=int(rng.integers(1, 4))) for i in range(600)]
    replays = [events[i] for i in rng.choice(300, 40, replace=False)]       # sent again later
    stream = events[:300] + replays[:20] + events[300:] + replays[20:]
    log_path = tmp_path / "job.log"
    commits = Path(job_cfg.get_path("streaming.checkpoint_dir")) / "scoring" / "commits"

    job = _start_job(job_cfg, log_path)
    producer = threading.Thread(target=lambda: [produce(job_cfg, stream[i:i + 20]) or time.sleep(0.4)
                                                for i in range(0, len(stream), 20)])
    try:
        producer.start()
        wait_for(lambda: commits.is_dir() and len(list(commits.glob("[0-9]*"))) >= 2, 240,
                  "two committed micro-batches", job, log_path)
        _kill_group(job, signal.SIGKILL)                        # mid-stream: no chance to clean up
        job.wait(timeout=30)
        batches_before_kill = len(list(commits.glob("[0-9]*")))
        job = _start_job(job_cfg, log_path)
        producer.join(timeout=120)
        expected = pd.DataFrame(events).groupby("customer_id").agg(
            purchases=("event_id", "size"), newest=("event_time", "max"))

        def all_reflected() -> bool:
            for customer, row in expected.iterrows():
                item = read_table_item(job_cfg, customer)
                if item is None or item["purchases_since_cutoff"] != row["purchases"]:
                    return False
            return True

        wait_for(all_reflected, 300, "every customer's purchases in the table", job, log_path)
        os.kill(job.pid, signal.SIGTERM)     # graceful stop: to the driver, as `kill PID` does
        assert job.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        _kill_group(job, signal.SIGKILL)
        producer.join(timeout=60)
    assert "stopping after the running micro-batch" in log_path.read_text()
    assert len(list(commits.glob("[0-9]*"))) > batches_before_kill

    state = read_purchase_state(spark, str(commits.parent)).toPandas()
    assert not state["event_id"].duplicated().any()
    assert sorted(state["event_id"]) == sorted(e["event_id"] for e in events)      # exactly once
    counts = state.groupby("customer_id").size()
    assert counts.to_dict() == expected["purchases"].to_dict()
    for customer, row in expected.iterrows():
        item = read_table_item(job_cfg, customer)
        assert item["last_event_ms"] == _ms(row["newest"]), customer           # their newest event
        assert item["model_version"] == model.version


def test_purchases_leave_the_state_after_the_ttl(spark, job_cfg, model):
    customer = str(model.user_ids[0])
    product = str(model.item_ids[0])
    ttl_cfg = job_cfg.with_overrides({"streaming.state_ttl": "3 seconds"})
    produce(ttl_cfg, [event("ttl-1", customer, product, cutoff_plus(model, minutes=1))])
    run_available_now(spark, ttl_cfg)
    assert latest_records(ttl_cfg)[customer]["purchases_since_cutoff"] == 1
    time.sleep(4)
    produce(ttl_cfg, [event("ttl-2", customer, product, cutoff_plus(model, minutes=2))])
    run_available_now(spark, ttl_cfg)
    assert latest_records(ttl_cfg)[customer]["purchases_since_cutoff"] == 1      # the first one expired


def test_purchases_that_nothing_scores_are_warned_about_and_counted(spark, job_cfg, model, caplog):
    """The pointer deleted by hand: versions exist but none is current. Purchases arrive, nobody
    can be scored; each such batch warns why, and the job counts the purchases as not scored."""
    store = ModelStore.from_config(job_cfg)
    (store.backend.root / "CURRENT").unlink()
    events = [event(f"w-{i}", f"C-WAIT-{i % 3}", str(model.item_ids[i]), cutoff_plus(model, hours=1))
              for i in range(5)]
    produce(job_cfg, events)
    caplog.set_level(logging.INFO, logger="streaming")
    job = run_available_now(spark, job_cfg)
    assert job.metrics.totals["unscored_events"] == len(events)
    assert job.metrics.totals["customers_refreshed"] == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "none scored" in r.getMessage()]
    assert warnings and all("CURRENT pointer" in w and "1 version(s) exist" in w for w in warnings)
    assert "no model published" not in " ".join(warnings)


# -- business rules ----------------------------------------------------------------------------
def _write_attributes(path: Path, model: ModelArtifact, out_of_stock, margins: np.ndarray) -> None:
    """Every product of the model, written whole then renamed (the stream never reads half a file)."""
    ids = model.item_ids.astype(str)
    partial = path.with_suffix(".tmp")
    pd.DataFrame({"product_id": ids, "margin": margins, "in_stock": ~np.isin(ids, list(out_of_stock)),
                  "category": "grocery"}).to_csv(partial, index=False)
    partial.replace(path)


def _batch_lists_under_rules(model: ModelArtifact, customers: list[str], rules) -> dict[str, tuple]:
    """What the batch job lists for these customers under ``rules``: ALS top-k from the trained user
    factors (its driver and executor paths), purchases excluded, and the buy-again list."""
    from models import scorers

    users = model.user_index(customers)
    indptr, indices, counts = model.user_items_of(users)
    vectors = np.where(users[:, None] >= 0, model.user_factors[np.maximum(users, 0)], 0).astype(np.float32)
    item_idx, scores = scorers.rank_vectors(model, vectors, K, exclude=(indptr, indices), rules=rules)
    fallback = users < 0            # the batch job's popularity list for a customer it does not know
    if fallback.any():
        idx, sc, _ = scorers.recommend_from_counts(model, indptr, indices, counts, K, True, rules=rules)
        item_idx[fallback], scores[fallback] = idx[fallback], sc[fallback]
    again, _ = scorers.buy_again(model, indptr, indices, counts, K, rules=rules)
    ids = model.item_ids.astype(str)
    return {c: ([ids[i] for i in item_idx[row] if i >= 0], scores[row], [ids[i] for i in again[row] if i >= 0])
            for row, c in enumerate(customers)}


def _assert_stream_agrees_with_batch(record: dict, expected: tuple, banned: set[str]) -> None:
    """The batch list under the same rules: each rank the batch's product, or one whose ruled score
    ties it within rounding (fold-in against trained factors); the buy-again list exactly."""
    products, scores, again = expected
    streamed = products_of(record)
    assert not set(streamed) & banned and not {a["product_id"] for a in record["buy_again"]} & banned
    assert len(streamed) == K
    got = np.array([r["score"] for r in record["recommendations"]])
    np.testing.assert_allclose(got, scores[:K], rtol=1e-3, atol=SCORE_EPSILON)
    assert sum(a == b for a, b in zip(streamed, products)) >= K - 2, (streamed, products)
    assert [a["product_id"] for a in record["buy_again"]] == again


def test_business_rules_in_the_stream_agree_with_the_batch_and_a_new_file_is_picked_up(
        spark, cfg, kafka_broker, dynamodb_endpoint, tmp_path, model, caplog):
    """One running job: its lists under the attributes file equal the batch job's under the same
    rules; the file is then replaced (other products out of stock) and the next micro-batch's lists
    follow the new rules, without a restart."""
    from models.business_rules import RulesConfig, load_rules
    from streaming.job import StreamingJob

    attributes = tmp_path / "attributes.csv"
    popular = [str(model.item_ids[i]) for i in model.popularity_order()[:20]]
    margins = np.random.default_rng(7).uniform(0.0, 1.0, model.n_items)
    first_banned = set(popular[:3])
    _write_attributes(attributes, model, first_banned, margins)
    job_cfg = own_config(cfg.with_overrides({"business_rules.attributes": str(attributes),
                                             "business_rules.boost.function": "linear",
                                             "business_rules.boost.strength": 2.0}), tmp_path, model)
    customers = [str(c) for c in model.user_ids[:5]] + ["NEW-RULES-1"]
    caplog.set_level(logging.INFO, logger="models.business_rules")

    def buy_unknown(round_no: int) -> None:     # a product the model does not know: the counts stay the trained ones
        produce(job_cfg, [event(f"rules-{round_no}-{n}", c, f"UNKNOWN-RULES-{round_no}",
                                cutoff_plus(model, minutes=round_no)) for n, c in enumerate(customers)])

    job = StreamingJob(job_cfg, spark).start()
    try:
        buy_unknown(1)
        wait_for(lambda: job.metrics.totals["new_events"] >= len(customers), 240, "the first purchases scored")
        first = latest_records(job_cfg)
        expected = _batch_lists_under_rules(model, customers, load_rules(RulesConfig.from_config(job_cfg)))
        for customer in customers:
            _assert_stream_agrees_with_batch(first[customer], expected[customer], first_banned)
        assert products_of(first["NEW-RULES-1"]) == expected["NEW-RULES-1"][0]      # the popularity list, exactly
        assert set(popular[:3]) & set(_batch_lists_under_rules(model, ["NEW-RULES-1"], None)["NEW-RULES-1"][0])

        # New file: what the customers were shown first is now out of stock.
        second_banned = {products_of(first[c])[0] for c in customers} | set(popular[3:5])
        _write_attributes(attributes, model, second_banned, margins)
        buy_unknown(2)
        wait_for(lambda: job.metrics.totals["new_events"] >= 2 * len(customers), 240, "the second purchases scored")
        second = latest_records(job_cfg)
        assert job.business_rules.reloads == 1
        expected = _batch_lists_under_rules(model, customers, load_rules(RulesConfig.from_config(job_cfg)))
        for customer in customers:
            assert second[customer]["purchases_since_cutoff"] == 2
            _assert_stream_agrees_with_batch(second[customer], expected[customer], second_banned)
        assert products_of(second["NEW-RULES-1"]) != products_of(first["NEW-RULES-1"])
        assert all(q.isActive and q.exception() is None for q in job.queries)
    finally:
        job.stop()
    assert "business rules reloaded from" in caplog.text
