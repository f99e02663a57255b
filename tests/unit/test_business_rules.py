"""Business rules (models/business_rules.py): the attributes file, exclusion from every list of
every model type, the margin boost, and the stream's reload of a changed file."""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

from models.artifact import ModelArtifact, new_version
from models.business_rules import (
    AttributesError,
    RulesConfig,
    RulesHolder,
    boost_multipliers,
    build_rules,
    load_rules,
    read_attributes,
)
from models.config import ConfigError, load_config
from models.neighbours import knn_scores
from models.popularity_bias import multipliers
from models.scorers import (
    PERSONALIZED,
    POPULARITY,
    SEGMENT_POPULARITY,
    blend_factors,
    buy_again,
    item_neighbours_of,
    rank_vectors,
    recommend_from_counts,
    user_vectors,
)
from models.scoring import top_k

K = 10
N_ITEMS = 50
MODEL_TYPES = ["als", "blend", "popularity", "item_knn"]


def _artifact(model_type: str, seed: int = 4, **params) -> ModelArtifact:
    rng = np.random.default_rng(seed)
    n_users, rank = 60, 5
    lengths = rng.integers(1, 9, n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    weights = np.linspace(3, 0.2, N_ITEMS) / np.linspace(3, 0.2, N_ITEMS).sum()
    indices = np.concatenate([np.sort(rng.choice(N_ITEMS, size=n, replace=False, p=weights))
                              for n in lengths]).astype(np.int32)
    base = {"rank": rank, "reg_param": 0.1, "alpha": 2.0, "implicit_prefs": True, "scaling": "none",
            "knn_neighbours": 20, "knn_weighting": "cosine", "blend_weight": 0.5}
    # Positive factors: positive ALS scores, so a boost lifts a product (it scales a score's size).
    return ModelArtifact(
        version=new_version(), model_type=model_type, item_ids=np.array([f"P{i}" for i in range(N_ITEMS)]),
        item_factors=rng.uniform(0.1, 1.0, size=(N_ITEMS, rank)).astype(np.float32),
        user_ids=np.array([f"C{u}" for u in range(n_users)]),
        user_factors=rng.uniform(0.1, 1.0, size=(n_users, rank)).astype(np.float32),
        popularity=np.bincount(indices, minlength=N_ITEMS).astype(np.float64),
        user_items_indptr=indptr, user_items_indices=indices,
        user_items_counts=rng.integers(1, 4, indptr[-1]).astype(np.float32), params={**base, **params}).validate()


def _config(**changes) -> RulesConfig:
    values = {"attributes": "attributes.csv", "out_of_stock": True, "categories": ("tobacco",), "boost": "none",
              "strength": 1.0}
    values.update(changes)
    return RulesConfig(**values)


def _attributes(out_of_stock=(0, 3, 7), tobacco=(1, 12), margin=None) -> pd.DataFrame:
    """Every product listed; the best sellers 0, 3, 7 out of stock, 1 and 12 in a banned category."""
    margins = np.linspace(0.0, 2.0, N_ITEMS) if margin is None else margin
    return pd.DataFrame({"product_id": [f"P{i}" for i in range(N_ITEMS)], "margin": margins,
                         "in_stock": [i not in out_of_stock for i in range(N_ITEMS)],
                         "category": ["tobacco" if i in tobacco else "food" for i in range(N_ITEMS)]})


def _rules(frame: pd.DataFrame | None = None, **changes):
    return build_rules(_config(**changes), _attributes() if frame is None else frame, sha256="test")


BANNED = {0, 3, 7, 1, 12}


def _with_empty_rows(artifact):
    """The artifact's purchases with two customers who bought nothing known (the fallback rows)."""
    indptr, indices, counts = artifact.user_items
    return np.concatenate([indptr, [indptr[-1], indptr[-1]]]), indices, counts


# -- the attributes file -----------------------------------------------------------------------
def test_csv_and_parquet_give_the_same_rules(tmp_path):
    frame = _attributes()
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet", index=False)
    from_csv = load_rules(_config(attributes=str(tmp_path / "a.csv"), boost="linear"))
    from_parquet = load_rules(_config(attributes=str(tmp_path / "a.parquet"), boost="linear"))
    for rules in (from_csv, from_parquet):
        assert set(np.flatnonzero(rules.banned)) == BANNED
        np.testing.assert_allclose(rules.multiplier, 1.0 + np.linspace(0.0, 2.0, N_ITEMS))
    assert from_csv.summary()["banned"] == len(BANNED) and from_csv.summary()["sha256"] != from_parquet.sha256


def test_booleans_empty_margins_and_negative_margins(tmp_path):
    (tmp_path / "a.csv").write_text("product_id,margin,in_stock,category\n"
                                    "A,0.5,yes,x\nB,,0,\nC,-3,TRUE,y\nD,2,False,x\n")
    frame = read_attributes(tmp_path / "a.csv")
    assert frame["in_stock"].tolist() == [True, False, True, False]
    assert frame["category"].tolist() == ["x", None, "y", "x"]
    np.testing.assert_allclose(boost_multipliers(frame["margin"], "linear", 2.0), [2.0, 1.0, 1.0, 5.0])


def test_the_boost_functions():
    margin = np.array([0.0, 1.0, np.e - 1, -1.0, np.nan])
    np.testing.assert_allclose(boost_multipliers(margin, "none", 3.0), 1.0)
    np.testing.assert_allclose(boost_multipliers(margin, "linear", 0.5), [1.0, 1.5, 1 + 0.5 * (np.e - 1), 1.0, 1.0])
    np.testing.assert_allclose(boost_multipliers(margin, "log", 2.0), [1.0, 1 + 2 * np.log(2), 3.0, 1.0, 1.0])
    np.testing.assert_allclose(boost_multipliers(margin, "linear", 0.0), 1.0)


@pytest.mark.parametrize("text, expected", [
    ("product_id,margin,category\nA,1,x\n", "missing column(s) ['in_stock']"),
    ("product_id,margin,in_stock,category\nA,1,true,x\nB,lots,true,x\n", "column margin, row 2: 'lots'"),
    ("product_id,margin,in_stock,category\nA,1,maybe,x\n", "column in_stock, row 1: 'maybe'"),
    ("product_id,margin,in_stock,category\nA,1,true,x\nA,2,true,y\n", "'A' is listed twice (row 2)"),
    ("product_id,margin,in_stock,category\n,1,true,x\n", "row 1 has no product_id"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_problem(tmp_path, text, expected):
    path = tmp_path / "attributes.csv"
    path.write_text(text)
    with pytest.raises(AttributesError) as err:
        load_rules(_config(attributes=str(path)))
    assert expected in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ConfigError)          # exit code 2 in the batch job


def test_a_missing_or_unparseable_file_is_refused(tmp_path):
    with pytest.raises(AttributesError, match="cannot read .*missing.csv.*set it to null"):
        load_rules(_config(attributes=str(tmp_path / "missing.csv")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(AttributesError, match="cannot be read as Parquet"):
        load_rules(_config(attributes=str(tmp_path / "bad.parquet")))


def test_the_config_section_defaults_to_no_rules_and_is_checked():
    cfg = load_config()
    assert load_rules(RulesConfig.from_config(cfg)) is None
    for key, value, message in [("business_rules.boost.function", "square", "use one of"),
                                ("business_rules.boost.strength", -1, "a number >= 0"),
                                ("business_rules.exclude.categories", "tobacco", "a list")]:
        with pytest.raises(ConfigError, match=message):
            RulesConfig.from_config(cfg.with_overrides({key: value}))


# -- exclusion -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("exclude_purchased", [True, False])
def test_banned_products_are_in_no_list_and_the_lists_stay_full(model_type, exclude_purchased):
    artifact = _artifact(model_type)
    indptr, indices, counts = _with_empty_rows(artifact)
    item_idx, scores, strategies = recommend_from_counts(artifact, indptr, indices, counts, K, exclude_purchased,
                                                         rules=_rules())
    plain, _, _ = recommend_from_counts(artifact, indptr, indices, counts, K, exclude_purchased)
    assert set(plain.ravel()) & BANNED                  # without the rules they are listed
    assert not set(item_idx.ravel()) & BANNED
    assert (item_idx >= 0).all() and np.isfinite(scores).all()     # still k products each
    assert strategies[-1] == strategies[-2] == POPULARITY
    assert strategies[0] == (POPULARITY if model_type == "popularity" else PERSONALIZED)


@pytest.mark.parametrize("model_type", ["als", "blend", "popularity"])
def test_exclusion_alone_gives_todays_list_without_the_banned_products(model_type):
    """The next allowed products fill the places: the plain ranking with the banned ones removed."""
    artifact = _artifact(model_type)
    indptr, indices, counts = _with_empty_rows(artifact)
    ruled, ruled_scores, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=_rules())
    deep, deep_scores, _ = recommend_from_counts(artifact, indptr, indices, counts, K + len(BANNED), True)
    for row in range(len(ruled)):
        allowed = [i for i in deep[row] if i not in BANNED][:K]
        assert list(ruled[row]) == allowed
        np.testing.assert_allclose(ruled_scores[row], [deep_scores[row][list(deep[row]).index(i)] for i in allowed],
                                   rtol=1e-6)


def test_the_segment_fallback_excludes_and_boosts_too():
    segment = {"items": [0, 5, 6, 1, 9, 10, 11, 13, 14, 15, 16, 17, 18], "buyers": [30, 20, 20, 15] + [9] * 9}
    artifact = _artifact("als", segment_popularity={"FR": segment})
    indptr, indices, counts = _with_empty_rows(artifact)
    segments = [None] * (len(indptr) - 3) + ["FR", None]
    rules = _rules(boost="linear")
    item_idx, scores, strategies = recommend_from_counts(artifact, indptr, indices, counts, K, True, segments,
                                                         rules=rules)
    assert strategies[-2] == SEGMENT_POPULARITY and strategies[-1] == POPULARITY
    assert not set(item_idx[-2:].ravel()) & BANNED and (item_idx[-2:] >= 0).all()
    vector = np.zeros(N_ITEMS)
    vector[segment["items"]] = segment["buyers"]
    boosted = vector * rules.multiplier
    expected = [i for i in np.lexsort((np.arange(N_ITEMS), -boosted)) if i not in BANNED and vector[i] > 0]
    assert list(item_idx[-2][:len(expected)]) == expected[:K]
    np.testing.assert_allclose(scores[-2][:len(expected)], boosted[expected[:K]], rtol=1e-6)


def test_the_buy_again_list_leaves_banned_products_out():
    artifact = _artifact("als")
    indptr, indices, counts = artifact.user_items
    plain, plain_scores = buy_again(artifact, indptr, indices, counts, K)
    ruled, ruled_scores = buy_again(artifact, indptr, indices, counts, K, rules=_rules())
    assert set(plain.ravel()) & BANNED and not set(ruled.ravel()) & BANNED
    for row in range(len(plain)):
        kept = [(i, s) for i, s in zip(plain[row], plain_scores[row]) if i >= 0 and i not in BANNED]
        assert [i for i, _ in kept] == [i for i in ruled[row] if i >= 0]
        np.testing.assert_allclose([s for _, s in kept], ruled_scores[row][:len(kept)])


# -- boost -----------------------------------------------------------------------------------
def test_the_buy_again_scores_are_boosted_and_ranked_by_the_boosted_score():
    artifact = _artifact("als")
    indptr, indices, counts = artifact.user_items
    rules = _rules(_attributes(out_of_stock=(), tobacco=()), boost="linear", strength=2.0)
    plain, plain_scores = buy_again(artifact, indptr, indices, counts, 20)        # every purchase (at most 8)
    ruled, ruled_scores = buy_again(artifact, indptr, indices, counts, 20, rules=rules)
    changed = 0
    for row in range(len(plain)):
        items = plain[row][plain[row] >= 0]
        boosted = plain_scores[row][:len(items)].astype(np.float64) * rules.multiplier[items]
        order = np.lexsort((items, -boosted))
        assert list(ruled[row][:len(items)]) == list(items[order])
        np.testing.assert_allclose(ruled_scores[row][:len(items)], boosted[order], rtol=1e-6)
        changed += list(items[order]) != list(items)
    assert changed                                      # the boost reorders some lists


def _raw_scores(artifact, indptr, indices, counts) -> np.ndarray:
    """Each customer's raw (unruled, unpenalised) score of every product, dense."""
    users = np.arange(len(indptr) - 1)
    if artifact.model_type == "item_knn":
        return knn_scores(item_neighbours_of(artifact), indptr, indices, counts, "cosine").toarray()
    vectors = user_vectors(artifact, indptr, indices, counts)
    if artifact.model_type == "blend":
        blended_users, blended_items = blend_factors(vectors, artifact.item_factors, artifact.popularity, 0.5)
        return blended_users.astype(np.float64) @ blended_items.T.astype(np.float64)
    return (vectors.astype(np.float64) @ artifact.item_factors.T.astype(np.float64))[users]


@pytest.mark.parametrize("model_type", ["als", "blend", "item_knn"])
def test_scores_are_the_raw_scores_times_the_boost(model_type):
    artifact = _artifact(model_type)
    indptr, indices, counts = artifact.user_items
    rules = _rules(boost="log", strength=2.0)
    item_idx, scores, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=rules)
    raw = _raw_scores(artifact, indptr, indices, counts)
    rows = np.repeat(np.arange(len(item_idx)), K)
    listed = item_idx.ravel()
    scored = scores.ravel() > 0          # item-kNN fills a short list with score-0 best sellers
    np.testing.assert_allclose(scores.ravel()[scored], (raw[rows, listed] * rules.multiplier[listed])[scored],
                               rtol=2e-5, atol=1e-6)


def test_the_popularity_list_is_ranked_by_popularity_times_the_boost():
    artifact = _artifact("popularity")
    rules = _rules(boost="linear", strength=3.0)
    item_idx, scores, _ = recommend_from_counts(artifact, *artifact.user_items, K, False, rules=rules)
    boosted = artifact.popularity * rules.multiplier
    expected = [i for i in np.lexsort((np.arange(N_ITEMS), -boosted)) if i not in BANNED][:K]
    assert list(item_idx[0]) == expected
    np.testing.assert_allclose(scores[0], boosted[expected], rtol=1e-6)


@pytest.mark.parametrize("model_type", ["als", "blend", "popularity", "item_knn"])
def test_of_two_products_with_equal_raw_scores_the_higher_margin_ranks_first(model_type):
    """Products 20 and 21 are twins (same factors, buyers, neighbours): unruled, the lower index
    comes first; a higher margin for 21 puts it first."""
    artifact = _artifact(model_type)
    artifact.item_factors[21] = artifact.item_factors[20]
    artifact.popularity[21] = artifact.popularity[20] = artifact.popularity.max() + 5   # the best sellers
    if model_type == "item_knn":           # twin columns of the neighbour table
        table = item_neighbours_of(artifact).tolil()
        table[:, 21] = table[:, 20]
        table[21, 21] = table[20, 20] = 0.0
        artifact.item_neighbours = table.tocsr().astype(np.float32)
    indptr, indices, counts = artifact.user_items
    keep = (indices != 20) & (indices != 21)       # nobody bought them: item-kNN ranks them by popularity
    indptr = np.concatenate([[0], np.cumsum(np.add.reduceat(keep, indptr[:-1]) * (np.diff(indptr) > 0))])
    indices, counts = indices[keep], counts[keep]
    margin = np.zeros(N_ITEMS)
    margin[21] = 0.5
    rules = _rules(_attributes(out_of_stock=(), tobacco=(), margin=margin), boost="linear")
    plain, _, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True)
    ruled, ruled_scores, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=rules)
    both = [row for row in range(len(plain)) if {20, 21} <= set(plain[row])]
    assert both
    for row in both:
        plain_order = [i for i in plain[row] if i in (20, 21)]
        assert plain_order == [20, 21]
        assert list(ruled[row]).index(21) < list(ruled[row]).index(20)


def test_rules_that_change_nothing_give_exactly_todays_lists():
    """Every product in stock, no banned category, no boost: bit for bit the unruled lists."""
    nothing = _rules(_attributes(out_of_stock=(), tobacco=()), boost="none")
    for model_type in MODEL_TYPES:
        artifact = _artifact(model_type)
        indptr, indices, counts = _with_empty_rows(artifact)
        plain = recommend_from_counts(artifact, indptr, indices, counts, K, True)
        ruled = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=nothing)
        for got, want in zip(ruled, plain):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for got, want in zip(buy_again(artifact, *artifact.user_items, K, rules=nothing),
                             buy_again(artifact, *artifact.user_items, K)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("model_type", ["als", "item_knn"])
def test_the_boost_combines_with_the_popularity_penalty(model_type):
    artifact = _artifact(model_type, popularity_penalty=0.5)
    indptr, indices, counts = artifact.user_items
    rules = _rules(boost="linear", strength=1.0)
    item_idx, scores, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=rules)
    raw = _raw_scores(artifact, indptr, indices, counts)
    factor = multipliers(artifact.popularity, 0.5) * rules.multiplier
    ranked = np.where(raw > 0, raw * factor, -np.inf)
    for row in range(len(item_idx)):
        for i in BANNED:
            ranked[row, i] = -np.inf
        ranked[row, indices[indptr[row]:indptr[row + 1]]] = -np.inf
        listed = item_idx[row][scores[row] > 0]
        np.testing.assert_allclose(scores[row][scores[row] > 0], ranked[row, listed], rtol=2e-5)
        best = np.sort(ranked[row][np.isfinite(ranked[row])])[::-1][:len(listed)]
        np.testing.assert_allclose(ranked[row, listed], best, rtol=2e-5)


