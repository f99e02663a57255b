"""Start, watch and stop one background service process, tracked by a pid file."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Linux /proc; 0 where unreadable)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))      # fields[1]: the parent pid
        rss[int(entry)] = int(fields[21]) * page                         # fields[21]: rss in pages
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total


class ServiceError(RuntimeError):
    """A local service that cannot be started or is not answering."""


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """One service: ``name`` for messages, files under ``home`` (``<name>.pid``, ``<name>.log``)."""

    name: str
    home: Path
    host: str
    port: int

    @property
    def pid_file(self) -> Path:
        return self.home / "service.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "service.log"

    def pid(self) -> int | None:
        """The pid we started, if that process is still alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        if _is_zombie(pid):
            return None
        return pid

    def start(self, command: list[str], ready: Callable[[], bool], timeout: float,
              env: dict[str, str] | None = None) -> bool:
        """Start unless already running; wait until ``ready()``. Returns False if it was running."""
        if self.pid() is not None:
            self.wait_ready(ready, timeout)
            return False
        if port_open(self.host, self.port):
            raise ServiceError(
                f"{self.name}: port {self.port} on {self.host} is already in use by a process this "
                f"script did not start. Stop that process, or choose another port in the config.")
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.home,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        self.wait_ready(ready, timeout)
        return True

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise ServiceError(f"{self.name} exited during start-up; last lines of {self.log_file}:\n"
                                   f"{self.tail()}")
            try:
                if ready():
                    return
            except Exception as err:  # not answering yet
                last_error = err
            time.sleep(0.5)
        raise ServiceError(f"{self.name} did not answer on {self.host}:{self.port} within {timeout:.0f} s "
                           f"(last error: {last_error!r}); see {self.log_file}:\n{self.tail()}")

    def check(self) -> None:
        """Raise a ServiceError naming this service unless its process is alive and its port open."""
        pid = self.pid()
        if pid is None:
            raise ServiceError(f"{self.name} is not running (no live process from {self.pid_file}); "
                               f"start it with `python -m infra start`. Last lines of its log:\n{self.tail()}")
        if not port_open(self.host, self.port):
            raise ServiceError(f"{self.name} (pid {pid}) is not accepting connections on "
                               f"{self.host}:{self.port}; see {self.log_file}")

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM the process we started (and its group), SIGKILL after ``timeout``."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            _signal_group(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log yet)"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    """A killed child we have not reaped still answers kill(0); /proc tells the truth."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return False
