"""python -m infra pack: what spark-submit ships to the executors, and the command that ships it.

Spark's "Python Package Management" way: the Python environment as a venv-pack archive
(``--archives env.tar.gz#environment``, ``spark.pyspark.python=./environment/bin/python``) and the
project's own packages as a zip (``--py-files``). The archive is packed from a clean venv holding
only the project's runtime dependencies, hard-linked from the installed ones (so the executors run
exactly the driver's versions, and no network is needed): the project's own venv cannot be packed
as it is, because its editable install of the project (``pip install -e``) is a finder pointing
at this checkout, which venv-pack 0.2 does not notice and would ship, so executors would import
this folder's files instead of the zip's (and fail on any other machine). The archive is rebuilt
only when its inputs (interpreter, installed versions, exclusions) change.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from infra.process import ServiceError
from infra.services import HOST
from models.config import REPO_ROOT, Config

# The project packages each job's executors import (tests/unit/test_infra.py keeps this true).
JOB_PACKAGES = {"streaming": ("models", "streaming"), "batch": ("models", "streaming", "batch_training")}
JOB_SCRIPTS = {"streaming": "streaming/__main__.py", "batch": "batch_training/__main__.py"}
# Python workers never load Spark's jars (the executor JVM has its own): 450 MB less to gzip,
# ship and unpack per executor.
EXCLUDE = ("lib/python*/site-packages/pyspark/jars/*",)
ENV_ARCHIVE = "reco-env.tar.gz"
LAYOUT_VERSION = "1"        # bump when the way the clean venv is built changes


class PackError(ServiceError):
    """The environment cannot be packed as it is (a missing dependency, no venv-pack)."""


@dataclass(frozen=True)
class Packed:
    """The two archives for one job, and whether the environment one was reused."""

    env_archive: Path
    code_zip: Path
    job: str
    reused: bool
    seconds: float


def dist_dir(cfg: Config) -> Path:
    return cfg.path("run_dir") / "dist"


def project_requirements() -> list[str]:
    """``[project].dependencies`` of pyproject.toml: the checkout's, not the installed metadata's
    (an editable install keeps the list it had when it was installed)."""
    try:
        import tomllib
    except ModuleNotFoundError:      # Python 3.10
        from pip._vendor import tomli as tomllib
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def runtime_distributions(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``requirements`` need, transitively (markers evaluated for this
    interpreter, extras followed), sorted by name."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise PackError(f"{req.name} (needed by the project) is not installed in {sys.prefix}: "
                            "run scripts/setup.sh") from None
        first = name not in found
        found[name] = dist
        for wanted in ([""] if first else []) + sorted(req.extras):
            todo.extend((Requirement(r), wanted) for r in dist.requires or [])
    return [found[n] for n in sorted(found)]


def environment_key(dists: list[metadata.Distribution]) -> str:
    """Changes when anything packed would: the interpreter, a distribution (its RECORD lists every
    file with its hash), venv-pack, the exclusions or this module's layout."""
    digest = hashlib.sha256()
    parts = [LAYOUT_VERSION, sys.version, sys.base_prefix, metadata.version("venv-pack"), *EXCLUDE]
    for dist in dists:
        parts += [dist.metadata["Name"], dist.version, dist.read_text("RECORD") or ""]
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def build_clean_venv(dists: list[metadata.Distribution], target: Path) -> int:
    """A venv on this interpreter holding exactly ``dists``' files under site-packages (hard links
    where the file system allows, copies elsewhere). Returns the number of files."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = next(target.glob("lib/python*/site-packages"))
    count = 0
    for dist in dists:
        root = Path(dist.locate_file("")).resolve()
        for file in dist.files or []:
            source = Path(dist.locate_file(file)).resolve()
            if not source.is_file() or not source.is_relative_to(root):   # scripts in bin/: not needed
                continue
            dest = site / source.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
            count += 1
    return count


def pack_environment(cfg: Config, force: bool = False) -> tuple[Path, bool]:
    """``{run_dir}/dist/reco-env.tar.gz``, packed again only when its key changed (or ``force``)."""
    try:
        import venv_pack
    except ModuleNotFoundError:
        raise PackError("venv-pack is not installed: run scripts/setup.sh (it installs the dev extras)") from None
    out = dist_dir(cfg)
    archive, key_file = out / ENV_ARCHIVE, out / (ENV_ARCHIVE + ".key")
    dists = runtime_distributions(project_requirements())
    key = environment_key(dists)
    if not force and archive.is_file() and key_file.is_file() and key_file.read_text().strip() == key:
        return archive, True
    out.mkdir(parents=True, exist_ok=True)
    clean = out / "env"
    build_clean_venv(dists, clean)
    partial = out / (ENV_ARCHIVE + ".partial")
    venv_pack.pack(prefix=str(clean), output=str(partial), format="tar.gz", force=True, verbose=False,
                   filters=[("exclude", pattern) for pattern in EXCLUDE])
    partial.replace(archive)
    key_file.write_text(key + "\n")
    shutil.rmtree(clean, ignore_errors=True)
    return archive, False


def zip_packages(packages: tuple[str, ...], out: Path) -> Path:
    """The project's ``packages`` (sources and data files, no caches) in one zip for --py-files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in packages:
            for path in sorted((REPO_ROOT / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    zf.write(path, path.relative_to(REPO_ROOT).as_posix())
    partial.replace(out)
    return out


def pack(cfg: Config, job: str = "streaming", force: bool = False) -> Packed:
    started = time.monotonic()
    env_archive, reused = pack_environment(cfg, force)
    code_zip = zip_packages(JOB_PACKAGES[job], dist_dir(cfg) / f"reco-{job}.zip")
    link_driver_environment(dist_dir(cfg))
    return Packed(env_archive, code_zip, job, reused, time.monotonic() - started)


def link_driver_environment(folder: Path) -> Path:
    """``folder/environment`` -> this venv. spark.pyspark.python (``./environment/bin/python``) is
    also what the driver's JVM starts for the Python work it does itself (transformWithState
    plans its state schema with a Python runner on the driver), relative to spark-submit's working
    directory: spark-submit runs in ``folder``, where that path is the driver's own venv."""
    link = folder / "environment"
    if link.is_symlink() and os.readlink(link) == sys.prefix:
        return link
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(sys.prefix, target_is_directory=True)
    return link


@dataclass(frozen=True)
class Submit:
    """How to run spark-submit: in ``cwd`` (see link_driver_environment), with ``env`` added."""

    cwd: Path
    env: dict[str, str]
    argv: list[str]

    def shell_line(self) -> str:
        return " ".join([f"cd {shlex.quote(str(self.cwd))} &&",
                         *(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv)])


def submit_command(cfg: Config, packed: Packed, master_url: str, options: list[str] | None = None,
                   job_args: list[str] | None = None) -> Submit:
    """spark-submit with the packed environment, the project zip and the Kafka connector jars.
    The driver runs this venv's Python (client mode; PYSPARK_DRIVER_PYTHON lets spark-submit find
    its Spark, the conf wins over spark.pyspark.python, which would otherwise apply to the driver
    process too). SPARK_LOCAL_IP keeps the driver on the loopback address like the local cluster."""
    from models.spark import connector_jars

    python = str(Path(os.path.abspath(sys.executable)))       # not resolve(): the venv's python is a symlink
    argv = [str(Path(python).with_name("spark-submit")), "--master", master_url,
            "--archives", f"{packed.env_archive}#environment",
            "--py-files", str(packed.code_zip),
            "--jars", ",".join(str(j) for j in connector_jars(cfg)),
            "--conf", "spark.pyspark.python=./environment/bin/python",
            "--conf", f"spark.pyspark.driver.python={python}",
            # As the driver does for itself (streaming/__main__.py): OpenBLAS threads fight the tasks.
            "--conf", "spark.executorEnv.OPENBLAS_NUM_THREADS=1",
            *(options or []), str(REPO_ROOT / JOB_SCRIPTS[packed.job]), *(job_args or [])]
    return Submit(packed.env_archive.parent, {"PYSPARK_DRIVER_PYTHON": python, "SPARK_LOCAL_IP": HOST}, argv)


def describe(cfg: Config, packed: Packed, master_url: str) -> str:
    size = lambda p: f"{p.stat().st_size / 2 ** 20:.0f} MiB"  # noqa: E731
    return "\n".join([
        f"environment: {packed.env_archive} ({size(packed.env_archive)}, "
        f"{'unchanged, reused' if packed.reused else 'packed'})",
        f"project code: {packed.code_zip} ({', '.join(JOB_PACKAGES[packed.job])})",
        f"packed in {packed.seconds:.1f} s; run the job on the local cluster with:",
        "  " + submit_command(cfg, packed, master_url).shell_line()])
