"""python -m tools.demo (the README's first command, `make demo`): the whole product, end to end.

Starts the local Kafka broker and DynamoDB endpoint, generates sample data, trains and publishes
a model (writing every customer's list to the table), starts the streaming scorer, replays new
purchases for three customers (a regular, one who discovers a new category, a brand-new one)
mixed with malformed events, then prints each one's top-10 before and after, the dead-letter
summary and the latency figures, and stops everything it started.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from models.config import REPO_ROOT, Config, load_config

NEW_CUSTOMER = "C-DEMO-NEW"
QUALITY_TRIGGER_S = 2        # the quality monitor's trigger in the demo (a few seconds, not the default 10)


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run_module(module: list[str], log_file: Path, env: dict[str, str]) -> int:
    """Run ``python -m ...`` with its log in a file; show the lines that matter."""
    with open(log_file, "w") as log:
        code = subprocess.call([sys.executable, "-m", *module], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **env}, cwd=REPO_ROOT)
    return code


def show_log(log_file: Path, pattern: str, context: int = 0) -> None:
    lines = log_file.read_text(errors="replace").splitlines()
    for no, line in enumerate(lines):
        if re.search(pattern, line):
            for extra in lines[no:no + 1 + context]:
                print("   ", re.sub(r"^\S+ \S+ \w+ [\w.]+: ", "", extra))


def top10(cfg: Config, customer: str) -> tuple[list[str], str, str]:
    from models.records import read_table_item

    item = read_table_item(cfg, customer)
    if item is None:
        return [], "-", "-"
    return ([r["product_id"] for r in item["recommendations"]], item.get("strategy", "?"),
            item.get("model_version", "?"))


def popularity_list(cfg: Config, k: int = 10) -> list[str]:
    from models.store import ModelStore

    artifact = ModelStore.from_config(cfg).load()
    return [str(p) for p in artifact.item_ids[artifact.popularity_order()[:k]]]


def choose_customers(data_dir: Path, cfg: Config) -> tuple[str, str, str, pd.DataFrame]:
    """A regular customer, one to send into a category new to them, and the products catalogue."""
    tx = pd.read_csv(data_dir / "transactions.csv", dtype=str).dropna(subset=["customer_id", "product_id"])
    products = pd.read_csv(data_dir / "products.csv", dtype=str)
    counts = tx["customer_id"].value_counts()
    regular = counts.index[len(counts) // 4]
    explorer = counts.index[len(counts) // 3]
    return regular, explorer, NEW_CUSTOMER, products


def new_purchases(tx_file: Path, products: pd.DataFrame, regular: str, explorer: str) -> tuple[pd.DataFrame, str]:
    """Events for the three customers: the regular rebuys staples, the explorer and the new customer
    buy in a category the explorer never bought."""
    tx = pd.read_csv(tx_file, dtype=str).dropna(subset=["customer_id", "product_id"])
    category_of = products.set_index("product_id")["category"]
    bought_categories = set(category_of.reindex(tx.loc[tx.customer_id == explorer, "product_id"]).dropna())
    popular = tx["product_id"].value_counts()
    cat_popularity = category_of.reindex(popular.index).value_counts()
    new_category = next(c for c in cat_popularity.index if c not in bought_categories)
    in_category = [p for p in popular.index if category_of.get(p) == new_category][:6]
    staples = tx.loc[tx.customer_id == regular, "product_id"].value_counts().index[:2].tolist()
    rows = ([(regular, p) for p in staples] + [(explorer, p) for p in in_category]
            + [(NEW_CUSTOMER, p) for p in in_category[:3]])
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    frame = pd.DataFrame({"transaction_id": [f"demo-{uuid.uuid4().hex[:12]}" for _ in rows],
                          "customer_id": [c for c, _ in rows], "product_id": [p for _, p in rows],
                          "quantity": "1", "event_time": now})
    return frame, new_category


def split_rounds(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each customer's first half of purchases (at least one), then the rest."""
    rank = events.groupby("customer_id").cumcount()
    size = events.groupby("customer_id")["customer_id"].transform("size")
    first = rank < (size + 1) // 2
    return events[first], events[~first]


def wait_for(predicate, timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1)
    print(f"   (gave up waiting for {what} after {timeout_s:.0f} s)")
    return False


