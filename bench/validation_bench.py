"""The event validator's cost per event, now against another revision's, side by side in one process.

    .venv/bin/python bench/validation_bench.py --against c95d848 [--events 50000] [--rounds 6]

Loads ``streaming/events.py`` as it is in the working tree and as it was at ``--against`` (read
with ``git show``), validates the same valid events with each, alternating, and prints the minimum
and median microseconds per event of each (the minimum is the least disturbed by a shared machine).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_revision(revision: str, folder: Path):
    """``streaming/events.py`` at ``revision`` as a module of its own name."""
    source = subprocess.run(["git", "show", f"{revision}:streaming/events.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = folder / f"events_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module          # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def events(n: int) -> list[bytes]:
    return [json.dumps({"event_id": f"e-{i}", "customer_id": f"C{i % 5000:06d}", "product_id": f"P{i % 900:06d}",
                        "quantity": 1 + i % 3, "event_time": "2026-11-30T10:21:07.250Z"}).encode() for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="a git revision to compare with")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    from streaming import events as current

    with tempfile.TemporaryDirectory() as folder:
        modules = {"working tree": current, args.against: load_revision(args.against, Path(folder))}
        values, reference_ms = events(args.events), 1_800_000_000_000
        timings: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, module in modules.items():
                started = time.perf_counter()
                module.validate_values(values, module.ValidationRules(), reference_ms)
                timings[name].append((time.perf_counter() - started) / len(values) * 1e6)
    for name, values_us in timings.items():
        print(f"{name:>14}: min {min(values_us):.2f} us, median {statistics.median(values_us):.2f} us per event "
              f"({args.rounds} rounds of {args.events:,} events)")


if __name__ == "__main__":
    main()
