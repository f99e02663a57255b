"""Scale benchmark (issue 15): the batch job without CV at several data sizes, memory by process role.

For each factor (``--factors 1,4,10``) the generated data (``python -m batch_training.generate
--factor F --seed 42``) is made once into ``<data-root>/f<F>/`` (only when missing), then
``python -m batch_training --no-cv --input <data> --set batch.topk_engine=<engine>`` runs in its
own process, with its own run dir, model store and output dir (a temporary folder, deleted after;
the job's log and run_summary.json are kept in the results folder), so no run sees another's models.

``--master local``: the job as it is, on ``spark.master`` (local[2]): one JVM holds the driver and
the executors. ``--master cluster``: on the local standalone cluster (``python -m infra start
spark``: two workers, one executor JVM each), through the spark-submit command ``python -m infra
pack batch`` prints; the cluster is started when it is not running, and stopped after only if this
script started it.

A sampler thread reads /proc every 0.2 s and sums the resident memory (RSS) of the run's processes
by role:

* ``driver-python``   the job's own Python process;
* ``driver-jvm``      the driver JVM (``SparkSubmit``); in local mode it is also the executor;
* ``executor-jvm``    the executor JVMs (``CoarseGrainedExecutorBackend``; cluster mode only: the
                      workers start them, they are not descendants of the job and are found by
                      command line and worker port);
* ``python-workers``  the pyspark daemons and their forked workers (their RSS counts the pages a
                      fork still shares with its daemon once per process);
* ``other``           anything else in the tree (spark-submit's launcher, shells).

It keeps, per role, the peak of each stage (stages from the job's log lines
`` batch_training: == <stage>``; ``start-up`` before the first, ``after the job's stages`` from the
last stage's end to the process's exit) and of the whole run, plus the composites ``driver``
(python + JVM) and ``executors`` (executor JVMs + python workers; local mode: the python workers,
the JVM being the driver's), each the peak of the per-sample sum. Throughput per stage = customers
(run_summary.json ``stats.customers``) / the stage's seconds (the job's own, from run_summary.json).

Usage:
    python bench/scale_bench.py --factors 1,4,10 --data-root DIR [--engine spark|driver|auto]
        [--master local|cluster] [--out bench/results] [--tag NAME] [--job-set KEY=VALUE ...]

Results: ``<out>/scale_<master>_<tag>.json`` and ``.md`` (rewritten after every run), and
``<out>/scale_<master>_<tag>/f<F>.log``, ``f<F>_run_summary.json``, ``f<F>_memory.csv`` (the
roles' RSS per second) and, in cluster mode, ``f<F>_executor-<id>.log``. Paths in them are shown
by role (``<repo>``, ``<data-root>``, ``<scratch>``, ...). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_bench import JOB_STAGE, machine_facts  # noqa: E402  (the sibling benchmark)

ROLES = ("driver-python", "driver-jvm", "executor-jvm", "python-workers", "other")
COMPOSITES = ("driver", "executors", "total")
SPAWNING = "spawning"     # a JVM's child before its exec: not counted
STAGE_TOOK = re.compile(r" batch_training: +(.+) took [\d.]+ s$")
CUSTOMERS_LINE = re.compile(r" batch_training: [\d,]+ customer-product pairs, ([\d,]+) customers, ")
START_UP, AFTER = "start-up", "after the job's stages"
MIB = 2 ** 20
ONE_JVM_NOTE = ("local mode: one JVM holds the driver and the executors, so executor-jvm is the driver JVM "
                "(counted under driver-jvm); executors = the python workers")


# ------------------------------------------------------------------------------ processes by role

def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Proc:
    pid: int
    ppid: int
    rss: int
    argv: tuple[str, ...]
    start: str = ""      # start time (clock ticks since boot): a pid with another start time is another process


class ProcTable:
    """One /proc snapshot (pid, parent, RSS); command lines read once per process (pid + start time)."""

    def __init__(self) -> None:
        self._argv: dict[tuple[int, str, str], tuple[str, ...]] = {}
        self.page = os.sysconf("SC_PAGE_SIZE")

    def snapshot(self) -> dict[int, Proc]:
        procs: dict[int, Proc] = {}
        seen: set[tuple[int, str, str]] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{entry}/stat") as f:
                    comm, rest = f.read().split("(", 1)[1].rsplit(")", 1)
            except (OSError, ValueError):
                continue
            fields = rest.split()
            # An exec keeps the pid and the start time but changes the name (spark-submit's bash
            # becomes the JVM): the command line is read again then.
            key = (pid, fields[19], comm)                             # fields[19]: start time
            seen.add(key)
            argv = self._argv.get(key)
            if argv is None:
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
                except OSError:
                    argv = ()
                if argv:            # an exec may still be under way when it is empty: read again next time
                    self._argv[key] = argv
            procs[pid] = Proc(pid, int(fields[1]), int(fields[21]) * self.page, argv, fields[19])   # [21]: rss pages
        for key in set(self._argv) - seen:
            del self._argv[key]
        return procs


def _kind(argv: tuple[str, ...]) -> str:
    name = os.path.basename(argv[0]) if argv else ""
    return "java" if name == "java" else "python" if name.startswith("python") else "other"


def role_of(argv: tuple[str, ...], parent_role: str | None, is_root: bool) -> str:
    """The role of one process, from its command line and its parent's role."""
    kind, line = _kind(argv), " ".join(argv)
    if kind == "java" and "CoarseGrainedExecutorBackend" in line:
        return "executor-jvm"
    if kind == "java" and "org.apache.spark.deploy.SparkSubmit" in line:
        return "driver-jvm"
    if kind == "python" and ("pyspark.daemon" in line or "pyspark.worker" in line):
        return "python-workers"
    if kind == "python" and parent_role in ("executor-jvm", "python-workers"):
        return "python-workers"
    if kind == "python" and (is_root or "batch_training" in line):
        return "driver-python"
    if kind == "python" and parent_role == "driver-jvm":
        return "python-workers"        # a Python runner the driver JVM starts for itself
    return "other"


