"""Batch benchmark: one run measures our job, the original approach and the top-k engines side by side.

Every part runs in its own process (its own JVM), so its wall time and peak memory are its own;
a sampler thread reads the RSS of the part's whole process tree (python driver, JVM, python
workers) from /proc every 0.2 s and keeps the peak per stage. Stages are taken from the job's log
(``== <stage>``) or from ``BENCH-STAGE <stage>`` lines the worker parts print.

Parts (``--parts``, default: all, in this order):

* ``ours``       the job without CV (``python -m batch_training --no-cv``): raw file to published model.
* ``final``      the job without CV with ``batch.final_fit=fold_in`` (one ALS fit), and the
                 quality of both final models (refit vs fold-in) one step back in time.
* ``topk``       one implicit ALS fit, then Spark's ``recommendForAllUsers`` vs our top-k (driver
                 numpy and the mapInPandas engine) on the same factors, and the scoring core
                 (fold-in + top-10 for 1,000 customers) used by the streaming job.
* ``blas``       the same ALS fit with native BLAS (OpenBLAS through ``libblas.so.3``) and with
                 Java BLAS forced (``-Ddev.ludovic.netlib.blas.nativeLib=<missing>``), one JVM each.
* ``original``   the replaced job: explicit ALS on counts, 5-fold CV (RMSE) over two regParam
                 values, final fit, ``recommendForAllUsers``, CSV write.
* ``quality``    holdout quality of the original approach (explicit ALS at the regParam its CV
                 chose) on the job's per-customer split; ours and popularity come from ``ours``.
* ``datasets``   Online Retail and Groceries, random and time splits (needs ``--datasets-dir``): our
                 job at its defaults (CV over the ALS grid and the scorers) and the original approach;
                 the published model beside popularity, item-kNN and ALS.
* ``grid``       our job at its default grid (`batch.cv_folds`-fold CV, raced, over `batch.grid` x the scorers).

Usage: ``python bench/batch_bench.py --factor 1 [--datasets-dir DIR] [--parts ours,topk]``.
Results: ``<out>/batch_f<factor>.json`` and ``<out>/batch_f<factor>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from infra.process import tree_rss_bytes  # noqa: E402  (the repository's own package)

PARTS = ("ours", "final", "topk", "blas", "original", "quality", "datasets", "grid")
JOB_STAGE = re.compile(r" batch_training: == (.+)$")
BENCH_STAGE = re.compile(r"^BENCH-STAGE (.+)$")
BENCH_RESULT = "BENCH-RESULT "
MISSING_BLAS = "bench-forced-java-blas.so"   # a library name that cannot load: netlib falls back to Java
JAVA_BLAS_OPTIONS = (f"-Ddev.ludovic.netlib.blas.nativeLib={MISSING_BLAS} "
                     f"-Ddev.ludovic.netlib.lapack.nativeLib={MISSING_BLAS}")
ORIGINAL_REG_PARAMS = (0.01, 0.1)
ORIGINAL_FOLDS = 5


# ------------------------------------------------------------------------------ process memory

def tree_rss_mib(root: int) -> float:
    """RSS of ``root`` and all its descendants (MiB): the driver, its JVM and python workers."""
    return tree_rss_bytes(root) / 2 ** 20


class StageMemory:
    """Samples a process tree's RSS and keeps the peak for the stage currently running."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.stage = "start-up"
        self.peaks: dict[str, float] = {}
        self.starts: dict[str, float] = {"start-up": time.perf_counter()}
        self.ends: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def begin(self, stage: str) -> None:
        now = time.perf_counter()
        self.ends[self.stage] = now
        self.stage = stage
        self.starts[stage] = now

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_mib(self.pid)
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> StageMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.ends.setdefault(self.stage, time.perf_counter())
        self._stop.set()
        self._thread.join()

    def stage_seconds(self) -> dict[str, float]:
        return {name: self.ends.get(name, self.starts[name]) - self.starts[name] for name in self.starts}


@dataclass
class PartRun:
    command: list[str]
    exit_code: int
    wall_seconds: float
    peak_rss_mib: float
    stage_peak_rss_mib: dict[str, float]
    stage_seconds_observed: dict[str, float]
    result: dict[str, Any] = field(default_factory=dict)
    log_tail: list[str] = field(default_factory=list)


