"""The holdout evaluation on the executors, for customer bases the driver cannot hold.

``holdout.candidate_table`` and ``holdout.evaluate_buy_again`` collect every evaluated customer's
training counts and held-out items to the driver. Here the driver keeps the item side only (item
factors, popularity, the item-kNN similarity), ships it once as a broadcast, and receives a few
numbers per candidate and metric:

1. Spark groups, per evaluated customer, the relevant held-out items (``evaluation._relevant_rows``)
   and the training counts, and hash-partitions the customers so a task holds one partition's.
2. A task gives its customers an artifact of their own (the item side shared, not copied), scores
   every candidate with the shared scorers, and reduces each list to ``partition_sums``.
3. Spark adds the sums per candidate; ``metrics_from_sums`` turns them into ``evaluation.evaluate``'s
   dict.

Why the sums are exact: each metric of ``evaluate`` except coverage is a mean over a subset of the
customers (ranking metrics: those with a relevant item, i.e. all evaluated ones; novelty: lists
with >= 1 item; diversity: lists with >= 2), and ``metrics.py`` computes per list before it
averages. So a task reports its subset mean times the subset size (its sum, within a rounding
error) and the size; the ratio of the totals is the mean over all customers. Coverage is a
distinct count: tasks emit their distinct recommended items and Spark counts them distinctly.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import numpy as np
import pandas as pd

from batch_training.candidates import Candidate, as_candidate, recommend_candidates, seed_neighbour_tables
from batch_training.evaluation import Csr, ItemPopularity, _relevant_rows
from batch_training.metrics import PADDING, RANKING_METRICS, intra_list_diversity, novelty, ranking_metrics
from batch_training.per_customer import partitions_for
from models.artifact import ModelArtifact
from models.neighbours import KnnParams
from models.scorers import buy_again, user_vectors

CUSTOMERS_PER_PARTITION = 10_000
# users: customers with a relevant item; listed / diverse: lists with >= 1 / >= 2 items.
SUM_COLUMNS = ("users", *RANKING_METRICS, "novelty", "listed", "diversity", "diverse")
# One row per (partition, candidate) with the sums and item -1, one per distinct recommended item.
SUMS_SCHEMA = "candidate string, item int, " + ", ".join(f"{c} double" for c in SUM_COLUMNS)


def partition_sums(recommended: np.ndarray, relevant: Csr, k: int, popularity: ItemPopularity,
                   item_factors: np.ndarray | None = None) -> dict[str, float]:
    """The metric sums of some customers' lists and the number of lists each is over (``SUM_COLUMNS``)."""
    top = np.asarray(recommended)[:, :k]
    ranking = ranking_metrics(top, relevant.indptr, relevant.indices, k)
    per_list = (top != PADDING).sum(axis=1)
    listed, diverse = int((per_list >= 1).sum()), int((per_list >= 2).sum())
    sums = {"users": ranking["users"], **{m: _total(ranking[m], ranking["users"]) for m in RANKING_METRICS},
            "novelty": _total(novelty(top, popularity.buyers, popularity.n_customers), listed) if listed else 0.0,
            "listed": listed, "diversity": 0.0, "diverse": diverse}
    if item_factors is not None and diverse:
        sums["diversity"] = _total(intra_list_diversity(top, item_factors), diverse)
    return {name: float(value) for name, value in sums.items()}


def metrics_from_sums(sums: Mapping[str, float], distinct_items: int, k: int, n_items: int,
                      diversity: bool) -> dict[str, float]:
    """``evaluation.evaluate``'s dict from the totals of ``partition_sums`` and the distinct items."""
    users = int(sums["users"])
    result: dict[str, float] = {"k": k, **{m: _mean(sums[m], users) for m in RANKING_METRICS}, "users": users,
                                "coverage": float(distinct_items / n_items),
                                "novelty": _mean(sums["novelty"], sums["listed"])}
    if diversity:
        result["diversity"] = _mean(sums["diversity"], sums["diverse"])
    return result


def candidate_table_on_executors(train, test, base: ModelArtifact, candidates: list[Candidate], k: int,
                                 exclude_purchased: bool, popularity: ItemPopularity,
                                 item_factors: np.ndarray | None = None, partitions: int | None = None,
                                 n_users: int | None = None, tables: dict | None = None) -> dict[str, dict[str, float]]:
    """``holdout.candidate_table`` for the same split and fit: every candidate's metrics by name.

    ``base`` is the item side of the fit (``candidates.scoring_artifact`` without users),
    ``popularity`` train's; ``item_factors`` (the job passes the fit's) adds diversity.
    ``partitions`` defaults to one per ``CUSTOMERS_PER_PARTITION`` training customers
    (``popularity.n_customers``: known without another Spark job). ``n_users`` (the indexed
    customers, for item-kNN's sampling stride) defaults to ``popularity.n_customers``. ``tables``
    keeps the item-kNN neighbour tables of this ``train`` across calls (the job passes one dict per
    split: a table costs more than a scoring pass).
    """
    score = partial(_score_candidates, candidates=list(candidates), k=k, exclude_purchased=exclude_purchased)
    names = list(dict.fromkeys(c.name for c in candidates))
    item_side = _item_side(base, train, candidates, n_users or popularity.n_customers, tables)
    return _evaluate(train, _relevant_rows(test, exclude_purchased), item_side,
                     score, names, k, popularity, item_factors, partitions)