def classify(procs: dict[int, Proc], root: int, executor_ports: set[int] | None,
             known: dict[int, tuple[str, str]] | None = None) -> dict[int, str]:
    """pid -> role for the job's process tree and, in cluster mode, the executors our workers started
    (``--worker-url spark://Worker@<host>:<port>`` names a port of ours) and their descendants.
    ``known`` (pid -> (start time, role), updated here) keeps a process of the run that left the
    tree, e.g. the JVM still shutting down after the job's Python process exited."""
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    roles: dict[int, str] = {}

    def walk(start: int, parent_role: str | None, is_root: bool) -> None:
        todo = [(start, parent_role, is_root)]
        while todo:
            pid, parent, top = todo.pop()
            if pid in roles or pid not in procs:
                continue
            proc = procs[pid]
            if _kind(proc.argv) == "java" and not top and proc.argv == procs.get(proc.ppid, proc).argv:
                # A JVM starting a process (posix_spawn: a vfork child until it execs) shows the
                # JVM's command line and, sharing its memory, its RSS: not counted.
                roles[pid] = SPAWNING
                continue
            roles[pid] = role = role_of(proc.argv, parent, top)
            todo.extend((child, role, False) for child in children.get(pid, []))

    walk(root, None, True)
    if executor_ports:
        for proc in procs.values():
            if proc.pid not in roles and _kind(proc.argv) == "java" and \
                    "CoarseGrainedExecutorBackend" in " ".join(proc.argv) and _worker_port(proc.argv) in executor_ports:
                walk(proc.pid, None, False)
    if known is None:
        return roles
    for pid, (start, role) in list(known.items()):
        proc = procs.get(pid)
        if proc is None or proc.start != start:
            del known[pid]
        elif pid not in roles:
            roles[pid] = role
            for child in children.get(pid, []):
                walk(child, role, False)
    known.update({pid: (procs[pid].start, role) for pid, role in roles.items() if role != SPAWNING})
    return roles


def _worker_port(argv: tuple[str, ...]) -> int | None:
    for flag, value in zip(argv, argv[1:]):
        if flag == "--worker-url":
            try:
                return int(value.rsplit(":", 1)[1])
            except (IndexError, ValueError):
                return None
    return None


# ------------------------------------------------------------------------------ the sampler

@dataclass
class Sample:
    t: float                       # seconds since the run started
    mib: dict[str, float]          # role and composite -> MiB
    executors: dict[int, float]    # executor JVM pid -> MiB
    counts: dict[str, int]         # role -> processes