def test_the_batch_final_fit_path_ranks_as_the_scorers_do():
    """rank_vectors (the batch job's lists from the final fit's factors) under rules and penalty
    gives the scorers' ALS lists from the same vectors."""
    artifact = _artifact("als", popularity_penalty=0.25)
    indptr, indices, counts = artifact.user_items
    rules = _rules(boost="log")
    vectors = user_vectors(artifact, indptr, indices, counts)
    expected = recommend_from_counts(artifact, indptr, indices, counts, K, True, vectors=vectors, rules=rules)
    got = rank_vectors(artifact, vectors, K, exclude=(indptr, indices), rules=rules)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # The boost reaches this path: not the unruled ranking.
    assert not np.array_equal(got[0], top_k(vectors, artifact.item_factors, K, exclude=(indptr, indices))[0])


def test_new_rules_on_the_same_model_replace_the_cached_ones():
    artifact = _artifact("als")
    indptr, indices, counts = artifact.user_items
    first, _, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=_rules(boost="linear"))
    other = build_rules(_config(boost="linear"), _attributes(out_of_stock=(2, 4), tobacco=()), sha256="other")
    second, _, _ = recommend_from_counts(artifact, indptr, indices, counts, K, True, rules=other)
    assert not set(first.ravel()) & BANNED and set(second.ravel()) & BANNED
    assert not set(second.ravel()) & {2, 4}