def run_part(command: list[str], env: dict[str, str]) -> PartRun:
    """Run one part as a child process; follow its stages from its log; sample its memory."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    tail: list[str] = []
    result: dict[str, Any] = {}
    with StageMemory(process.pid) as memory:
        for line in process.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            stage = JOB_STAGE.search(line) or BENCH_STAGE.match(line)
            if stage:
                memory.begin(stage.group(1))
            elif line.startswith(BENCH_RESULT):
                result = json.loads(line[len(BENCH_RESULT):])
        process.wait()
    wall = time.perf_counter() - started
    peaks = memory.peaks
    return PartRun(command=[_shown(c) for c in command], exit_code=process.returncode, wall_seconds=wall,
                   peak_rss_mib=max(peaks.values(), default=0.0), stage_peak_rss_mib=peaks,
                   stage_seconds_observed=memory.stage_seconds(), result=result,
                   log_tail=tail if process.returncode not in (0, 3) else tail[-5:])


PLACEHOLDERS: dict[str, str] = {}   # machine-specific path -> <role>, filled by orchestrate()


def _shown(arg: str) -> str:
    """Text as written to the report: the interpreter and folders by role, not by path."""
    if arg == sys.executable:
        return "python"
    for path, role in sorted(PLACEHOLDERS.items(), key=lambda item: -len(item[0])):
        arg = arg.replace(path, role)
    return arg


# ------------------------------------------------------------------------------ worker parts

def _stage(name: str) -> None:
    print(f"BENCH-STAGE {name}", flush=True)


def _emit(result: dict[str, Any]) -> None:
    print(BENCH_RESULT + json.dumps(result), flush=True)


def _session(extra_conf: dict[str, str] | None = None):
    from models.config import load_config
    from models.spark import build_spark

    cfg = load_config()
    if extra_conf:
        cfg = cfg.with_overrides({"spark.extra_conf": extra_conf})
    return cfg, build_spark(cfg, "reco-bench", need_kafka=False)


def _indexed_pairs(spark, cfg, data_path: str):
    from batch_training.data import aggregate, index_ids
    from batch_training.datasets import load_events

    data = {**cfg.get_path("data"), "path": data_path}
    events, _ = load_events(spark, data)
    pairs = aggregate(events.cache(), str(data.get("count_mode", "rows")))
    indexed, maps = index_ids(pairs)
    return indexed.cache(), maps


def _als(params, implicit: bool | None = None, reg_param: float | None = None):
    from pyspark.ml.recommendation import ALS

    return ALS(rank=params.rank, maxIter=params.max_iter,
               regParam=params.reg_param if reg_param is None else reg_param,
               implicitPrefs=params.implicit_prefs if implicit is None else implicit, alpha=params.alpha,
               seed=params.seed, numUserBlocks=params.blocks, numItemBlocks=params.blocks, checkpointInterval=5,
               userCol="user", itemCol="item", ratingCol="rating", coldStartStrategy="drop")


def _blas_in_use(spark) -> dict[str, str]:
    jvm = spark._jvm
    try:
        return {"blas": jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName(),
                "lapack": jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getName()}
    except Exception as err:  # noqa: BLE001 - report what we could not read, the timing still counts
        return {"error": str(err)}


def _timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = action()
    return time.perf_counter() - started, value


def worker_blas(data_path: str, java_blas: bool) -> None:
    """One implicit ALS fit at the configured parameters; which BLAS/LAPACK the JVM loaded."""
    from batch_training.job_settings import als_params_from_config
    from batch_training.train import with_ratings

    _stage("session")
    cfg, spark = _session({"spark.driver.extraJavaOptions": JAVA_BLAS_OPTIONS} if java_blas else None)
    _stage("read, aggregate, index")
    indexed, maps = _indexed_pairs(spark, cfg, data_path)
    params = als_params_from_config(cfg)
    ratings = with_ratings(indexed.select("user", "item", "count"), params, maps.n_items).cache()
    ratings.count()
    _stage("ALS fit")
    fit_seconds, model = _timed(lambda: _als(params).fit(ratings))
    model.userFactors.count()
    _emit({"fit_seconds": fit_seconds, "implementation": _blas_in_use(spark), "params": params.as_dict()})
    spark.stop()


def worker_topk(data_path: str, customers: int) -> None:
    """recommendForAllUsers vs our top-k on the same factors, and the streaming scoring core."""
    import numpy as np

    from batch_training.job_settings import als_params_from_config
    from batch_training.recommend import recommend_for_all
    from batch_training.train import PairArrays, _dense, with_ratings
    from models.scoring import fold_in, gramian, top_k

    _stage("session")
    cfg, spark = _session()
    _stage("read, aggregate, index")
    indexed, maps = _indexed_pairs(spark, cfg, data_path)
    n_users, n_items = maps.n_users, maps.n_items
    params = als_params_from_config(cfg)
    _stage("ALS fit")
    fit_seconds, model = _timed(lambda: _als(params).fit(with_ratings(indexed.select("user", "item", "count"),
                                                                      params, n_items)))
    k = int(cfg.get_path("batch.k", 10))
    out: dict[str, Any] = {"n_users": n_users, "n_items": n_items, "rank": params.rank, "k": k,
                           "fit_seconds": fit_seconds, "blas": _blas_in_use(spark)}

    _stage("recommendForAllUsers")
    out["spark_recommend_noop_seconds"], _ = _timed(
        lambda: model.recommendForAllUsers(k).write.format("noop").mode("overwrite").save())
    out["spark_recommend_collect_seconds"], spark_rows = _timed(lambda: model.recommendForAllUsers(k).toPandas())

    _stage("export factors")
    out["export_seconds"], (users, items) = _timed(
        lambda: (_dense(model.userFactors, n_users, params.rank), _dense(model.itemFactors, n_items, params.rank)))
    purchased = PairArrays.collect(indexed, n_users)

    _stage("our top-k (driver)")
    out["ours_driver_seconds"], (best, _) = _timed(lambda: top_k(users, items, k))
    out["ours_driver_exclude_seconds"], _ = _timed(
        lambda: top_k(users, items, k, exclude=purchased.rows(np.arange(n_users))))
    out["agreement_with_spark"] = _agreement(spark_rows, best, k)

    _stage("our top-k (mapInPandas)")
    out["ours_spark_engine_noop_seconds"], _ = _timed(
        lambda: recommend_for_all(spark, model.userFactors, items, k).write.format("noop").mode("overwrite").save())

    _stage("scoring core")
    out["scoring_core"] = _scoring_core(items, purchased, params, customers, k, fold_in, gramian, top_k)
    _emit(out)
    spark.stop()


def worker_final(data_path: str) -> None:
    """The final model's quality: a second ALS fit on all data (``batch.final_fit: refit``) against
    folding every customer into the holdout fit (``fold_in``). Run one step back in time so both
    are judged on purchases neither saw: the job's time holdout is the unseen test; inside its
    train part, the newest 20 % of each customer's pairs play the role of the job's holdout."""
    import numpy as np

    from batch_training.data import aggregate, index_ids
    from batch_training.datasets import load_events
    from batch_training.evaluation import evaluation_users, holdout_split, relevant_sets
    from batch_training.holdout import folded_final, indexed_events
    from batch_training.job_settings import als_params_from_config
    from batch_training.metrics import ranking_metrics
    from batch_training.train import PairArrays, fit_als, recommend_users

    _stage("session")
    cfg, spark = _session()
    _stage("read, aggregate, index, split")
    data = {**cfg.get_path("data"), "path": data_path}
    events, _ = load_events(spark, data)
    events = events.cache()
    indexed, maps = index_ids(aggregate(events, str(data.get("count_mode", "rows"))))
    n_users, n_items = maps.n_users, maps.n_items
    train, test = holdout_split(indexed_events(events, maps), method="time", test_fraction=0.2, seed=42)
    train, test = train.cache(), test.cache()
    older, _ = holdout_split(train, method="time", test_fraction=0.2, seed=43)
    older = older.cache()
    params = als_params_from_config(cfg)
    k = int(cfg.get_path("batch.k", 10))
    train_pairs = PairArrays.collect(train, n_users)
    users = evaluation_users(test, True)
    relevant = relevant_sets(test, users, True)

    def quality(factors) -> dict[str, float]:
        recs, _ = recommend_users(factors, users, k, train_pairs)
        metrics = ranking_metrics(recs, relevant.indptr, relevant.indices, k)
        known = np.flatnonzero(np.abs(factors.item_factors).sum(axis=1) > 0).size
        return {**{m: float(metrics[m]) for m in ("precision", "recall", "map", "ndcg")},
                "coverage": float(np.unique(recs[recs >= 0]).size / n_items), "items_with_factors": int(known)}

    out: dict[str, Any] = {"n_users": n_users, "n_items": n_items, "test_users": int(users.size), "k": k,
                           "params": params.as_dict()}
    _stage("refit: ALS on the whole train part")
    seconds, refit = _timed(lambda: fit_als(train, params, n_users, n_items))
    out["refit"] = {"seconds": seconds, **quality(refit)}
    _stage("fold_in: ALS on the older part, every customer folded in")
    fit_seconds, older_fit = _timed(lambda: fit_als(older, params, n_users, n_items))
    buyers = np.bincount(train_pairs.indices, minlength=n_items)  # the model's popularity: distinct buyers
    fold_seconds, folded = _timed(lambda: folded_final(older_fit, train_pairs, buyers))
    out["fold_in"] = {"seconds": fold_seconds, "older_fit_seconds": fit_seconds, **quality(folded)}
    _emit(out)
    spark.stop()


def _agreement(spark_rows, best, k: int) -> dict[str, float]:
    """Share of customers whose top-k set equals Spark's, and the mean overlap (ties may reorder)."""
    same, overlap = 0, 0.0
    for user, recs in zip(spark_rows["user"].to_numpy(), spark_rows["recommendations"]):
        theirs = {int(r["item"]) for r in recs}
        ours = {int(i) for i in best[user] if i >= 0}
        same += theirs == ours
        overlap += len(theirs & ours) / max(len(theirs), 1)
    n = max(len(spark_rows), 1)
    return {"customers": int(len(spark_rows)), "identical_sets": same / n, "mean_overlap": overlap / n, "k": k}


