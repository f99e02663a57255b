"""The publish gate: a model goes live only if it beats popularity and does not regress."""
from __future__ import annotations

from batch_training.job import gate_decision
from models.config import load_config


def _metrics(model: float, popularity: float) -> dict:
    return {"k": 10, "exclude_purchased": {"model": {"map": model}, "popularity": {"map": popularity}}}


def _cfg(lift: float = 0.1, drop: float = 0.1):
    return load_config(files=[], env={}).with_overrides({"batch.publish.min_lift_over_popularity": lift,
                                                         "batch.publish.max_drop_vs_current": drop})


def test_a_model_that_beats_popularity_by_the_margin_is_published():
    ok, reason = gate_decision(_cfg(), _metrics(0.14, 0.026), "map", True, current=None)
    assert ok and "5.4x" in reason


def test_a_model_no_better_than_popularity_is_refused_with_the_figures():
    ok, reason = gate_decision(_cfg(lift=0.1), _metrics(0.105, 0.1), "map", True, current=None)
    assert not ok
    assert "0.1050" in reason and "0.1000" in reason and "min_lift_over_popularity" in reason


def test_a_model_far_worse_than_the_current_one_is_refused():
    current = _metrics(0.20, 0.02)
    ok, reason = gate_decision(_cfg(drop=0.1), _metrics(0.15, 0.02), "map", True, current=current)
    assert not ok and "max_drop_vs_current" in reason
    ok, _ = gate_decision(_cfg(drop=0.1), _metrics(0.19, 0.02), "map", True, current=current)
    assert ok  # within the tolerance


def test_a_nan_metric_never_passes():
    ok, _ = gate_decision(_cfg(), _metrics(float("nan"), 0.0), "map", True, current=None)
    assert not ok


def test_item_knn_is_skipped_when_its_dense_similarity_would_not_fit():
    from batch_training.candidates import Candidate, without_unaffordable_knn

    candidates = [Candidate("als"), Candidate("item_knn"), Candidate("popularity")]
    assert without_unaffordable_knn(candidates, n_items=5_000, max_items=10_000) == candidates
    kept = without_unaffordable_knn(candidates, n_items=90_704, max_items=10_000)
    assert [c.model_type for c in kept] == ["als", "popularity"]