class RoleSampler:
    """Samples the run's processes by role every ``interval`` seconds, in a thread."""

    def __init__(self, root: int, started: float, one_jvm: bool, executor_ports: set[int] | None,
                 interval: float = 0.2) -> None:
        self.root, self.started, self.one_jvm, self.ports = root, started, one_jvm, executor_ports
        self.interval = interval
        self.samples: list[Sample] = []
        self.other_commands: set[str] = set()      # program names of the processes counted as other
        self._known: dict[int, tuple[str, str]] = {}
        self._table = ProcTable()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> Sample:
        procs = self._table.snapshot()
        roles = classify(procs, self.root, self.ports, self._known)
        mib = {role: 0.0 for role in ROLES}
        counts = {role: 0 for role in ROLES}
        executors: dict[int, float] = {}
        for pid, role in roles.items():
            if role == SPAWNING:
                continue
            mib[role] += procs[pid].rss / MIB
            counts[role] += 1
            if role == "other":
                self.other_commands.add(os.path.basename(procs[pid].argv[0]) if procs[pid].argv else "?")
            if role == "executor-jvm":
                executors[pid] = procs[pid].rss / MIB
        mib["driver"] = mib["driver-python"] + mib["driver-jvm"]
        mib["executors"] = mib["python-workers"] + (0.0 if self.one_jvm else mib["executor-jvm"])
        mib["total"] = sum(mib[role] for role in ROLES)
        return Sample(time.perf_counter() - self.started, mib, executors, counts)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> RoleSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------ one run

@dataclass
class Timeline:
    """Stage boundaries from the job's log, in seconds since the run started."""

    starts: list[tuple[str, float]] = field(default_factory=lambda: [(START_UP, 0.0)])
    last_took: float | None = None
    customers: int | None = None

    def line(self, text: str, t: float) -> str | None:
        stage = JOB_STAGE.search(text)
        if stage:
            self.starts.append((stage.group(1), t))
            self.last_took = None
            return stage.group(1)
        if STAGE_TOOK.search(text):
            self.last_took = t
        found = CUSTOMERS_LINE.search(text)
        if found:
            self.customers = int(found.group(1).replace(",", ""))
        return None

    def segments(self, end: float) -> list[tuple[str, float, float]]:
        """(stage, start, end); the gap between a stage's end and the next stage's start is the
        ended stage's; after the last stage's end, ``after the job's stages``."""
        out = []
        for (name, start), nxt in zip(self.starts, self.starts[1:] + [(None, None)]):
            out.append((name, start, nxt[1] if nxt[1] is not None else (self.last_took or end)))
        if self.last_took is not None and len(self.starts) > 1:
            out.append((AFTER, self.last_took, end))
        return out


def _peaks(samples: list[Sample], keys: tuple[str, ...]) -> dict[str, float | None]:
    """The largest sample per key; None when no sample fell in (a stage shorter than the interval)."""
    return {key: round(max(s.mib[key] for s in samples), 1) if samples else None for key in keys}


def run_job(command: list[str], env: dict[str, str], cwd: Path, log_path: Path, one_jvm: bool,
            executor_ports: set[int] | None, timeout: float | None) -> dict[str, Any]:
    """Run one job as a child process (its own session); follow its stages; sample its memory."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, start_new_session=True)
    timeline = Timeline()
    tail: list[str] = []
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _stop_group(process)
    timer = threading.Timer(timeout, on_timeout) if timeout else None
    try:
        with RoleSampler(process.pid, started, one_jvm, executor_ports) as sampler, \
                open(log_path, "w") as log:
            if timer:
                timer.start()
            for text in process.stdout:
                log.write(text)
                text = text.rstrip("\n")
                tail = (tail + [text])[-40:]
                stage = timeline.line(text, time.perf_counter() - started)
                if stage:
                    print(f"    {time.perf_counter() - started:7.1f} s  == {stage}", flush=True)
            process.wait()
    except BaseException:
        _stop_group(process)
        raise
    finally:
        if timer:
            timer.cancel()
    wall = time.perf_counter() - started
    samples = sampler.samples
    keys = (*ROLES, *COMPOSITES)
    stages = []
    for name, start, end in timeline.segments(wall):
        inside = [s for s in samples if start <= s.t < end]
        stages.append({"name": name, "seconds_observed": round(end - start, 2), "peak_rss_mib": _peaks(inside, keys)})
    executor_peaks: dict[int, float] = {}
    for s in samples:
        for pid, value in s.executors.items():
            executor_peaks[pid] = max(executor_peaks.get(pid, 0.0), value)
    return {"exit_code": "timeout" if timed_out.is_set() else process.returncode, "wall_seconds": round(wall, 2),
            "stages": stages, "peak_rss_mib": _peaks(samples, keys),
            "executor_jvms_seen": len(executor_peaks),
            "each_executor_jvm_peak_mib": [round(v, 1) for v in sorted(executor_peaks.values(), reverse=True)],
            "max_processes": {role: max((s.counts[role] for s in samples), default=0) for role in ROLES},
            "other_commands": sorted(sampler.other_commands),
            "samples": len(samples), "customers_logged": timeline.customers,
            "log_tail": tail, "_samples": samples, "_segments": timeline.segments(wall)}


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the run's own process group (it has its own session), SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def memory_csv(samples: list[Sample], segments: list[tuple[str, float, float]]) -> str:
    """The roles' RSS per second (the largest sample of each second), with the stage."""
    keys = (*ROLES, *COMPOSITES)
    by_second: dict[int, dict[str, float]] = {}
    for s in samples:
        row = by_second.setdefault(int(s.t), {})
        for key in keys:
            row[key] = max(row.get(key, 0.0), s.mib[key])

    def stage_at(t: float) -> str:
        return next((name for name, start, end in reversed(segments) if start <= t), START_UP)
    lines = ["second,stage," + ",".join(f"{k}_mib" for k in keys)]
    for second in sorted(by_second):
        row = by_second[second]
        lines.append(f"{second},\"{stage_at(second)}\"," + ",".join(f"{row[k]:.0f}" for k in keys))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ data and cluster