def _scoring_core(items, purchased, params, customers: int, k: int, fold_in, gramian, top_k) -> dict[str, Any]:
    """Fold-in + top-k (purchases excluded) for ``customers`` customers, as one batch and one by one."""
    import numpy as np

    rng = np.random.default_rng(7)
    n_users = len(purchased.indptr) - 1
    chosen = np.sort(rng.choice(n_users, size=min(customers, n_users), replace=False))
    indptr, indices = purchased.rows(chosen)
    starts = purchased.indptr[chosen]
    counts = np.concatenate([purchased.counts[s:e] for s, e in zip(starts, purchased.indptr[chosen + 1])])
    from models.scaling import als_ratings

    values = als_ratings(params.as_dict(), indptr, indices, counts,
                         np.bincount(purchased.indices, minlength=items.shape[0]))
    gram_seconds, gram = _timed(lambda: gramian(items))

    def batch() -> None:
        vectors = fold_in(items, indptr, indices, values, params.reg_param, params.alpha, True, gram)
        top_k(vectors, items, k, exclude=(indptr, indices))

    batch()   # warm-up
    runs = [_timed(batch)[0] for _ in range(3)]
    fold_only = [_timed(lambda: fold_in(items, indptr, indices, values, params.reg_param, params.alpha,
                                        True, gram))[0] for _ in range(3)]
    single_n = min(200, len(chosen))
    singles = []
    for row in range(single_n):
        lo, hi = indptr[row], indptr[row + 1]
        one = (np.array([0, hi - lo]), indices[lo:hi], values[lo:hi])

        def single(one=one) -> None:
            vector = fold_in(items, one[0], one[1], one[2], params.reg_param, params.alpha, True, gram)
            top_k(vector, items, k, exclude=(one[0], one[1]))
        singles.append(_timed(single)[0])
    n = len(chosen)
    return {"customers": n, "n_items": int(items.shape[0]), "rank": int(items.shape[1]),
            "mean_purchases": float(np.diff(indptr).mean()), "gram_ms": gram_seconds * 1e3,
            "batch_us_per_customer_best": min(runs) / n * 1e6,
            "batch_us_per_customer_median": float(np.median(runs)) / n * 1e6,
            "fold_in_us_per_customer_best": min(fold_only) / n * 1e6,
            "single_us_p50": float(np.percentile(singles, 50)) * 1e6,
            "single_us_p95": float(np.percentile(singles, 95)) * 1e6, "single_n": single_n}