def buy_again_table_on_executors(train, test, base: ModelArtifact, k: int, selected: Candidate,
                                 popularity: ItemPopularity, partitions: int | None = None,
                                 n_users: int | None = None, tables: dict | None = None) -> dict[str, dict]:
    """``holdout.evaluate_buy_again``: the buy-again lists of the selected model, ALS and popularity
    against the held-out repurchases; {} when the split holds out none (the random split)."""
    from pyspark.sql import functions as F

    scored = list(dict.fromkeys([selected, Candidate("als"), Candidate("popularity")]))
    score = partial(_score_buy_again, candidates=scored, k=k)
    item_side = _item_side(base, train, scored, n_users or popularity.n_customers, tables)
    table = _evaluate(train, test.where(F.col("repurchase")), item_side, score,
                      [f"buy_again({c.name})" for c in scored], k, popularity, None, partitions)
    return table if any(metrics["users"] for metrics in table.values()) else {}


def item_neighbours_on_executors(train, n_users: int, n_items: int, params: KnnParams):
    """``models.neighbours.item_neighbours`` of train's purchases, built by Spark.

    The pairs of products a customer bought are joined and their weights summed on the executors,
    each product's best ``params.neighbours`` kept there too; the driver receives the kept cells
    only (n_items x neighbours), never the purchases nor the co-occurrence.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from models.neighbours import from_triplets

    stride = params.stride(n_users)
    pairs = (train.where(F.col("user") % stride == 0)
             .select("user", F.col("item").cast("int").alias("item"), F.col("count").cast("double").alias("count"))
             .groupBy("user", "item").agg(F.sum("count").alias("count")))
    if params.weighting == "bm25":
        per_customer = pairs.groupBy("user").agg(F.count("*").alias("products"))
        length = pairs.groupBy("item").agg(F.sum("count").alias("length"))
        mean_length = length.agg(F.mean("length")).first()[0] or 1.0
        norm = (1.0 - params.b) + params.b * F.col("length") / F.lit(float(mean_length))
        idf = F.log(F.lit(float(n_items)) / (1.0 + F.col("products")))
        weighted = pairs.join(per_customer, "user").join(length, "item").select(
            "user", "item", (F.col("count") * (params.k1 + 1.0) / (params.k1 * norm + F.col("count")) * idf).alias("w"))
    else:
        weighted = pairs.select("user", "item", F.lit(1.0).alias("w"))
    left, right = weighted.alias("a"), weighted.alias("b")
    cells = (left.join(right, "user").where(F.col("a.item") != F.col("b.item"))
             .groupBy(F.col("a.item").alias("i"), F.col("b.item").alias("j"))
             .agg(F.sum(F.col("a.w") * F.col("b.w")).alias("weight")))
    if params.weighting == "cosine":
        buyers = weighted.groupBy("item").agg(F.count("*").cast("double").alias("buyers"))
        cells = (cells.join(buyers.select(F.col("item").alias("i"), F.col("buyers").alias("bi")), "i")
                 .join(buyers.select(F.col("item").alias("j"), F.col("buyers").alias("bj")), "j")
                 .select("i", "j", (F.col("weight") / F.sqrt(F.col("bi") * F.col("bj"))).alias("weight")))
    cells = cells.where(F.col("weight") > 0)
    if params.neighbours is not None:
        rank = F.row_number().over(Window.partitionBy("i").orderBy(F.col("weight").desc(), F.col("j")))
        cells = cells.withColumn("_rank", rank).where(F.col("_rank") <= params.neighbours)
    kept = cells.select("i", "j", "weight").toPandas()
    return from_triplets(kept["i"].to_numpy(), kept["j"].to_numpy(), kept["weight"].to_numpy(), n_items)


# ------------------------------------------------------------------------------------ internals

def _evaluate(train, relevant_rows, item_side: ModelArtifact, score: Callable, names: list[str], k: int,
              popularity: ItemPopularity, item_factors: np.ndarray | None,
              partitions: int | None) -> dict[str, dict[str, float]]:
    """One Spark job: customers grouped and partitioned, scored and summed by the tasks, the sums
    added by Spark; the driver receives a row per candidate."""
    from pyspark.sql import functions as F

    customers = _customer_frame(train, relevant_rows, partitions or partitions_for(
        popularity.n_customers, CUSTOMERS_PER_PARTITION, train.sparkSession))
    shared = train.sparkSession.sparkContext.broadcast((item_side, popularity, item_factors))
    try:
        rows = (customers.mapInPandas(partial(_task, shared=shared, score=score, k=k), SUMS_SCHEMA)
                .groupBy("candidate")
                .agg(F.countDistinct(F.when(F.col("item") != PADDING, F.col("item"))).alias("_items"),
                     *(F.sum(c).alias(c) for c in SUM_COLUMNS))
                .collect())
    finally:
        shared.unpersist()
    totals = {row["candidate"]: row.asDict() for row in rows}
    none = {"_items": 0, **{c: 0.0 for c in SUM_COLUMNS}}     # a candidate no task scored: no customer
    return {name: metrics_from_sums(totals.get(name, none), totals.get(name, none)["_items"], k, item_side.n_items,
                                    item_factors is not None) for name in names}


def _customer_frame(train, relevant_rows, partitions: int):
    """One row per customer with a relevant item: the relevant items, the training items (ascending,
    as ``PairArrays.collect`` orders them) and counts, null without any; hash-partitioned by customer."""
    from pyspark.sql import functions as F

    relevant = relevant_rows.groupBy("user").agg(F.collect_set(F.col("item").cast("int")).alias("relevant"))
    history = train.groupBy("user").agg(F.sort_array(F.collect_list(F.struct(
        F.col("item").cast("int").alias("item"), F.col("count").cast("double").alias("count")))).alias("_pairs"))
    return (relevant.join(history, "user", "left")
            .select("user", "relevant", F.col("_pairs.item").alias("items"), F.col("_pairs.count").alias("counts"))
            .repartition(partitions, "user"))


def _item_side(base: ModelArtifact, train, candidates: list[Candidate], n_users: int,
               tables: dict | None = None) -> ModelArtifact:
    """``base`` to ship, with each item-kNN candidate's neighbour table of all of train: a task's
    artifact holds only its own customers' counts, from which the scorer would build it."""
    shipped = copy.copy(base)
    # models.scorers keeps its per-artifact precomputations here; the tasks' copies share it.
    shipped._scorer_cache = {}
    seed_neighbour_tables(shipped, candidates, {} if tables is None else tables,
                          lambda params: item_neighbours_on_executors(train, n_users, base.n_items, params))
    return shipped