def dead_letter_summary(cfg: Config, since_ms: int) -> Counter:
    from kafka import KafkaConsumer, TopicPartition

    from models.clients import kafka_options
    from tools.tail import dead_letter

    topic = str(cfg.get_path("kafka.topics.dead_letter"))
    consumer = KafkaConsumer(**kafka_options(cfg), enable_auto_commit=False, consumer_timeout_ms=5000)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    offsets = consumer.offsets_for_times({tp: since_ms for tp in partitions})
    for tp in partitions:
        found = offsets.get(tp)
        consumer.seek(tp, found.offset) if found else consumer.seek_to_end(tp)
    reasons = Counter(dead_letter(m).get("reason") or "?" for m in consumer)
    consumer.close()
    return reasons


def print_lists(title: str, lists: dict[str, tuple[list[str], str, str]], category_of: pd.Series,
                highlight: str) -> None:
    print(f"\n  {title}")
    for customer, (items, strategy, version) in lists.items():
        shown = ", ".join(f"{p}{'*' if category_of.get(p) == highlight else ''}" for p in items) or "(none)"
        print(f"   {customer:<12} [{strategy}, model {version}] {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=float, default=0.2, help="sample data size (1 = 1.2M rows)")
    parser.add_argument("--keep-running", action="store_true", help="leave the services up at the end")
    args = parser.parse_args(argv)
    from infra.services import all_services
    from models.clients import ensure_table, ensure_topics
    from tools import quiet_client_logs

    quiet_client_logs()
    started_at = time.monotonic()
    cfg = load_config()
    run_dir = cfg.path("run_dir")
    logs = run_dir / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    services = all_services(cfg)
    started: list[str] = []
    streaming: subprocess.Popen | None = None
    try:
        step("1/6 local services: a Kafka broker (KRaft) and a DynamoDB endpoint on 127.0.0.1")
        for key, service in services.items():
            if service.start():
                started.append(key)
            print(f"   {service.name}: up on {service.proc.host}:{service.port}")
        ensure_topics(cfg)
        ensure_table(cfg)
        print(f"   topics {', '.join(cfg.get_path('kafka.topics').values())}; table {cfg.get_path('dynamodb.table')}")

        step(f"2/6 sample data (factor {args.factor})")
        from batch_training.generate import write

        data_dir = run_dir / "data"
        write(data_dir, factor=args.factor, seed=42, fmt="csv")

        step("3/6 batch training: clean, aggregate, train ALS, evaluate against popularity, publish")
        train_log = logs / "batch_training.log"
        code = run_module(["batch_training", "--no-cv", "--write-table"], train_log, {})
        show_log(train_log,
                 r"batch_training: (raw rows|clean rows|.*customer-product pairs|purchase counts|holdout \()")
        show_log(train_log, r"holdout metrics, purchased items excluded", context=3)
        show_log(train_log, r"(published model|NOT published|sinks:|example:)")
        if code not in (0, 3):
            print(f"   the batch job failed (exit {code}); see {train_log}")
            return 1

        regular, explorer, newcomer, products = choose_customers(data_dir, cfg)
        category_of = products.set_index("product_id")["category"]
        events, new_category = new_purchases(data_dir / "transactions.csv", products, regular, explorer)
        before = {c: top10(cfg, c) for c in (regular, explorer)}
        before[newcomer] = (popularity_list(cfg), "popularity (not in the table yet)", "-")

        step("4/6 streaming scorer: python -m streaming")
        stream_log = logs / "streaming.log"
        with open(stream_log, "w") as log:
            streaming = subprocess.Popen([sys.executable, "-m", "streaming"], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO_ROOT,
                                         env={**os.environ, "RECO__STREAMING__TRIGGER_INTERVAL": "1 second",
                                                        "RECO__STREAMING__QUALITY__TRIGGER_INTERVAL":
                                                            f"{QUALITY_TRIGGER_S} seconds",
                                                        "RECO__STREAMING__QUALITY__SUMMARY_INTERVAL": "5 seconds"})
        if not wait_for(lambda: "streaming scorer started" in stream_log.read_text(errors="replace"), 180,
                        "the streaming job to start"):
            print(stream_log.read_text()[-3000:])
            return 1
        time.sleep(5)
        print(f"   running (pid {streaming.pid}, log {stream_log})")

        step(f"5/6 replay: {len(events)} new purchases (category '{new_category}' is new to {explorer}) "
             "plus malformed events")
        from tools.replay import replay

        sent_ms = int(time.time() * 1000)
        # Two rounds: the second round's purchases are judged by the quality monitor against the
        # lists the first round produced (a first purchase has no stream list before it).
        first, second = split_rounds(events)
        summary = replay(cfg, first)
        print(f"   round 1: {summary}".replace("\n", "\n   "))

        def refreshed_since(since_ms: int) -> bool:
            """Every one of the three has a record the stream computed since ``since_ms``."""
            items = [_item(cfg, c) or {} for c in (regular, explorer, newcomer)]
            return all(i.get("source") == "stream" and int(i.get("computed_at_ms") or 0) >= since_ms for i in items)

        wait_for(lambda: refreshed_since(sent_ms), 120, "the lists of round 1")
        second_ms = int(time.time() * 1000)
        summary = replay(cfg, second)
        print(f"   round 2: {summary}".replace("\n", "\n   "))
        bad = events.sample(n=min(6, len(events)), random_state=1).assign(
            transaction_id=lambda f: [f"bad-{uuid.uuid4().hex[:8]}" for _ in range(len(f))])
        bad_summary = replay(cfg, bad, malformed_share=1.0, seed=3)
        print(f"   malformed events sent: {bad_summary.malformed_total}")
        wait_for(lambda: refreshed_since(second_ms), 120, "the lists of round 2")
        after = {c: top10(cfg, c) for c in (regular, explorer, newcomer)}

        step("6/6 results")
        print_lists(f"BEFORE the new purchases  (* = category '{new_category}')", before, category_of, new_category)
        print_lists("AFTER  the new purchases", after, category_of, new_category)
        gained = sum(category_of.get(p) == new_category for p in after[explorer][0]) - \
            sum(category_of.get(p) == new_category for p in before[explorer][0])
        print(f"\n   {explorer}: {gained:+d} products of '{new_category}' in the top-10 after buying in it")
        time.sleep(3)
        reasons = dead_letter_summary(cfg, sent_ms)
        print(f"   dead-letter topic: {sum(reasons.values())} events — "
              + ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
        # The monitor publishes a window every few seconds here (its summary interval); round 2's
        # purchases are judged once its query has read their lists, a trigger or two after them.
        print_live_hit_rate(cfg, sent_ms)
    finally:
        if streaming is not None and streaming.poll() is None:
            streaming.send_signal(signal.SIGTERM)
            try:
                streaming.wait(90)
            except subprocess.TimeoutExpired:
                streaming.kill()
        if streaming is not None:
            show_log(logs / "streaming.log", r"streaming scorer stopped")
            show_log(logs / "streaming.log", r"batch \d+:", context=0) if os.environ.get("RECO_DEMO_VERBOSE") else None
        if not args.keep_running:
            for key in started:
                services[key].stop()
            if started:
                print(f"\n   stopped what the demo started: {', '.join(services[k].name for k in started)}")
        print(f"   demo took {time.monotonic() - started_at:.0f} s; logs in {logs}")
    return 0


def print_live_hit_rate(cfg: Config, since_ms: int, wait_s: float = 60) -> None:
    """The quality monitor's hit@10 since the replay, beside the popularity baseline (its
    summaries come every few seconds here)."""
    from tools.quality import format_table, hit_rates, read_summaries

    rows: list = []

    def judged() -> bool:
        rows[:] = hit_rates(read_summaries(cfg, since_ms))
        return bool(rows)

    wait_for(judged, wait_s, "the quality monitor's summary")
    if not rows:
        print("   live hit rate: no purchase judged yet (a customer's first purchase has no list shown before it)")
        return
    print("   live hit rate (python -m tools quality):\n      "
          + format_table(rows, int(cfg.get_path("streaming.k"))).replace("\n", "\n      "))


def _item(cfg: Config, customer: str) -> dict | None:
    from models.records import read_table_item

    return read_table_item(cfg, customer)


if __name__ == "__main__":
    sys.exit(main())