def worker_core(n_items: int, rank: int, customers: int) -> None:
    """The scoring core alone on synthetic factors (no Spark): random item factors of the
    generated catalogue's size and baskets of the generated data's mean size (85 products)."""
    import numpy as np

    from batch_training.job_settings import als_params_from_config
    from batch_training.train import PairArrays
    from models.config import load_config
    from models.scoring import fold_in, gramian, top_k

    params = als_params_from_config(load_config())
    rng = np.random.default_rng(42)
    items = (rng.standard_normal((n_items, rank)) * 0.05).astype(np.float32)
    sizes = np.maximum(1, rng.lognormal(np.log(50), 1.0, customers).astype(np.int64))
    indptr = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.concatenate([np.sort(rng.choice(n_items, size=min(s, n_items), replace=False)) for s in sizes])
    purchased = PairArrays(indptr, indices.astype(np.int32), rng.integers(1, 4, indices.size).astype(np.float32))
    _emit(_scoring_core(items, purchased, params, customers, 10, fold_in, gramian, top_k))


def worker_original(data_path: str, out_dir: str) -> None:
    """The replaced job: explicit ALS on counts, 5-fold RMSE CV over two regParams, recommendForAllUsers."""
    from pyspark.ml.evaluation import RegressionEvaluator

    from batch_training.job_settings import als_params_from_config
    from batch_training.train import with_ratings

    _stage("session")
    cfg, spark = _session()
    params = als_params_from_config(cfg)
    _stage("read and clean")
    from batch_training.data import aggregate, index_ids
    from batch_training.datasets import load_events

    data = {**cfg.get_path("data"), "path": data_path}
    events, report = load_events(spark, data)
    events = events.cache()
    events.count()
    _stage("aggregate")
    indexed, maps = index_ids(aggregate(events, "rows"))
    ratings = with_ratings(indexed.select("user", "item", "count"), replace(params, scaling="none"),
                           maps.n_items).cache()
    ratings.count()
    _stage(f"cross-validation ({ORIGINAL_FOLDS} folds x {len(ORIGINAL_REG_PARAMS)} regParam)")
    folds = ratings.randomSplit([1.0] * ORIGINAL_FOLDS, seed=params.seed)
    evaluator = RegressionEvaluator(metricName="rmse", labelCol="rating", predictionCol="prediction")
    cv: dict[float, list[float]] = {reg: [] for reg in ORIGINAL_REG_PARAMS}
    for held_out, test in enumerate(folds):
        train = None
        for index, fold in enumerate(folds):
            if index != held_out:
                train = fold if train is None else train.union(fold)
        train = train.cache()
        for reg in ORIGINAL_REG_PARAMS:
            fitted = _als(params, implicit=False, reg_param=reg).fit(train)
            cv[reg].append(evaluator.evaluate(fitted.transform(test)))
        train.unpersist()
    mean_rmse = {reg: sum(values) / len(values) for reg, values in cv.items()}
    chosen = min(mean_rmse, key=mean_rmse.get)
    _stage("final fit")
    final_seconds, model = _timed(lambda: _als(params, implicit=False, reg_param=chosen).fit(ratings))
    model.userFactors.count()
    _stage("top-10 for all (recommendForAllUsers)")
    recs = model.recommendForAllUsers(int(cfg.get_path("batch.k", 10))).toPandas()
    _stage("write")
    customers = maps.customers.toPandas().set_index("user")["customer_id"]
    products = maps.products.toPandas().set_index("item")["product_id"]
    recs["customer_id"] = customers.reindex(recs["user"]).to_numpy()
    recs["recommendations"] = [" ".join(str(products[r["item"]]) for r in row) for row in recs["recommendations"]]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    recs[["customer_id", "recommendations"]].to_csv(Path(out_dir) / "recommendations.csv", index=False)
    _emit({"cv_rmse": {str(k): v for k, v in mean_rmse.items()}, "chosen_reg_param": chosen,
           "rank": params.rank, "max_iter": params.max_iter, "customers": int(len(recs)),
           "final_fit_seconds": final_seconds, "clean_rows": report.clean_rows})
    spark.stop()


