#!/usr/bin/env bash
# The whole test suite: unit, integration (real broker, DynamoDB endpoint, Spark) and end-to-end.
# The test session starts and stops its own services on test ports (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
