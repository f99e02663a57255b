"""The batch job's scorer family end to end on generated data: every candidate in the report, the
published model type, and the buy-again list beside the discover list."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from batch_training.generate import write
from batch_training.job import run
from models.scorers import recommend_from_counts
from models.store import ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scorer-sample")
    write(folder, factor=0.03, seed=11, fmt="csv")
    return folder / "transactions.csv"


def test_the_job_reports_every_candidate_and_serves_buy_again_beside_discover(spark, cfg, tmp_path, sample):
    job_cfg = cfg.with_overrides({"data.path": str(sample), "batch.output_dir": str(tmp_path / "out"),
                                  "model_store.uri": str(tmp_path / "models"), "batch.grid": {},
                                  "batch.als.rank": 8, "batch.als.max_iter": 5, "batch.holdout.method": "time",
                                  "batch.scorers.blend_weights": [0.5], "batch.recency.half_life_days": 60})
    result = run(job_cfg, spark=spark)
    table = result.metrics["exclude_purchased"]
    assert {"model", "als", "blend(w=0.5)", "popularity", "item_knn"} <= set(table)
    selected = result.metrics["selection"]["selected"]
    assert table["model"] == table[selected]
    assert set(result.metrics["selection"]["validation"]) == {"als", "blend(w=0.5)", "popularity", "item_knn"}
    assert result.metrics["buy_again"], "the time split holds out repurchases"

    artifact = ModelStore.from_config(job_cfg).load()
    assert artifact.model_type == result.model_type == result.metrics["selection"]["model_type"]
    assert artifact.params["recency_half_life_days"] == 60 and artifact.params["recency_reference_ms"] > 0
    # Decayed counts: fractional, and no larger than the raw purchase counts plus the newest ones.
    assert np.any(artifact.user_items_counts % 1 != 0) and artifact.user_items_counts.min() > 0
    recs = pd.read_parquet(tmp_path / "out" / "recommendations.parquet")
    indptr, indices, _ = artifact.user_items
    for row, (discover, again) in enumerate(zip(recs["recommendations"], recs["buy_again"])):
        bought = set(artifact.item_ids[indices[indptr[row]:indptr[row + 1]]])
        assert set(again) <= bought and not set(discover) & bought and not set(again) & set(discover)
    # The written lists are what the one scoring function gives from the published artifact.
    items, _, _ = recommend_from_counts(artifact, *artifact.user_items, 10, True)
    expected = [list(artifact.item_ids[row[row >= 0]]) for row in items[:50]]
    assert [list(r) for r in recs["recommendations"][:50]] == expected or artifact.model_type == "als"
