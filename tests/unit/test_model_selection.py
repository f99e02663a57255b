"""Cross-validation's choice of (ALS parameters, scorer): best mean wins, popularity guards it."""
from __future__ import annotations

import pytest

from batch_training.candidates import Candidate, select_model
from batch_training.job_settings import check_settings, grid_for_catalogue
from batch_training.train import AlsParams, CandidateResult, Race
from models.config import ConfigError, load_config

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


def _raced(params: AlsParams, *als: float) -> CandidateResult:
    return _result(params, *({"als": value, "popularity": 0.5} for value in als))


def test_the_race_stops_parameters_that_trail_the_leader_by_more_than_the_tolerance():
    leader, close, far = AlsParams(rank=128), AlsParams(rank=64, alpha=10.0), AlsParams(rank=64)
    running = [_raced(far, 0.118), _raced(close, 0.1370), _raced(leader, 0.1384)]
    race = Race("map", 0.02, is_dependent=lambda name: name != "popularity")
    kept = race.survivors(running, fold_no=1)
    # 1.0 % behind stays; 14.7 % behind stops; popularity (0.5, parameter-free) leads no race
    assert [r.params for r in kept] == [close, leader]
    assert Race("map", 0.0, lambda name: name == "als").survivors(running, 1) == [running[2]]


def test_the_race_for_rmse_stops_the_larger_errors():
    small, large = AlsParams(rank=8), AlsParams(rank=16)
    errors = [CandidateResult(small, [{"als": {"rmse": 1.00}}]), CandidateResult(large, [{"als": {"rmse": 1.05}}])]
    kept = Race("rmse", 0.02, lambda name: True, lower_is_better=True).survivors(errors, 1)
    assert [r.params for r in kept] == [small]


def test_a_set_the_race_stopped_is_listed_but_never_chosen():
    stopped, finished = AlsParams(rank=64), AlsParams(rank=128)
    # The stopped set's one lucky fold (0.30) beats the finished set's mean over three folds.
    results = [_result(stopped, {"als": 0.30, "popularity": 0.01}),
               _result(finished, *({"als": 0.20, "popularity": 0.01},) * 3)]
    params, candidate, rows = select_model(results, [ALS, POP], "map", min_lift=0.1)
    assert (params, candidate) == (finished, ALS)
    assert [(row["params"], row["folds"]) for row in rows if row["candidate"] == ALS] == [(finished, 3), (stopped, 1)]
    popularity = [row for row in rows if row["candidate"] == POP]
    assert len(popularity) == 1 and popularity[0]["folds"] == 3     # from a set that ran every fold


def test_the_catalogue_size_picks_the_grid_tier_whose_ranks_the_cv_races():
    tiers = [{"max_products": 5000, "grid": {"rank": [128, 256]}}, {"max_products": 500, "grid": {"rank": [8, 32]}}]
    cfg = load_config().with_overrides({"batch.grid": {"rank": [64, 128], "alpha": [1.0, 10.0]},
                                        "batch.catalogue_grids": tiers})
    assert grid_for_catalogue(cfg, 5001) == {"rank": [64, 128], "alpha": [1.0, 10.0]}
    assert grid_for_catalogue(cfg, 5000) == {"rank": [128, 256], "alpha": [1.0, 10.0]}
    assert grid_for_catalogue(cfg, 501) == {"rank": [128, 256], "alpha": [1.0, 10.0]}
    assert grid_for_catalogue(cfg, 500) == {"rank": [8, 32], "alpha": [1.0, 10.0]}   # the smallest tier that fits
    # A key the grid does not race stays batch.als's value, whatever the catalogue.
    fixed = cfg.with_overrides({"batch.grid": {"alpha": [1.0, 10.0]}})
    assert grid_for_catalogue(fixed, 10) == {"alpha": [1.0, 10.0]}
    off = cfg.with_overrides({"batch.catalogue_grids": []})
    assert grid_for_catalogue(off, 10) == {"rank": [64, 128], "alpha": [1.0, 10.0]}
    # Every tier's values are checked before Spark starts, like the grid's, and so is the list.
    with pytest.raises(ConfigError, match="rank"):
        check_settings(cfg.with_overrides({"batch.catalogue_grids": [{"max_products": 9, "grid": {"rank": [0]}}]}))
    with pytest.raises(ConfigError, match=r"batch.catalogue_grids\[0\].*max_products"):
        check_settings(cfg.with_overrides({"batch.catalogue_grids": [{"max_products": "many", "grid": {}}]}))


def test_the_shipped_tiers_give_online_retail_sized_catalogues_rank_256_and_large_ones_the_grid():
    cfg = load_config()
    assert grid_for_catalogue(cfg, 167)["rank"] == [4, 8]            # Groceries
    assert grid_for_catalogue(cfg, 3_665)["rank"] == [128, 256]      # Online Retail
    assert grid_for_catalogue(cfg, 90_704)["rank"] == cfg.get_path("batch.grid.rank")   # generated, factor 1
