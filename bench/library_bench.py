"""The `implicit` library beside the job, on the job's own holdout splits; ALS fit times side by side.

Run with the bench's own interpreter (bench/library_env.sh installs the library there, never in
the product's environment, and prints the interpreter's path):

    $(bench/library_env.sh) bench/library_bench.py quality --datasets-dir ../shared/datasets --tag r1
    $(bench/library_env.sh) bench/library_bench.py fits --input <generated>/transactions.csv --tag r1

``quality``, per dataset and split (random, time):
  1. the job at its defaults (``python -m batch_training --no-publish``, the product's interpreter):
     its wall time and the published model's holdout metrics from its run summary;
  2. the same split rebuilt here with the job's functions (read, clean, aggregate, index, split);
     popularity scored here must match the job's popularity row, which proves the split is the same;
  3. the library's ALS, its hyperparameters (rank, regularization, alpha, BM25 weighting or none)
     chosen on a validation part of the training part (random split: the job's first CV fold;
     time split: each customer's newest 20 % of training pairs), then refitted on the training
     part; with ``--oracle`` also the best setting on the holdout itself, the library's ceiling;
     the library's BM25 and cosine item-kNN (K=100);
  all scored by the job's metrics (``batch_training.evaluation.evaluate``), purchased products
  excluded as in the job's main table.
``fits``: seconds per ALS fit, the job's Spark ``fit_als`` against the library on the same pairs and
parameters (10 iterations, regularization 0.1), with both of the library's solvers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")      # the library's advice: its own threads, not BLAS's
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from batch_training.data import aggregate, index_ids  # noqa: E402
from batch_training.datasets import load_events, load_preset, source_placeholders  # noqa: E402
from batch_training.evaluation import (  # noqa: E402
    Csr,
    evaluate,
    evaluation_users,
    first_k_unpurchased,
    holdout_split,
    item_popularity,
    kfold_splits,
    relevant_sets,
)
from batch_training.train import AlsParams, PairArrays, fit_als  # noqa: E402
from models.config import load_config  # noqa: E402

PRODUCT_PYTHON = REPO / ".venv" / "bin" / "python"
K, THREADS = 10, 2
LIBRARY_GRID = {"factors": [4, 8, 16, 32, 64, 128, 256], "regularization": [0.01, 0.1], "alpha": [1.0, 10.0, 40.0],
                "weighting": ["none", "bm25"]}
ITERATIONS = 15
BM25_ALS = {"K1": 100, "B": 0.8}        # the library's own example weighting for ALS input
PLACEHOLDERS: dict[str, str] = {}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def shown(text: str) -> str:
    for path, name in sorted(PLACEHOLDERS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


# ------------------------------------------------------------------------------- the job's split

class JobSplit:
    """One dataset's holdout split as the job makes it, collected as arrays for the library."""

    def __init__(self, spark, cfg, method: str):
        from streaming.settings import duration_ms

        data = cfg.get_path("data")
        skew = duration_ms(cfg.get_path("streaming.max_future_skew"), "streaming.max_future_skew")
        events, _ = load_events(spark, data, source_placeholders(cfg), max_future_skew_ms=skew)
        events = events.cache()
        count_mode = str(data.get("count_mode", "rows"))
        indexed, maps = index_ids(aggregate(events, count_mode).cache())
        self.n_users, self.n_items = maps.n_users, maps.n_items
        split_input = indexed if method == "random" else (
            events.join(maps.customers, "customer_id").join(maps.products, "product_id")
            .select("user", "item", "quantity", "event_time"))       # as the job's time split reads it
        train, test = holdout_split(split_input, method=method,
                                    test_fraction=float(cfg.get_path("batch.holdout.test_fraction")),
                                    seed=int(cfg.get_path("batch.holdout.seed")), count_mode=count_mode)
        self.train_df = train.cache()
        self.train, self.test = self._arrays(self.train_df, test)
        # The library's validation part, carved from the training part as the split itself is made:
        # the job's first CV fold for the random split; for the time split, the newest 20 % of
        # each customer's training pairs (by their last purchase), as the library would be tuned
        # for predicting the future.
        if method == "random":
            fold_train, fold_test = next(kfold_splits(self.train_df, int(cfg.get_path("batch.cv_folds")),
                                                      seed=int(cfg.get_path("batch.als.seed"))))
        else:
            fold_train, fold_test = holdout_split(self.train_df, method="time",
                                                  test_fraction=float(cfg.get_path("batch.holdout.test_fraction")))
        self.validation = self._arrays(fold_train, fold_test)

    def _arrays(self, train, test) -> tuple[dict[str, Any], dict[str, Any]]:
        pairs = PairArrays.collect(train, self.n_users)
        users = evaluation_users(test, True)
        return ({"pairs": pairs, "popularity": item_popularity(train, self.n_items)},
                {"users": users, "relevant": relevant_sets(test, users, True)})