def factor_name(factor: float) -> str:
    return f"f{factor:g}"


def data_name(factor: float, catalogue_factor: float | None) -> str:
    """f<F> (the catalogue grows with the customers) or f<F>c<C> (a catalogue of its own size)."""
    return factor_name(factor) + ("" if catalogue_factor is None else f"c{catalogue_factor:g}")


def ensure_data(root: Path, factor: float, catalogue_factor: float | None = None) -> dict[str, Any]:
    """<root>/<data_name>/transactions.csv, generated (into a partial folder, then renamed) when missing."""
    folder = root / data_name(factor, catalogue_factor)
    data = folder / "transactions.csv"
    info: dict[str, Any] = {"generated_now": False, "catalogue_factor": catalogue_factor or factor}
    if not data.exists():
        partial = root / f"{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"--- generating factor {factor:g} into {folder}", flush=True)
        started = time.perf_counter()
        catalogue = [] if catalogue_factor is None else ["--catalogue-factor", f"{catalogue_factor:g}"]
        subprocess.run([sys.executable, "-m", "batch_training.generate", "--out", str(partial),
                        "--factor", f"{factor:g}", "--seed", "42", *catalogue], cwd=REPO, check=True)
        partial.rename(folder)
        info.update(generated_now=True, generate_seconds=round(time.perf_counter() - started, 1))
    info.update(path=str(data), bytes=data.stat().st_size)
    return info


class Cluster:
    """The local standalone cluster of the configured run dir: started if needed, stopped after only
    if we started it; the batch pack and its spark-submit command."""

    def __init__(self, driver_memory: str | None, executor_memory: str | None) -> None:
        from infra.services import SparkStandalone
        from models.config import load_config

        self.cfg = load_config()
        self.standalone = SparkStandalone(self.cfg)
        self.started_master = False
        self.started_workers: list[Any] = []
        self.driver_memory = driver_memory or str(self.cfg.get_path("spark.driver_memory"))
        self.executor_memory = executor_memory or str(self.cfg.get_path("spark.local_cluster.worker_memory"))
        self.packed = None
        self.facts: dict[str, Any] = {}

    def start(self) -> None:
        from infra.pack import pack

        running = [w for w in self.standalone.workers if w.pid() is not None]
        self.started_master = self.standalone.proc.pid() is None
        started = time.perf_counter()
        self.standalone.start(timeout=120)
        self.started_workers = [w for w in self.standalone.workers if w not in running]
        self.facts = {"workers": len(self.standalone.workers),
                      "worker_cores": self.cfg.get_path("spark.local_cluster.worker_cores"),
                      "worker_memory": str(self.cfg.get_path("spark.local_cluster.worker_memory")),
                      "driver_memory": self.driver_memory, "executor_memory": self.executor_memory,
                      "started_by_bench": self.started_master or bool(self.started_workers),
                      "start_seconds": round(time.perf_counter() - started, 1)}
        print(f"--- cluster: {self.facts['workers']} workers "
              f"({'started' if self.facts['started_by_bench'] else 'already running'})", flush=True)
        self.packed = pack(self.cfg, "batch")
        self.facts.update(pack_seconds=round(self.packed.seconds, 1), environment_reused=self.packed.reused)

    def stop(self) -> None:
        if self.started_master:
            self.standalone.stop()
            print("--- cluster stopped (this script started it)", flush=True)
        else:
            for worker in self.started_workers:
                worker.stop()

    @property
    def worker_ports(self) -> set[int]:
        return {w.port for w in self.standalone.workers}

    def work_dirs(self) -> list[Path]:
        return [self.standalone.work_dir(w) for w in self.standalone.workers]

    def apps(self) -> set[Path]:
        return {app for work in self.work_dirs() if work.exists() for app in work.iterdir() if app.is_dir()}

    def command(self, job_args: list[str]):
        from infra.pack import submit_command

        return submit_command(self.cfg, self.packed, self.standalone.master_url,
                              options=["--driver-memory", self.driver_memory,
                                       "--executor-memory", self.executor_memory],
                              job_args=job_args)