def test_products_missing_from_the_file_or_the_model_are_allowed_and_unboosted():
    frame = pd.DataFrame({"product_id": ["P3", "NOT-IN-MODEL"], "margin": [5.0, 5.0], "in_stock": [True, False],
                          "category": ["food", "food"]})
    aligned = build_rules(_config(boost="linear"), frame, "x").for_items(_artifact("als").item_index, N_ITEMS)
    assert aligned.banned is None
    assert aligned.multiplier[3] == 6.0 and (np.delete(aligned.multiplier, 3) == 1.0).all()


# -- the stream's reload ---------------------------------------------------------------------
def _write(path, frame: pd.DataFrame, bump_ns: int = 0) -> None:
    frame.to_csv(path, index=False)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump_ns))


def test_the_holder_reloads_a_changed_file_and_keeps_the_rules_when_the_new_one_is_bad(tmp_path, caplog):
    path = tmp_path / "attributes.csv"
    _write(path, _attributes())
    holder = RulesHolder(_config(attributes=str(path)))
    first = holder.current()
    assert holder.current() is first and set(np.flatnonzero(first.banned)) == BANNED
    _write(path, _attributes(), bump_ns=10**9)                 # touched, same content
    assert holder.current() is first and holder.reloads == 0
    _write(path, _attributes(out_of_stock=(5,), tobacco=()), bump_ns=2 * 10**9)
    second = holder.current()
    assert set(np.flatnonzero(second.banned)) == {5} and holder.reloads == 1
    caplog.set_level(logging.ERROR, logger="models.business_rules")
    path.write_text("product_id,margin,in_stock,category\nP1,1,perhaps,food\n")
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 3 * 10**9))
    assert holder.current() is second                          # the previous rules stay in force
    assert "column in_stock, row 1" in caplog.text and "stay in force" in caplog.text
    path.unlink()
    assert holder.current() is second


def test_the_holder_refuses_a_bad_file_at_start_up(tmp_path):
    path = tmp_path / "attributes.csv"
    path.write_text("product_id,margin\nP1,1\n")
    with pytest.raises(AttributesError, match="missing column"):
        RulesHolder(_config(attributes=str(path)))
    assert RulesHolder(_config(attributes=None)).current() is None
