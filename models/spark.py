"""The SparkSession both jobs use, built from the configuration.

Under ``spark-submit`` the session it finds already carries the cluster's settings (master,
memory); this only adds what the product needs (the connector jars, the worker Python, the
checkpoint folder) and never second-guesses what the submitter set.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from models.config import Config, ConfigError

log = logging.getLogger(__name__)


def connector_jars(cfg: Config) -> list[Path]:
    """The Kafka connector jars copied by the set-up step; a clear error when they are missing."""
    jars_dir = cfg.path("spark.jars_dir")
    jars = sorted(jars_dir.glob("*.jar"))
    if not jars:
        raise ConfigError(f"no Kafka connector jars in {jars_dir}: run scripts/setup.sh first "
                          "(or set RECO__SPARK__JARS_DIR to the folder holding them)")
    return jars


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_blas() -> None:
    """One BLAS thread for the processes started from here on (an explicit setting wins).

    Spark's tasks are the parallelism: OpenBLAS' own threads, one set per concurrent call, fight
    them for the cores and spin. Spark sets OMP_NUM_THREADS for the executors it launches on a
    cluster, but a local master's executor is the driver JVM, started from this process. Measured
    there: a rank-128 ALS fit at factor 1 took 539 s with OpenBLAS' default threads, 120 s with one
    (half the CPU time was spent in the kernel). Call it before numpy is imported where the Python
    side should be single-threaded too (numpy reads these once, when it loads OpenBLAS).
    """
    for name in BLAS_THREAD_VARIABLES:
        os.environ.setdefault(name, "1")


def build_spark(cfg: Config, app_name: str, need_kafka: bool = True):
    """Get or create the SparkSession for ``app_name`` as configured."""
    from pyspark.sql import SparkSession

    # Python workers must run the interpreter that has the project's packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    single_threaded_blas()      # before the JVM starts: in local mode it runs the ALS solves
    builder = SparkSession.builder.appName(app_name)
    if not _launched_by_spark_submit():
        builder = (builder.master(str(cfg.get_path("spark.master")))
                   .config("spark.driver.memory", str(cfg.get_path("spark.driver_memory"))))
    if need_kafka:
        builder = builder.config("spark.jars", ",".join(str(j) for j in connector_jars(cfg)))
    builder = (builder
               .config("spark.sql.shuffle.partitions", str(cfg.get_path("spark.shuffle_partitions")))
               .config("spark.ui.enabled", str(cfg.get_path("spark.ui_enabled", False)).lower())
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    for key, value in (cfg.get_path("spark.extra_conf", {}) or {}).items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(str(cfg.get_path("spark.log_level", "WARN")))
    checkpoint_dir = (str(cfg.path("spark.checkpoint_dir")) if cfg.get_path("spark.checkpoint_dir", None)
                      else str(cfg.path("run_dir") / "spark-checkpoints"))
    spark.sparkContext.setCheckpointDir(str(checkpoint_dir))
    log.info("Spark %s session %r on %s", spark.version, app_name, spark.sparkContext.master)
    return spark


def _launched_by_spark_submit() -> bool:
    """spark-submit starts the driver with these set; then its --master/--conf take precedence."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ \
        or os.environ.get("SPARK_ENV_LOADED") == "1"