# ------------------------------------------------------------------------------ orchestration

PLACEHOLDERS: dict[str, str] = {}    # machine-specific text -> <role>
MACHINE_NAMES: list[tuple[re.Pattern, str]] = []   # this machine's host name and addresses, as whole words


def machine_names() -> list[tuple[re.Pattern, str]]:
    """The host name and the non-loopback addresses, which Spark's logs name ("Your hostname, ...",
    "process name: <pid>@<host>")."""
    names = [(socket.gethostname(), "<host>")]
    addresses: set[str] = set()
    try:
        addresses.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:
        addresses.update(subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split())
    except (OSError, subprocess.SubprocessError):
        pass
    names += [(a, "<address>") for a in sorted(addresses) if not a.startswith("127.") and a not in ("::1", "0.0.0.0")]
    return [(re.compile(rf"(?<![\w./:-]){re.escape(value)}(?![\w-]|\.\w)"), role) for value, role in names if value]


def shown(text: str) -> str:
    """Machine-specific paths by role, the host name and addresses replaced."""
    for value, role in sorted(PLACEHOLDERS.items(), key=lambda item: -len(item[0])):
        text = text.replace(value, role)
    for pattern, role in MACHINE_NAMES:
        text = pattern.sub(role, text)
    return text


SPARK_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (\w+) ")
PYTHON_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")


def executor_log(text: str) -> str:
    """An executor's stderr without its INFO lines (thousands per run: one per task and block) and
    without its launch command (the class path); WARN and ERROR lines, stack traces and what the
    project's Python code logs are kept."""
    kept, level, dropped = [], "", 0
    for line in text.splitlines():
        spark, python = SPARK_LINE.match(line), PYTHON_LINE.match(line)
        if spark or python:
            level = (spark or python).group(1)
        if line.startswith("Spark Executor Command:") or (level == "INFO" and not python):
            dropped += 1
            continue
        kept.append(line)
    return "\n".join([f"[scale_bench: {dropped:,} INFO lines and the launch command left out]", *kept]) + "\n"


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    untracked = [line[3:] for line in git("status", "--porcelain").splitlines() if line.startswith("??")]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": changed, "untracked": untracked}