def user_items(pairs: PairArrays, n_items: int):
    import scipy.sparse as sp

    return sp.csr_matrix((pairs.counts.astype(np.float32), pairs.indices, pairs.indptr),
                         shape=(len(pairs.indptr) - 1, n_items))


def score(recs: np.ndarray, test: dict, train: dict, n_items: int) -> dict[str, float]:
    result = evaluate(recs, test["relevant"], K, n_items, train["popularity"])
    return {key: round(float(result[key]), 4) for key in ("ndcg", "map", "precision", "recall", "coverage")}


def popularity_recs(train: dict, users: np.ndarray) -> np.ndarray:
    indptr, indices = train["pairs"].rows(users)
    return first_k_unpurchased(train["popularity"].ranking(), Csr(indptr, indices), K)


def library_recs(model, matrix, users: np.ndarray) -> np.ndarray:
    ids, scores = model.recommend(users, matrix[users], N=K, filter_already_liked_items=True)
    return np.where(np.isfinite(scores) & (ids >= 0), ids, -1)


def weighted(matrix, weighting: str):
    from implicit.nearest_neighbours import bm25_weight

    if weighting == "none":
        return matrix
    return bm25_weight(matrix.T.tocsr(), **BM25_ALS).T.tocsr().astype(np.float32)


def library_als(train: dict, test: dict, n_items: int, setting: dict) -> tuple[dict, float]:
    from implicit.als import AlternatingLeastSquares

    matrix = user_items(train["pairs"], n_items)
    model = AlternatingLeastSquares(factors=setting["factors"], regularization=setting["regularization"],
                                    alpha=setting["alpha"], iterations=ITERATIONS, random_state=42,
                                    num_threads=THREADS)
    started = time.perf_counter()
    model.fit(weighted(matrix, setting["weighting"]), show_progress=False)
    seconds = time.perf_counter() - started
    return score(library_recs(model, matrix, test["users"]), test, train, n_items), seconds


def library_knn(train: dict, test: dict, n_items: int, kind: str) -> dict:
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    matrix = user_items(train["pairs"], n_items)
    model = BM25Recommender(K=100) if kind == "bm25" else CosineRecommender(K=100)
    model.fit(matrix, show_progress=False)
    return score(library_recs(model, matrix, test["users"]), test, train, n_items)


def validated_library_als(split: JobSplit, oracle: bool) -> dict[str, Any]:
    """Every grid setting scored on the validation part; the best (nDCG@10) refitted on train and
    scored on the holdout. With ``oracle``, every setting is also scored on the holdout: the best of
    those is an upper bound for the library (a choice made on the holdout, which no honest
    selection can make)."""
    keys = list(LIBRARY_GRID)
    settings = [dict(zip(keys, values)) for values in itertools.product(*(LIBRARY_GRID[k] for k in keys))]
    scored = []
    for setting in settings:
        metrics, seconds = library_als(*split.validation, split.n_items, setting)
        row = {**setting, "validation_ndcg": metrics["ndcg"], "fit_s": round(seconds, 2)}
        if oracle:
            row["holdout"] = library_als(split.train, split.test, split.n_items, setting)[0]
        scored.append(row)
    best = max(scored, key=lambda row: row["validation_ndcg"])
    chosen = {key: best[key] for key in keys}
    holdout, _ = library_als(split.train, split.test, split.n_items, chosen)
    result = {"chosen": chosen, "validation_ndcg": best["validation_ndcg"], "holdout": holdout,
              "grid": sorted(scored, key=lambda row: -row["validation_ndcg"])[:10]}
    if oracle:
        top = max(scored, key=lambda row: row["holdout"]["ndcg"])
        result["best_on_holdout"] = {**{key: top[key] for key in keys}, "holdout": top["holdout"]}
    return result