# ------------------------------------------------------------------------------ orchestration

def machine_facts() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:")))
    os_name = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.platform())
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    import numpy
    import pyspark
    return {"nproc": os.cpu_count(), "memory_gib": round(mem_kib / 1024 ** 2, 1), "cpu": cpu, "os": os_name,
            "kernel": platform.release(), "java": java[0] if java else "unknown", "python": platform.python_version(),
            "pyspark": pyspark.__version__, "numpy": numpy.__version__}


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _summary(run_dir: Path) -> dict[str, Any]:
    found = sorted(run_dir.glob("output/versions/*/run_summary.json"))
    return json.loads(found[-1].read_text()) if found else {}


def _env(run_dir: Path) -> dict[str, str]:
    """Each part: its own run dir; this checkout's code first (also in Spark's python workers)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "RECO__RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


JOB_SETTINGS: list[str] = []   # --job-set values, passed to every python -m batch_training run


def _job(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "batch_training", *args, *(a for s in JOB_SETTINGS for a in ("--set", s))]


def _worker(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "worker", *args]


def orchestrate(opts: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the chosen parts one after the other; ``save`` gets the results after each part."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-batch_"))
    data_dir = Path(opts.data_dir).resolve() if opts.data_dir else scratch / f"data_f{opts.factor:g}"
    data = data_dir / "transactions.csv"
    PLACEHOLDERS.update({str(data_dir): "<generated>", str(scratch): "<scratch>", str(REPO): "<repo>",
                         sys.executable: "python"})
    if opts.datasets_dir:
        PLACEHOLDERS[str(Path(opts.datasets_dir).resolve())] = "<datasets>"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "batch_training.generate", "--out", str(data_dir),
                        "--factor", str(opts.factor), "--seed", "42"], cwd=REPO, check=True)
    results: dict[str, Any] = {"factor": opts.factor, "machine": machine_facts(), "job_settings": JOB_SETTINGS,
                               "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                               "load_start": load_average(), "parts": {}}
    parts = [p for p in PARTS if p in opts.parts]

    def record(name: str, command: list[str], run_dir: Path, **extra: Any) -> PartRun:
        load_before = load_average()
        print(f"--- {name}: {' '.join(_shown(c) for c in command)}", flush=True)
        part = run_part(command, _env(run_dir))
        entry = {**asdict(part), "load_before": load_before, "load_after": load_average(), **extra}
        entry["summary"] = _summary(run_dir)
        results["parts"][name] = entry
        print(f"    exit {part.exit_code}, {part.wall_seconds:.1f} s, peak {part.peak_rss_mib:.0f} MiB", flush=True)
        if part.exit_code not in (0, 3):
            print("\n".join(part.log_tail), flush=True)
        results["load_end"] = load_average()
        results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        save(results)
        return part

    def scratch_dir(name: str) -> Path:
        path = scratch / f"bench-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    if "ours" in parts:
        record("ours", _job(["--no-cv", "--input", str(data)]), scratch_dir("ours"))
    if "final" in parts:
        record("ours_fold_in", _job(["--no-cv", "--input", str(data), "--set", "batch.final_fit=fold_in"]),
               scratch_dir("ours_fold_in"))
        record("final", _worker("final", str(data)), scratch_dir("final"))
    if "topk" in parts:
        record("topk", _worker("topk", str(data), str(opts.customers)), scratch_dir("topk"))
    if "blas" in parts:
        record("blas_native", _worker("blas", str(data), "native"), scratch_dir("blas_native"))
        record("blas_java", _worker("blas", str(data), "java"), scratch_dir("blas_java"))
    chosen_reg = ORIGINAL_REG_PARAMS[-1]
    if "original" in parts:
        original_dir = scratch_dir("original")
        part = record("original", _worker("original", str(data), str(original_dir / "output")), original_dir)
        chosen_reg = part.result.get("chosen_reg_param", chosen_reg)
    if "quality" in parts:
        record("original_quality", _job(["--mode", "explicit", "--no-cv", "--no-publish", "--input", str(data),
                                         "--set", f"batch.als.reg_param={chosen_reg}"]),
               scratch_dir("original_quality"))
    if "grid" in parts:
        record("grid", _job(["--input", str(data)]), scratch_dir("grid"))
    if "datasets" in parts and opts.datasets_dir:
        for dataset in opts.dataset_names.split(","):
            for split in ("random", "time"):
                name = f"{dataset}_{split}"
                common = ["--dataset", dataset, "--datasets-dir", opts.datasets_dir, "--no-publish",
                          "--set", f"batch.holdout.method={split}"]
                record(f"{name}_ours", _job(common), scratch_dir(f"{name}_ours"))
                record(f"{name}_original",
                       _job([*common, "--mode", "explicit",
                             "--set", f"batch.grid={{reg_param: {list(ORIGINAL_REG_PARAMS)}}}",
                             "--set", f"batch.cv_folds={ORIGINAL_FOLDS}"]),
                       scratch_dir(f"{name}_original"))
    results["load_end"] = load_average()
    results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return results


# ------------------------------------------------------------------------------ report

def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _f(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "-"


def stage_table(part: dict[str, Any]) -> list[str]:
    job_seconds = (part.get("summary") or {}).get("stage_seconds") or {}
    observed = part["stage_seconds_observed"]
    rows = [[name, _f(job_seconds.get(name, observed.get(name))), _f(part["stage_peak_rss_mib"].get(name), 0)]
            for name in observed]
    rows.append(["**whole process (wall)**", f"**{_f(part['wall_seconds'])}**", f"**{_f(part['peak_rss_mib'], 0)}**"])
    return _table(["stage", "seconds", "peak RSS of process tree (MiB)"], rows)


def quality_table(rows: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    names = ["precision", "recall", "map", "ndcg", "coverage"]
    body = []
    for label, metrics in rows:
        if metrics:
            body.append([label, *(_f(metrics.get(n), 4) for n in names)])
    return _table(["model", "precision@10", "recall@10", "MAP@10", "nDCG@10", "coverage"], body)


def _metrics(part: dict[str, Any] | None, table: str, who: str) -> dict[str, Any] | None:
    return (((part or {}).get("summary") or {}).get("metrics") or {}).get(table, {}).get(who)


def _impl(result: dict[str, Any]) -> str:
    names = result.get("implementation") or {}
    return " + ".join(str(v).rsplit(".", 1)[-1] for v in names.values()) or "-"


def report(results: dict[str, Any]) -> str:
    parts = results["parts"]
    lines = [f"### Batch, factor {results['factor']:g} ({results['started_utc']} to {results['finished_utc']} UTC)", "",
             f"Load average (1/5/15 min) at start {results['load_start']}, at end {results['load_end']}.", ""]
    for name, title in (("ours", "Our job, no CV (raw file to published model)"),
                        ("ours_fold_in", "Our job, no CV, final model by fold-in (one ALS fit)"),
                        ("original", "Original approach (explicit ALS, 5-fold CV x 2 regParam, recommendForAllUsers)"),
                        ("grid", "Our job at its default grid (k-fold CV, raced)")):
        if name in parts:
            part = parts[name]
            lines += [f"#### {title}", "", f"`{' '.join(part['command'])}` (exit {part['exit_code']}; "
                      f"load {part['load_before']} -> {part['load_after']})", "", *stage_table(part)]
            if name == "original" and part["result"]:
                lines += [f"CV mean RMSE per regParam: {part['result']['cv_rmse']}, chosen "
                          f"{part['result']['chosen_reg_param']}.", ""]
    if "final" in parts and parts["final"]["result"]:
        r = parts["final"]["result"]
        rows = [[name, _f(r[name]["seconds"]), *(f"{r[name][m]:.4f}" for m in ("precision", "recall", "map", "ndcg",
                                                                                 "coverage")),
                 f"{r[name]['items_with_factors']:,}"] for name in ("refit", "fold_in")]
        lines += ["#### Final model: refit vs fold-in, judged on purchases neither saw", "",
                  f"{r['test_users']:,} customers with held-out new products; {r['n_items']:,} products; "
                  f"fold-in's ALS fit on the older part took {_f(r['fold_in']['older_fit_seconds'])} s.", "",
                  *_table(["final model", "seconds", "precision@10", "recall@10", "MAP@10", "nDCG@10", "coverage",
                           "products with factors"], rows),
                  f"fold-in / refit MAP@10: {r['fold_in']['map'] / r['refit']['map']:.3f}.", ""]
    if "topk" in parts and parts["topk"]["result"]:
        r = parts["topk"]["result"]
        spark_s, ours_s = r["spark_recommend_noop_seconds"], r["ours_driver_seconds"]
        lines += ["#### Top-10 for all on the same factors", "",
                  f"{r['n_users']:,} customers x {r['n_items']:,} products, rank {r['rank']}; "
                  f"BLAS in the JVM: {_impl({'implementation': r['blas']})}.", "",
                  *_table(["engine", "seconds", "vs recommendForAllUsers"], [
                      ["Spark `recommendForAllUsers` (noop sink)", _f(spark_s, 2), "1.0x"],
                      ["Spark `recommendForAllUsers` + collect", _f(r["spark_recommend_collect_seconds"], 2), "-"],
                      ["factor export to driver (ours, once)", _f(r["export_seconds"], 2), "-"],
                      ["ours, numpy on driver (`top_k`)", _f(ours_s, 2), f"{spark_s / ours_s:.1f}x faster"],
                      ["ours, numpy on driver, purchases excluded", _f(r["ours_driver_exclude_seconds"], 2),
                       f"{spark_s / r['ours_driver_exclude_seconds']:.1f}x faster"],
                      ["ours, mapInPandas engine (noop sink)", _f(r["ours_spark_engine_noop_seconds"], 2),
                       f"{spark_s / r['ours_spark_engine_noop_seconds']:.1f}x faster"]]),
                  f"Agreement with Spark: identical top-10 sets for {r['agreement_with_spark']['identical_sets']:.1%}"
                  f" of customers, mean overlap {r['agreement_with_spark']['mean_overlap']:.1%}.", ""]
        s = r["scoring_core"]
        lines += ["#### Scoring core (the streaming job's arithmetic)", "",
                  f"Fold-in + top-10 (purchases excluded) for {s['customers']:,} customers "
                  f"(mean {s['mean_purchases']:.1f} purchased products) against {s['n_items']:,} products at rank "
                  f"{s['rank']}; Gramian once per model {s['gram_ms']:.1f} ms.", "",
                  *_table(["measure", "microseconds per customer"], [
                      [f"batch of {s['customers']:,}, best of 3", _f(s["batch_us_per_customer_best"], 0)],
                      [f"batch of {s['customers']:,}, median of 3", _f(s["batch_us_per_customer_median"], 0)],
                      ["of which fold-in (best of 3)", _f(s["fold_in_us_per_customer_best"], 0)],
                      [f"one customer at a time, p50 ({s['single_n']} calls)", _f(s["single_us_p50"], 0)],
                      ["one customer at a time, p95", _f(s["single_us_p95"], 0)]])]
    if "blas_native" in parts and "blas_java" in parts:
        native, java = parts["blas_native"]["result"], parts["blas_java"]["result"]
        if native and java:
            lines += ["#### ALS fit: native vs Java BLAS (same data and parameters, one JVM each)", "",
                      *_table(["BLAS", "implementation loaded", "ALS fit seconds"], [
                          ["native (libblas.so.3)", _impl(native), _f(native["fit_seconds"])],
                          ["Java (forced)", _impl(java), _f(java["fit_seconds"])]]),
                      f"Java / native fit time: {java['fit_seconds'] / native['fit_seconds']:.2f}.", ""]
    quality_sets = [("generated data", "ours", "original_quality")] + [
        (name.replace("_", " ").title(), f"{name}_ours", f"{name}_original")
        for name in sorted({key.rsplit("_", 1)[0] for key in parts if key.endswith("_ours")} - {"ours"})]
    for title, ours_key, original_key in quality_sets:
        if ours_key not in parts:
            continue
        for table, note in (("exclude_purchased", "purchased products excluded (the job's main table)"),
                            ("include_purchased", "purchased products allowed (as recommendForAllUsers does)")):
            lines += [f"#### Quality on {title}: {note}", "",
                      *quality_table([("original (explicit ALS)", _metrics(parts.get(original_key), table, "model")),
                                      ("ours (the selected model)", _metrics(parts[ours_key], table, "model")),
                                      ("popularity", _metrics(parts[ours_key], table, "popularity"))])]
        ours_map = _metrics(parts[ours_key], "exclude_purchased", "model")
        pop_map = _metrics(parts[ours_key], "exclude_purchased", "popularity")
        if ours_map and pop_map and pop_map.get("map"):
            lines += [f"MAP@10 ours / popularity: {ours_map['map'] / pop_map['map']:.1f}x.", ""]
    selection = [(key[:-len("_ours")], parts[key]) for key in parts
                 if key.endswith("_ours") and key not in ("ours",) and (parts[key].get("summary") or {}).get("metrics")]
    if selection:
        lines += ["#### The published model against popularity, item-kNN and ALS (nDCG@10 / MAP@10, "
                  "purchased products excluded)", "",
                  *_table(["data, split", "published", "published", "popularity", "item-kNN",
                           "ALS (CV's parameters)", "ALS (configured parameters)"],
                          [_selection_row(name, part) for name, part in selection])]
    return "\n".join(lines)


def _selection_row(name: str, part: dict[str, Any]) -> list[str]:
    metrics = part["summary"]["metrics"]
    table = metrics["exclude_purchased"]

    def pair(row: str) -> str:
        values = table.get(row)
        return f"{values['ndcg']:.4f} / {values['map']:.4f}" if values else "-"
    selected = metrics.get("selection", {}).get("selected", "?")
    return [name.replace("_", " "), selected, pair("model"), pair("popularity"), pair("item_knn"), pair("als"),
            pair("plain_als") if "plain_als" in table else pair("als") + " (same)"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        from models.logging_setup import setup_logging
        setup_logging("WARNING")
        name, rest = argv[1], argv[2:]
        if name == "blas":
            worker_blas(rest[0], rest[1] == "java")
        elif name == "topk":
            worker_topk(rest[0], int(rest[1]))
        elif name == "final":
            worker_final(rest[0])
        elif name == "core":
            worker_core(int(rest[0]), int(rest[1]), int(rest[2]))
        elif name == "original":
            worker_original(rest[0], rest[1])
        else:
            raise SystemExit(f"unknown worker {name!r}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=float, default=1.0, help="generated data size (1 = the original's)")
    parser.add_argument("--data-dir", help="folder with (or to receive) the generated transactions.csv")
    parser.add_argument("--datasets-dir", help="the public datasets folder (online_retail/, groceries/)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--customers", type=int, default=1000, help="customers in the scoring-core measurement")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON and markdown")
    parser.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a --set passed to every python -m batch_training run "
                             "(e.g. batch.scorers.candidates=[als])")
    parser.add_argument("--dataset-names", default="online_retail,groceries",
                        help="the public datasets of the datasets part (config/datasets presets)")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    opts = parser.parse_args(argv)
    JOB_SETTINGS.extend(opts.job_set)
    opts.parts = [p.strip() for p in opts.parts.split(",") if p.strip()]
    unknown = set(opts.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}: choose from {', '.join(PARTS)}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"batch_f{opts.factor:g}" + ("" if set(opts.parts) == set(PARTS) else "_" + "-".join(opts.parts)) \
        + (f"_{opts.tag}" if opts.tag else "")

    def save(results: dict[str, Any]) -> None:
        (out / f"{stem}.json").write_text(_shown(json.dumps(results, indent=2, default=str)))
        (out / f"{stem}.md").write_text(_shown(report(results)) + "\n")

    results = orchestrate(opts, save)
    save(results)
    print(_shown(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
