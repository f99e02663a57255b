"""The publish gate: a model goes live only if it beats popularity and does not regress.

One test per branch of ``gate_decision``: a personalised model over and under the popularity lift,
and over or under the current model; the popularity model (selected when nothing beats it) with
and without a current model; explicit mode, where the holdout RMSE is compared with the current
model's.
"""
from __future__ import annotations

import pytest

from batch_training.publish import gate_decision
from models.config import load_config


def _metrics(model: float, popularity: float, model_type: str | None = None) -> dict:
    metrics = {"k": 10, "exclude_purchased": {"model": {"map": model}, "popularity": {"map": popularity}}}
    if model_type:
        metrics["selection"] = {"selected": model_type, "model_type": model_type}
    return metrics


def _explicit(test_rmse: float | None) -> dict:
    """What the job records in explicit mode: the RMSE, beside ranking metrics the gate ignores."""
    metrics = _metrics(0.01, 0.05, "als")       # far below popularity: irrelevant to the RMSE gate
    if test_rmse is not None:
        metrics["rmse"] = {"train": 0.5, "test": test_rmse}
    return metrics


def _cfg(lift: float = 0.1, drop: float = 0.1, rise: float = 0.1):
    return load_config(files=[], env={}).with_overrides({"batch.publish.min_lift_over_popularity": lift,
                                                         "batch.publish.max_drop_vs_current": drop,
                                                         "batch.publish.max_rmse_rise_vs_current": rise})


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


def test_a_model_that_beats_popularity_and_holds_up_against_the_current_one_is_published():
    current = _metrics(0.20, 0.02)
    ok, reason = gate_decision(_cfg(drop=0.1), _metrics(0.25, 0.02, "als"), "map", True, current=current)
    assert ok and "current model had 0.2000" in reason


def test_the_lift_is_measured_on_the_table_the_job_serves():
    """With purchased products included, the gate reads the include_purchased table."""
    metrics = {"k": 10, "exclude_purchased": {"model": {"map": 0.01}, "popularity": {"map": 0.05}},
               "include_purchased": {"model": {"map": 0.30}, "popularity": {"map": 0.05}}}
    assert gate_decision(_cfg(), metrics, "map", False, current=None)[0]
    assert not gate_decision(_cfg(), metrics, "map", True, current=None)[0]


def test_a_nan_metric_never_passes():
    ok, _ = gate_decision(_cfg(), _metrics(float("nan"), 0.0), "map", True, current=None)
    assert not ok
    ok, _ = gate_decision(_cfg(), _metrics(float("nan"), 0.0, "popularity"), "map", True, current=None)
    assert not ok


# -- the popularity model: selected when no personalised candidate beats popularity -------------
def test_popularity_selected_is_published_when_there_is_no_current_model():
    # The model is popularity itself: model == baseline, which the lift rule alone would refuse.
    ok, reason = gate_decision(_cfg(), _metrics(0.05, 0.05, "popularity"), "map", True, current=None)
    assert ok and "popularity model" in reason and "current model had" not in reason


def test_popularity_selected_is_published_within_the_tolerance_of_the_current_model():
    current = _metrics(0.054, 0.05)
    ok, reason = gate_decision(_cfg(drop=0.1), _metrics(0.05, 0.05, "popularity"), "map", True, current=current)
    assert ok and "current model had 0.0540" in reason


def test_popularity_selected_is_refused_when_far_below_the_current_model():
    current = _metrics(0.20, 0.05)
    ok, reason = gate_decision(_cfg(drop=0.1), _metrics(0.05, 0.05, "popularity"), "map", True, current=current)
    assert not ok
    assert "popularity model" in reason and "0.2000" in reason and "max_drop_vs_current" in reason


def test_the_current_models_metrics_of_another_table_or_metric_are_no_comparison():
    """A current model that recorded no figure for this table and metric (another metric, or a
    model from before the table existed) is no reason to refuse."""
    current = {"k": 10, "exclude_purchased": {"model": {"ndcg": 0.9}}}
    assert gate_decision(_cfg(), _metrics(0.05, 0.05, "popularity"), "map", True, current=current)[0]
    assert gate_decision(_cfg(), _metrics(0.14, 0.026), "map", True, current=current)[0]


# -- explicit mode (RMSE): no popularity comparison, compared with the current model's RMSE ------
def test_explicit_mode_publishes_a_measured_rmse_without_a_current_model():
    ok, reason = gate_decision(_cfg(), _explicit(1.25), "rmse", True, current=None)
    assert ok and "test rmse 1.2500" in reason and "no current model" in reason


def test_explicit_mode_refuses_when_rmse_was_not_measured_or_is_not_a_number():
    ok, reason = gate_decision(_cfg(), _explicit(None), "rmse", True, current=None)
    assert not ok and "not measured" in reason
    ok, reason = gate_decision(_cfg(), _explicit(float("nan")), "rmse", True, current=None)
    assert not ok and "not a number" in reason


@pytest.mark.parametrize("new_rmse, published", [
    (0.80, True),        # better than the current model
    (1.00, True),        # the same
    (1.09, True),        # worse, within the allowed 10% rise
    (1.11, False),       # more than 10% worse
    (3.00, False),
])
def test_explicit_mode_refuses_an_rmse_too_far_above_the_current_models(new_rmse, published):
    current = _explicit(1.0)
    ok, reason = gate_decision(_cfg(rise=0.1), _explicit(new_rmse), "rmse", True, current=current)
    assert ok is published, reason
    if published:
        assert "current model had 1.0000" in reason
    else:
        assert f"{new_rmse:.4f}" in reason and "1.0000" in reason and "max_rmse_rise_vs_current" in reason


def test_explicit_mode_allowed_rise_is_configurable():
    current = _explicit(1.0)
    assert not gate_decision(_cfg(rise=0.0), _explicit(1.01), "rmse", True, current=current)[0]
    assert gate_decision(_cfg(rise=0.5), _explicit(1.45), "rmse", True, current=current)[0]


def test_explicit_mode_publishes_over_a_current_model_that_recorded_no_rmse():
    """Switching from implicit to explicit mode: the current model has no RMSE to compare with."""
    ok, reason = gate_decision(_cfg(), _explicit(5.0), "rmse", True, current=_metrics(0.3, 0.02))
    assert ok and "recorded no RMSE" in reason


def test_item_knn_candidates_follow_the_configured_weightings():
    from batch_training.candidates import candidates_from_config

    cfg = load_config(files=[], env={}).with_overrides({"batch.scorers.candidates": ["als", "item_knn", "popularity"],
                                        "batch.scorers.knn.weightings": ["cosine", "bm25"],
                                        "batch.scorers.knn.neighbours": 50, "batch.scorers.knn.bm25_k1": 3.0})
    candidates = candidates_from_config(cfg)
    assert [c.name for c in candidates] == ["als", "item_knn", "item_knn(bm25)", "popularity"]
    assert candidates[2].params() == {"knn_neighbours": 50, "knn_weighting": "bm25", "bm25_k1": 3.0, "bm25_b": 0.75,
                                    "knn_max_customers": 1_000_000}
    with pytest.raises(ValueError, match="batch.scorers.knn.weightings is empty"):
        candidates_from_config(cfg.with_overrides({"batch.scorers.knn.weightings": []}))
