"""Cross-validation's choice of (ALS parameters, scorer): best mean wins, popularity guards it."""
from __future__ import annotations

from batch_training.candidates import Candidate, select_model
from batch_training.train import AlsParams, CandidateResult

ALS, BLEND, POP = Candidate("als"), Candidate("blend", 0.5), Candidate("popularity")


def _result(params: AlsParams, *folds: dict[str, float]) -> CandidateResult:
    return CandidateResult(params, [{name: {"map": value} for name, value in fold.items()} for fold in folds])


def test_the_best_mean_over_folds_wins_across_parameters_and_scorers():
    low, high = AlsParams(reg_param=0.01), AlsParams(reg_param=0.1)
    results = [_result(low, {"als": 0.10, "blend(w=0.5)": 0.30, "popularity": 0.05},
                       {"als": 0.10, "blend(w=0.5)": 0.10, "popularity": 0.05}),
               _result(high, {"als": 0.22, "blend(w=0.5)": 0.18, "popularity": 0.05},
                       {"als": 0.20, "blend(w=0.5)": 0.16, "popularity": 0.05})]
    params, candidate, rows = select_model(results, [ALS, BLEND, POP], "map", min_lift=0.1)
    assert (params, candidate) == (high, ALS)          # mean 0.21 beats the blend's single lucky fold
    assert abs(rows[0]["mean"] - 0.21) < 1e-12 and rows[1]["candidate"] == BLEND and rows[1]["params"] == low
    assert [row["mean"] for row in rows] == sorted((row["mean"] for row in rows), reverse=True)


def test_popularity_is_chosen_when_nothing_beats_it_by_the_margin():
    results = [_result(AlsParams(), {"als": 0.104, "blend(w=0.5)": 0.105, "popularity": 0.100})]
    _, candidate, _ = select_model(results, [ALS, BLEND, POP], "map", min_lift=0.1)
    assert candidate == POP
    _, candidate, _ = select_model(results, [ALS, BLEND, POP], "map", min_lift=0.0)
    assert candidate == BLEND


def test_ties_go_to_the_earlier_candidate_and_lower_is_better_for_rmse():
    a, b = AlsParams(rank=8), AlsParams(rank=16)
    tied = [_result(a, {"als": 0.2, "blend(w=0.5)": 0.2}), _result(b, {"als": 0.2, "blend(w=0.5)": 0.2})]
    params, candidate, _ = select_model(tied, [ALS, BLEND], "map", min_lift=0.1)
    assert (params, candidate) == (a, ALS)
    errors = [CandidateResult(a, [{"als": {"rmse": 1.4}}]), CandidateResult(b, [{"als": {"rmse": 1.1}}])]
    params, _, _ = select_model(errors, [ALS], "rmse", min_lift=0.1, lower_is_better=True)
    assert params == b