# --------------------------------------------------------------------------------------- parts

def run_job(dataset: str, datasets_dir: Path, method: str, scratch: Path) -> dict[str, Any]:
    """The job at its defaults, as a scheduler runs it: wall time and its run summary."""
    run_dir = scratch / f"{dataset}_{method}"
    command = [str(PRODUCT_PYTHON), "-m", "batch_training", "--dataset", dataset, "--datasets-dir",
               str(datasets_dir), "--no-publish", "--set", f"batch.holdout.method={method}"]
    env = {**os.environ, "RECO__RUN_DIR": str(run_dir), "PYTHONPATH": str(REPO)}
    env.pop("OPENBLAS_NUM_THREADS", None)
    load_before = load_average()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise RuntimeError(f"the job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(sorted(run_dir.glob("output/versions/*/run_summary.json"))[-1].read_text())
    metrics = summary["metrics"]
    return {"command": shown(" ".join(command)), "wall_s": round(wall, 1), "load_before": load_before,
            "load_after": load_average(), "stage_seconds": summary["stage_seconds"],
            "selected": metrics["selection"], "cross_validation": metrics["cross_validation"][:3],
            "published": {k: round(float(v), 4) for k, v in metrics["exclude_purchased"]["model"].items()
                          if k in ("ndcg", "map", "precision", "recall", "coverage")},
            "popularity": {k: round(float(v), 4) for k, v in metrics["exclude_purchased"]["popularity"].items()
                           if k in ("ndcg", "map")}}


def quality(opts: argparse.Namespace) -> dict[str, Any]:
    from models.spark import build_spark

    datasets_dir = Path(opts.datasets_dir).resolve()
    PLACEHOLDERS[str(datasets_dir)] = "<datasets>"
    scratch = Path(opts.scratch).resolve()
    PLACEHOLDERS[str(scratch)] = "<scratch>"
    PLACEHOLDERS[str(PRODUCT_PYTHON)] = "python"
    results: dict[str, Any] = {}
    spark = None
    for dataset in opts.datasets.split(","):
        cfg = load_config().with_overrides({"data": load_preset(dataset), "data.datasets_dir": str(datasets_dir),
                                            "run_dir": str(scratch / "bench-spark")})
        for method in opts.splits.split(","):
            name = f"{dataset}_{method}"
            print(f"--- {name}: the job", flush=True)
            entry: dict[str, Any] = {"job": run_job(dataset, datasets_dir, method, scratch)}
            print(f"    {entry['job']['wall_s']} s, published {entry['job']['published']}", flush=True)
            spark = spark or build_spark(cfg, "library-bench", need_kafka=False)
            split = JobSplit(spark, cfg, method)
            popularity = score(popularity_recs(split.train, split.test["users"]), split.test, split.train,
                               split.n_items)
            entry["popularity_here"] = popularity
            entry["same_split"] = all(abs(popularity[m] - entry["job"]["popularity"][m]) < 5e-5
                                      for m in ("ndcg", "map"))
            print(f"    split rebuilt: popularity {popularity} (same as the job's: {entry['same_split']})", flush=True)
            started = time.perf_counter()
            entry["library_als"] = validated_library_als(split, oracle=opts.oracle)
            entry["library_als"]["selection_s"] = round(time.perf_counter() - started, 1)
            print(f"    library ALS {entry['library_als']['chosen']}: {entry['library_als']['holdout']}", flush=True)
            for kind in ("bm25", "cosine"):
                entry[f"library_knn_{kind}"] = library_knn(split.train, split.test, split.n_items, kind)
            print(f"    library item-kNN bm25 {entry['library_knn_bm25']}", flush=True)
            entry["customers"], entry["products"] = split.n_users, split.n_items
            results[name] = entry
            split.train_df.unpersist()
            save(opts, {"part": "quality", **results})
    return results


def fits(opts: argparse.Namespace) -> dict[str, Any]:
    """Seconds per ALS fit on all pairs of ``--input``: Spark (the job's ``fit_als``) and the library."""
    from implicit.als import AlternatingLeastSquares

    from models.spark import build_spark

    cfg = load_config().with_overrides({"data.path": str(Path(opts.input).resolve()),
                                        "run_dir": str(Path(opts.scratch).resolve() / "bench-spark")})
    spark = build_spark(cfg, "library-bench-fits", need_kafka=False)
    events, _ = load_events(spark, cfg.get_path("data"), source_placeholders(cfg))
    indexed, maps = index_ids(aggregate(events.cache(), "rows").cache())
    indexed = indexed.cache()
    pairs = PairArrays.collect(indexed, maps.n_users)
    matrix = user_items(pairs, maps.n_items)
    rows = []
    for rank, alpha in itertools.product(opts.ranks, opts.alphas):
        params = replace(AlsParams(), rank=rank, alpha=alpha, reg_param=0.1, max_iter=10)
        row = {"rank": rank, "alpha": alpha, "load_before": load_average()}
        row["spark_s"] = round(fit_als(indexed, params, maps.n_users, maps.n_items).fit_seconds, 1)
        for solver, use_cg in (("library_cg_s", True), ("library_cholesky_s", False)):
            model = AlternatingLeastSquares(factors=rank, regularization=0.1, alpha=alpha, iterations=10,
                                            use_cg=use_cg, random_state=42, num_threads=THREADS)
            started = time.perf_counter()
            model.fit(matrix, show_progress=False)
            row[solver] = round(time.perf_counter() - started, 2)
        row["load_after"] = load_average()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"customers": maps.n_users, "products": maps.n_items, "pairs": int(pairs.indices.size), "rows": rows}


def save(opts: argparse.Namespace, results: dict[str, Any]) -> None:
    out = REPO / "bench" / "results" / f"library_{opts.part}_{opts.tag}.json"
    facts = {"started_utc": opts.started, "saved_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
             "load_start": opts.load_start, "load_now": load_average(), "cores": os.cpu_count(),
             "threads": THREADS, "library_iterations": ITERATIONS, "library_grid": LIBRARY_GRID,
             "bm25_for_als": BM25_ALS}
    out.write_text(shown(json.dumps({**facts, **results}, indent=2)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["quality", "fits"])
    parser.add_argument("--datasets-dir", help="quality: the folder holding the public datasets")
    parser.add_argument("--datasets", default="online_retail,groceries")
    parser.add_argument("--splits", default="random,time")
    parser.add_argument("--input", help="fits: a transactions file (e.g. generated at factor 1)")
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128])
    parser.add_argument("--alphas", type=lambda s: [float(x) for x in s.split(",")], default=[10.0])
    parser.add_argument("--oracle", action="store_true",
                        help="quality: also score every library ALS setting on the holdout (its upper bound)")
    parser.add_argument("--scratch", default="/tmp/library-bench")
    parser.add_argument("--tag", default="run")
    opts = parser.parse_args(argv)
    if opts.part == "quality" and not opts.datasets_dir:
        parser.error("quality needs --datasets-dir")
    if opts.part == "fits" and not opts.input:
        parser.error("fits needs --input")
    opts.started, opts.load_start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), load_average()
    Path(opts.scratch).mkdir(parents=True, exist_ok=True)
    results = quality(opts) if opts.part == "quality" else fits(opts)
    save(opts, {"part": opts.part, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