def _task(frames: Iterator[pd.DataFrame], shared, score: Callable, k: int) -> Iterator[pd.DataFrame]:
    """mapInPandas: a partition's customers in, per candidate a sums row and its distinct items out."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return
    frame = pd.concat(frames, ignore_index=True)
    item_side, popularity, item_factors = shared.value
    artifact = _with_customers(item_side, frame)
    relevant = Csr(*_csr(list(frame["relevant"]), np.int64))
    out = []
    for name, lists in score(artifact).items():
        top = lists[:, :k]
        sums = partition_sums(top, relevant, k, popularity, item_factors)
        items = np.unique(top[top != PADDING])
        rows = pd.DataFrame({"candidate": name, "item": np.concatenate([[PADDING], items]).astype(np.int32)})
        for column in SUM_COLUMNS:
            rows[column] = np.where(rows["item"] == PADDING, sums[column], 0.0)
        out.append(rows)
    yield pd.concat(out, ignore_index=True)


def _with_customers(item_side: ModelArtifact, frame: pd.DataFrame) -> ModelArtifact:
    """The item side with the frame's customers as users 0..n-1 (a shallow copy: no item array copied)."""
    empty = np.zeros(0)
    indptr, indices = _csr([empty if v is None else v for v in frame["items"]], np.int32)
    _, counts = _csr([empty if v is None else v for v in frame["counts"]], np.float32)
    artifact = copy.copy(item_side)
    artifact.user_ids = np.arange(len(frame)).astype(str)
    artifact.user_factors = np.zeros((len(frame), 0), dtype=np.float32)
    artifact.user_items_indptr, artifact.user_items_indices, artifact.user_items_counts = indptr, indices, counts
    return artifact


def _csr(rows: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    values = np.concatenate([np.asarray(row, dtype=dtype) for row in rows]) if rows else np.zeros(0, dtype)
    return indptr, values.astype(dtype, copy=False)


def _score_candidates(artifact: ModelArtifact, candidates: list[Candidate], k: int,
                      exclude_purchased: bool) -> dict[str, np.ndarray]:
    return recommend_candidates(artifact, candidates, np.arange(artifact.n_users), k, exclude_purchased)


def _score_buy_again(artifact: ModelArtifact, candidates: list[Candidate], k: int) -> dict[str, np.ndarray]:
    """As ``holdout.evaluate_buy_again``: one fold-in shared by every candidate."""
    indptr, indices, counts = artifact.user_items
    vectors = user_vectors(artifact, indptr, indices, counts)
    return {f"buy_again({c.name})": buy_again(as_candidate(artifact, c), indptr, indices, counts, k,
                                              vectors=vectors)[0] for c in candidates}


def _total(mean: float, count: int) -> float:
    return float(mean) * count if count else 0.0


def _mean(total: float, count: float) -> float:
    return float(total / count) if count else float("nan")
