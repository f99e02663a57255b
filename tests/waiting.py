"""Waiting in tests on a condition, never on a count within a time (a loaded machine is slow)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest


def wait_for(condition, timeout_s: float, what: str, process=None, log_path: Path | None = None,
             fail: bool = True, poll_s: float = 1.0):
    """Poll ``condition`` until it is truthy and return its value. A ``process`` that exits
    meanwhile fails the test with its log's tail; so does the timeout (or False, ``fail=False``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the job exited ({process.returncode}) while waiting for {what}:\n{_tail(log_path)}")
        time.sleep(poll_s)
    if fail:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}:\n{_tail(log_path)}")
    return False


def _tail(log_path: Path | None) -> str:
    return Path(log_path).read_text()[-3000:] if log_path else ""
