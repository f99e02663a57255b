#!/usr/bin/env bash
# The bench-only environment for bench/library_bench.py: the `implicit` library in .cache/bench-venv,
# which sees the product's .venv (Spark, numpy, the job's code) through a .pth file, so the library
# never enters the product's locked dependencies. Idempotent; prints the interpreter to use.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh >&2
bench_env=.cache/bench-venv
if ! "$bench_env/bin/python" -c "import implicit" 2>/dev/null; then
  base=$(.venv/bin/python -c "import sys; print(sys.base_prefix)")
  "$base/bin/python3" -m venv "$bench_env"
  product_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  bench_site=$("$bench_env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$product_site" > "$bench_site/product-venv.pth"
  "$bench_env/bin/python" -m pip install -q --no-deps --only-binary :all: --require-hashes \
    -r bench/requirements-library.txt >&2
fi
echo "$bench_env/bin/python"