def job_env(scratch_run: Path, local: bool) -> dict[str, str]:
    """Each run: its own run dir, model store and output dir; other RECO__ settings of the caller kept."""
    env = {**os.environ, "RECO__RUN_DIR": str(scratch_run), "RECO__MODEL_STORE__URI": str(scratch_run / "models"),
           "RECO__BATCH__OUTPUT_DIR": str(scratch_run / "output"), "PYTHONUNBUFFERED": "1"}
    if local:   # this checkout's code first, also in Spark's python workers
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_factor(opts: argparse.Namespace, factor: float, cluster: Cluster | None, files: Path) -> dict[str, Any]:
    data = ensure_data(opts.data_root, factor, opts.catalogue_factor)
    scratch = Path(tempfile.mkdtemp(prefix=f"scale-{factor_name(factor)}-"))
    PLACEHOLDERS[str(scratch)] = "<scratch>"
    job_args = ["--no-cv", "--input", data["path"], "--set", f"batch.topk_engine={opts.engine}",
                *(a for s in opts.job_set for a in ("--set", s))]
    try:
        run_dir = scratch / "run"
        run_dir.mkdir()
        env = job_env(run_dir, cluster is None)
        if cluster is None:
            command, cwd, ports = [sys.executable, "-m", "batch_training", *job_args], REPO, None
        else:
            submit = cluster.command(job_args)
            command, cwd, ports = submit.argv, submit.cwd, cluster.worker_ports
            env.update(submit.env)
            apps_before = cluster.apps()
        log_path = scratch / "job.log"
        load_start, started_utc = load_average(), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        print(f"--- factor {factor:g}: {shown(' '.join(command))}  (load {load_start[0]:.2f})", flush=True)
        result = run_job(command, env, cwd, log_path, cluster is None, ports,
                         opts.timeout_minutes * 60 if opts.timeout_minutes else None)
        load_end = load_average()
        samples, segments = result.pop("_samples"), result.pop("_segments")
        stem = factor_name(factor)
        (files / f"{stem}.log").write_text(shown(log_path.read_text(errors="replace")))
        (files / f"{stem}_memory.csv").write_text(memory_csv(samples, segments))
        summaries = sorted(run_dir.glob("output/versions/*/run_summary.json"))
        summary = json.loads(summaries[-1].read_text()) if summaries else {}
        if summaries:
            (files / f"{stem}_run_summary.json").write_text(shown(summaries[-1].read_text()))
        if cluster is not None:
            executor_logs = []
            for app in sorted(cluster.apps() - apps_before):
                for stderr in sorted(app.glob("*/stderr")):
                    name = f"{stem}_executor-{stderr.parent.name}.log"
                    (files / name).write_text(shown(executor_log(stderr.read_text(errors="replace"))))
                    executor_logs.append(name)
                shutil.rmtree(app, ignore_errors=True)     # the app's unpacked environment, per executor
            result["executor_logs"] = executor_logs
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if cluster is None:     # no executor JVM of its own: the driver JVM runs the tasks
        for peaks in [result["peak_rss_mib"], *(stage["peak_rss_mib"] for stage in result["stages"])]:
            peaks["executor-jvm"] = None
    customers = (summary.get("stats") or {}).get("customers") or result["customers_logged"]
    job_seconds = summary.get("stage_seconds") or {}
    for stage in result["stages"]:
        seconds = job_seconds.get(stage["name"])
        stage["seconds"] = round(seconds if seconds is not None else stage["seconds_observed"], 2)
        stage["seconds_from"] = "job" if seconds is not None else "observed"
        stage["customers_per_second"] = (round(customers / stage["seconds"], 1)
                                         if customers and stage["name"] not in (START_UP, AFTER)
                                         and stage["seconds"] > 0 else None)
    ok = result["exit_code"] in (0, 3)
    print(f"    exit {result['exit_code']}, {result['wall_seconds']:.1f} s, driver peak "
          f"{result['peak_rss_mib']['driver']:.0f} MiB, executors peak {result['peak_rss_mib']['executors']:.0f} MiB",
          flush=True)
    if not ok:
        print("\n".join(shown(line) for line in result["log_tail"]), flush=True)
    stats = summary.get("stats") or {}
    return {"factor": factor, "data": {**data, "path": shown(data["path"]), "raw_rows": stats.get("raw_rows"),
                                       "pairs": stats.get("pairs"), "products": stats.get("products")},
            "command": [shown(c) if c != sys.executable else "python" for c in command],
            "started_utc": started_utc, "load_start": load_start, "load_end": load_end, "customers": customers,
            "per_customer_work": summary.get("per_customer_work"), "model_type": summary.get("model_type"),
            **{k: v for k, v in result.items() if k != "log_tail" or not ok}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest factor's peaks over the smallest's, for the driver's roles (the issue: within 1.5x)."""
    done = [r for r in runs if r["exit_code"] in (0, 3)]
    if len(done) < 2:
        return {}
    small, large = min(done, key=lambda r: r["factor"]), max(done, key=lambda r: r["factor"])
    ratios = {}
    for key in ("driver-python", "driver-jvm", "driver", "executors", "total"):
        a, b = small["peak_rss_mib"][key], large["peak_rss_mib"][key]
        ratios[key] = round(b / a, 2) if a else None
    return {"from_factor": small["factor"], "to_factor": large["factor"], "peak_ratios": ratios,
            "driver_flat_within_1_5x": {k: (ratios[k] is not None and ratios[k] <= 1.5)
                                        for k in ("driver-python", "driver-jvm", "driver")}}


# ------------------------------------------------------------------------------ report

def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _f(value: Any, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "-"


def report(results: dict[str, Any]) -> str:
    local = results["master"] == "local"
    m = results["machine"]
    where = (f"local mode ({results['spark_master']})" if local else
             "the local standalone cluster ({workers} workers x {worker_cores} core, worker memory {worker_memory}; "
             "--driver-memory {driver_memory}, --executor-memory {executor_memory})".format(**results["cluster"]))
    lines = [f"### Batch job at scale, {where}, engine `{results['engine']}`", "",
             f"{results['started_utc']} to {results.get('finished_utc', '...')} UTC; commit "
             f"{results['git']['commit'][:12]}"
             + (f" with uncommitted changes to {len(results['git']['uncommitted_changes'])} files"
                f" (+{len(results['git']['untracked'])} untracked)" if results["git"]["uncommitted_changes"] else "")
             + f"; {m['nproc']} cores, {m['memory_gib']} GiB, {m['cpu']}; {m['java']}; pyspark {m['pyspark']}.", "",
             f"Job settings: `--no-cv --set batch.topk_engine={results['engine']}`"
             + "".join(f" `--set {s}`" for s in results["job_settings"]) + ". Peak RSS in MiB, sampled every 0.2 s."
             + (f" Note: {ONE_JVM_NOTE}." if local else
                " executor-jvm: both executor JVMs together; python-workers: the executors' pyspark daemons and "
                "workers (and any the driver JVM starts)."), ""]
    for run in results["runs"]:
        peaks = run["peak_rss_mib"]
        executor_jvm = (lambda p: "= driver JVM") if local else (lambda p: _f(p["executor-jvm"]))
        rows = [[s["name"], _f(s["seconds"], 1), _f(s["customers_per_second"]) if s["seconds"] >= 0.1 else "-",
                 _f(s["peak_rss_mib"]["driver-python"]),
                 _f(s["peak_rss_mib"]["driver-jvm"]), executor_jvm(s["peak_rss_mib"]),
                 _f(s["peak_rss_mib"]["python-workers"])] for s in run["stages"]]
        rows.append(["**whole run (wall)**", f"**{_f(run['wall_seconds'], 1)}**", "",
                     f"**{_f(peaks['driver-python'])}**",
                     f"**{_f(peaks['driver-jvm'])}**", "= driver JVM" if local else f"**{_f(peaks['executor-jvm'])}**",
                     f"**{_f(peaks['python-workers'])}**"])
        data = run["data"]
        lines += [f"#### Factor {run['factor']:g}: {_f(run['customers'])} customers, {_f(data.get('raw_rows'))} rows "
                  f"({data['bytes'] / MIB:,.0f} MiB), {_f(data.get('products'))} products", "",
                  f"Exit {run['exit_code']}; per-customer work on the {run.get('per_customer_work') or '?'}; "
                  f"load average {run['load_start']} at start, {run['load_end']} at end"
                  + ("" if local else f"; executor JVMs seen: {run['executor_jvms_seen']} "
                     f"(each at most {', '.join(_f(v) for v in run['each_executor_jvm_peak_mib'])} MiB)") + ".", "",
                  *_table(["stage", "seconds", "customers/s", "driver-python", "driver-jvm", "executor-jvm",
                           "python-workers"], rows),
                  f"Peaks over the run: driver (python + JVM) {_f(peaks['driver'])} MiB, executors "
                  f"{_f(peaks['executors'])} MiB, every process of the run {_f(peaks['total'])} MiB.", ""]
        if run["exit_code"] not in (0, 3) and run.get("log_tail"):
            lines += ["Last lines of the log:", "", "```", *run["log_tail"][-12:], "```", ""]
    rows = [[f"{r['factor']:g}", _f(r["customers"]), r["exit_code"], _f(r["wall_seconds"], 1),
             _f(r["peak_rss_mib"]["driver-python"]), _f(r["peak_rss_mib"]["driver-jvm"]),
             _f(r["peak_rss_mib"]["driver"]), "= driver JVM" if local else _f(r["peak_rss_mib"]["executor-jvm"]),
             _f(r["peak_rss_mib"]["python-workers"]), _f(r["peak_rss_mib"]["executors"]),
             f"{r['load_start'][0]:.2f} / {r['load_end'][0]:.2f}"] for r in results["runs"]]
    lines += ["#### Across factors", "",
              *_table(["factor", "customers", "exit", "wall s", "driver-python", "driver-jvm", "driver",
                       "executor-jvm", "python-workers", "executors", "load 1 min start / end"], rows)]
    summary = results.get("summary") or {}
    if summary:
        r = summary["peak_ratios"]
        lines += [f"Peak ratios, factor {summary['to_factor']:g} over factor {summary['from_factor']:g}: "
                  + ", ".join(f"{k} {_f(v, 2)}x" for k, v in r.items())
                  + ". Driver within 1.5x: "
                  + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in summary["driver_flat_within_1_5x"].items())
                  + ("" if not local else " (local mode: the driver JVM also runs the executors' tasks)") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", default="1,4,10", help="comma-separated generated data sizes (1 = 1.2M rows)")
    parser.add_argument("--catalogue-factor", type=float, default=None,
                        help="a catalogue of this size at every factor (1 = 100 k products; default: it grows "
                             "with the factor), data in DIR/f<factor>c<this>/")
    parser.add_argument("--data-root", required=True, type=lambda p: Path(p).resolve(),
                        help="generated data goes to DIR/f<factor>/ (generated only when missing)")
    parser.add_argument("--engine", choices=["spark", "driver", "auto"], default="spark",
                        help="batch.topk_engine: spark (the executor path), driver, or auto")
    parser.add_argument("--master", choices=["local", "cluster"], default="local",
                        help="local: spark.master (local[2]); cluster: the local standalone cluster via spark-submit")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the results")
    parser.add_argument("--tag", default="", help="suffix of the result names (default: the engine)")
    parser.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a --set passed to every job run (repeatable)")
    parser.add_argument("--driver-memory", help="cluster: spark-submit --driver-memory (default: a --job-set "
                                                "spark.driver_memory, else the config's spark.driver_memory)")
    parser.add_argument("--executor-memory", help="cluster: spark-submit --executor-memory "
                                                  "(default: spark.local_cluster.worker_memory)")
    parser.add_argument("--timeout-minutes", type=float, default=0, help="stop a run after this long (0: never)")
    opts = parser.parse_args(argv)
    factors = [float(f) for f in opts.factors.split(",") if f.strip()]
    tag = opts.tag or opts.engine
    out = Path(opts.out).resolve()
    files = out / f"scale_{opts.master}_{tag}"
    files.mkdir(parents=True, exist_ok=True)
    PLACEHOLDERS.update({str(opts.data_root): "<data-root>", str(REPO): "<repo>", sys.executable: "python",
                         str(Path.home()): "<home>"})
    MACHINE_NAMES.extend(machine_names())

    from models.config import load_config
    cfg = load_config()
    driver_memory = opts.driver_memory or next(
        (s.split("=", 1)[1] for s in reversed(opts.job_set) if s.split("=", 1)[0].strip() == "spark.driver_memory"),
        None)
    results: dict[str, Any] = {
        "benchmark": "scale", "master": opts.master, "engine": opts.engine, "tag": tag, "factors": factors,
        "one_jvm": opts.master == "local",
        "spark_master": str(cfg.get_path("spark.master")) if opts.master == "local" else "local standalone cluster",
        "job_settings": opts.job_set, "machine": machine_facts(), "git": git_facts(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_start": load_average(),
        "roles": {"driver-python": "the job's own Python process",
                  "driver-jvm": "the SparkSubmit JVM" + (" (also the executor in local mode)" if opts.master == "local"
                                                         else ""),
                  "executor-jvm": ONE_JVM_NOTE if opts.master == "local" else "the executor JVMs together",
                  "python-workers": "pyspark daemons and their workers, summed",
                  "driver": "driver-python + driver-jvm, per sample", "executors": "executor-jvm (cluster) + "
                  "python-workers, per sample", "total": "every process of the run, per sample"},
        "files": f"<out>/{files.name}", "runs": []}
    stem = f"scale_{opts.master}_{tag}"

    def save() -> None:
        results["summary"] = summarize(results["runs"])
        (out / f"{stem}.json").write_text(shown(json.dumps(results, indent=2, default=str)))
        (out / f"{stem}.md").write_text(shown(report(results)) + "\n")

    cluster = Cluster(driver_memory, opts.executor_memory) if opts.master == "cluster" else None
    try:
        if cluster is not None:
            cluster.start()
            results["cluster"] = cluster.facts
        for factor in factors:
            results["runs"].append(run_factor(opts, factor, cluster, files))
            results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            results["load_end"] = load_average()
            save()
    finally:
        if cluster is not None:
            cluster.stop()
    save()
    print(shown(report(results)))
    print(f"\nresults: {out / stem}.json, .md and {files}/", flush=True)
    return 0 if all(r["exit_code"] in (0, 3) for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
