"""Count scaling across the jobs: Spark's fit rates every pair exactly as the fold-in does, and the
stream serves a scaled model's lists as the batch fit trained them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from batch_training.train import AlsParams, fit_als, with_ratings
from models import scorers, scoring
from models.artifact import ModelArtifact
from models.scaling import als_ratings
from streaming.refresh import score_customers
from streaming.serving import ServingModel

pytestmark = pytest.mark.integration

N_USERS, N_ITEMS, K = 240, 90, 10
CUTOFF = "2025-01-01T00:00:00.000Z"
CUTOFF_MS = 1_735_689_600_000
# Fold-in against the fit's item factors: the same solve as Spark's last half-step, float32.
SCORE_EPSILON = 1e-4


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    """Distinct (user, item) pairs with repeat counts; skewed popularity, every user and item present,
    and a few customers who bought most of the catalogue (the bm25 idf's floor)."""
    rng = np.random.default_rng(5)
    users = np.concatenate([np.arange(N_USERS), rng.integers(0, N_USERS, 3000), np.repeat([0, 1], N_ITEMS - 1)])
    items = np.concatenate([rng.integers(0, N_ITEMS, N_USERS), rng.zipf(1.5, 3000) % N_ITEMS,
                            np.tile(np.arange(1, N_ITEMS), 2)])
    frame = pd.DataFrame({"user": users, "item": items}).value_counts().reset_index(name="count")
    frame["count"] = frame["count"].astype(float)
    return frame.sort_values(["user", "item"]).reset_index(drop=True)


def _csr(frame: pd.DataFrame):
    indptr = np.concatenate([[0], np.cumsum(np.bincount(frame["user"], minlength=N_USERS))])
    return indptr, frame["item"].to_numpy(np.int64), frame["count"].to_numpy(np.float64)


@pytest.mark.parametrize("params", [AlsParams(scaling="log"), AlsParams(scaling="bm25"),
                                    AlsParams(scaling="bm25", scaling_k1=1.2, scaling_b=0.3)])
def test_spark_rates_every_pair_as_the_fold_in_does(spark, pairs, params):
    rated = with_ratings(spark.createDataFrame(pairs), params, N_ITEMS).toPandas()
    rated = rated.sort_values(["user", "item"]).reset_index(drop=True)
    assert len(rated) == len(pairs)
    buyers = np.bincount(pairs["item"], minlength=N_ITEMS).astype(float)
    expected = als_ratings(params.as_dict(), *_csr(pairs), buyers)
    np.testing.assert_array_equal(rated["rating"].to_numpy(np.float32), expected)   # bit for bit
    assert (expected > 0).all()


@pytest.fixture(scope="module")
def bm25_model(spark, pairs) -> ModelArtifact:
    params = AlsParams(rank=8, reg_param=0.1, alpha=2.0, max_iter=6, blocks=2, seed=3, scaling="bm25",
                       scaling_k1=10.0, scaling_b=0.8)
    factors = fit_als(spark.createDataFrame(pairs), params, N_USERS, N_ITEMS)
    indptr, indices, counts = _csr(pairs)
    return ModelArtifact(
        version="bm25", model_type="als", item_ids=[f"P{i}" for i in range(N_ITEMS)],
        item_factors=factors.item_factors, user_ids=[f"C{u}" for u in range(N_USERS)],
        user_factors=factors.user_factors,
        popularity=np.bincount(pairs["item"], minlength=N_ITEMS).astype(float),
        user_items_indptr=indptr, user_items_indices=indices, user_items_counts=counts,
        params=params.as_dict(), cutoff_time=CUTOFF).validate()


def test_the_fold_in_of_a_bm25_model_reproduces_the_fits_user_factors(bm25_model):
    folded = scorers.user_vectors(bm25_model, *bm25_model.user_items)
    np.testing.assert_allclose(folded, bm25_model.user_factors, rtol=1e-4, atol=1e-5)
    # The test tells the scaling apart: the raw counts fold into other vectors.
    unscaled = ModelArtifact(**{**_fields(bm25_model), "params": {**bm25_model.params, "scaling": "none"}})
    assert not np.allclose(scorers.user_vectors(unscaled, *bm25_model.user_items), bm25_model.user_factors,
                           rtol=1e-3, atol=1e-4)


def test_the_stream_serves_known_customers_the_batch_fits_lists(bm25_model):
    """Customers whose only new purchase is a product the model does not know: the stream's scoring
    (its counts, the bm25 transform from the model's params and popularity, the fold-in) gives the
    lists of the fit's own user factors, up to near-ties."""
    customers = pd.DataFrame({
        "customer_id": [f"C{u}" for u in range(0, N_USERS, 7)],
        "product_ids": [["UNKNOWN"]] * len(range(0, N_USERS, 7)),
        "quantities": [[1]] * len(range(0, N_USERS, 7)),
        "event_times_ms": [[CUTOFF_MS + 1]] * len(range(0, N_USERS, 7)),
        "source_offsets": [{"tx-0": 1}] * len(range(0, N_USERS, 7))})
    scored = score_customers(ServingModel.prepare(bm25_model), customers, k=K, exclude_purchased=True)
    users = bm25_model.user_index(customers["customer_id"].to_numpy())
    indptr, indices, _ = bm25_model.user_items_of(users)
    for row, user in enumerate(users):
        scores = bm25_model.item_factors @ bm25_model.user_factors[user]
        scores[indices[indptr[row]:indptr[row + 1]]] = -np.inf
        best = np.sort(scores)[::-1][:K]
        streamed = scored.item_idx[row][scored.item_idx[row] >= 0]
        assert scored.strategies[row] == "personalized"
        assert len(streamed) == min(K, int(np.isfinite(scores).sum()))
        assert np.abs(scores[streamed] - best[:len(streamed)]).max() <= SCORE_EPSILON, user
    batch_items, _ = scoring.top_k(bm25_model.user_factors[users], bm25_model.item_factors, K,
                                   exclude=(indptr, indices))
    assert (batch_items == scored.item_idx).mean() > 0.95      # the same lists but for near-ties


def _fields(artifact: ModelArtifact) -> dict:
    names = ("version", "model_type", "item_ids", "item_factors", "user_ids", "user_factors", "popularity",
             "user_items_indptr", "user_items_indices", "user_items_counts", "params", "cutoff_time")
    return {name: getattr(artifact, name) for name in names}
