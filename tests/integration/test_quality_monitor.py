"""The online quality monitor end to end: a known purchase sequence through the real job and
broker, and the exact hit counts in the summary records and the Prometheus counters."""
from __future__ import annotations

import json
import uuid

import pytest

from tests.integration.test_streaming import (  # noqa: F401
    cutoff_plus,
    event,
    latest_records,
    model,
    own_config,
    produce,
    products_of,
    purchases,
    run_available_now,
)
from tests.topics import read_topic

pytestmark = pytest.mark.integration

K = 10


def baseline(served, bought: set[str]) -> list[str]:
    """The served model's popularity top-k without the products bought in the stream."""
    ranked = [str(served.item_ids[i]) for i in served.popularity_order()]
    return [p for p in ranked if p not in bought][:K]


def test_a_replayed_sequence_gives_the_exact_hit_counts(spark, cfg, kafka_broker, dynamodb_endpoint, tmp_path,
                                                        model):  # noqa: F811
    job_cfg = own_config(cfg, tmp_path, model)
    customer = str(model.user_ids[7])
    first_product = str(model.item_ids[model.popularity_order()[-1]])
    tag = uuid.uuid4().hex[:6]
    jobs = []

    # 1. A first purchase: no list was shown before it, so it is not judged; its list L1 is emitted.
    produce(job_cfg, [event(f"q1-{tag}", customer, first_product, cutoff_plus(model, hours=1))])
    jobs.append(run_available_now(spark, job_cfg))
    list1 = latest_records(job_cfg)[customer]
    # 2. The next purchase is L1's first product: a hit for L1's version and strategy.
    second_product = products_of(list1)[0]
    produce(job_cfg, [event(f"q2-{tag}", customer, second_product, cutoff_plus(model, hours=2))])
    jobs.append(run_available_now(spark, job_cfg))
    list2 = latest_records(job_cfg)[customer]
    assert list2["computed_at_ms"] > list1["computed_at_ms"]
    # 3. Then a product outside L2 that the popularity baseline has: a miss, a baseline hit.
    bought = {first_product, second_product}
    third_product = next(p for p in baseline(model, bought) if p not in products_of(list2))
    produce(job_cfg, [event(f"q3-{tag}", customer, third_product, cutoff_plus(model, hours=3)),
                      event(f"q3-{tag}", customer, third_product, cutoff_plus(model, hours=3))])  # a replay
    jobs.append(run_available_now(spark, job_cfg))
    jobs.append(run_available_now(spark, job_cfg))   # nothing new: the monitor reads L3 and judges

    expected: dict[tuple[str, str], list[int]] = {}
    for shown, product, bought_before in ((list1, second_product, {first_product}), (list2, third_product, bought)):
        row = expected.setdefault((shown["model_version"], shown["strategy"]), [0, 0, 0])
        row[0] += 1
        row[1] += product in products_of(shown)
        row[2] += product in baseline(model, bought_before)
    assert sum(counts[1] for counts in expected.values()) == 1
    assert sum(counts[2] for counts in expected.values()) >= 1

    summaries = [json.loads(m.value) for m in read_topic(job_cfg, str(job_cfg.get_path("kafka.topics.quality")), 1)]
    published: dict[tuple[str, str], list[int]] = {}
    for record in summaries:
        assert record["schema_version"] == 1 and record["k"] == K and record["baseline"] == "popularity"
        for group in record["groups"]:
            row = published.setdefault((group["model_version"], group["strategy"]), [0, 0, 0])
            row[0] += group["judged"]
            row[1] += group["hits"]
            row[2] += group["baseline_hits"]
    assert published == expected

    scraped: dict[tuple[str, str], list[int]] = {}
    for job in jobs:
        registry = job.metrics.exporter.registry
        for (version, strategy) in expected:
            labels = {"model_version": version, "strategy": strategy}
            row = scraped.setdefault((version, strategy), [0, 0, 0])
            for i, name in enumerate(("reco_quality_judged_purchases_total", "reco_quality_hits_total",
                                      "reco_quality_baseline_hits_total")):
                row[i] += int(registry.get_sample_value(name, labels) or 0)
    assert scraped == expected
    assert sum(sum(t[0] for t in job.quality.total.counts.values()) for job in jobs) == 2
    from tools.quality import hit_rates, read_summaries

    assert {(r["model_version"], r["strategy"]): [r["judged"], r["hits"], r["baseline_hits"]]
            for r in hit_rates(read_summaries(job_cfg))} == expected
