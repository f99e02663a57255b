#!/usr/bin/env bash
# Set-up for a fresh machine, and a quick no-op when nothing changed. Installs:
#   - OpenJDK 17 and Maven from the system packages when missing (needs root and apt-get),
#   - Debian's OpenBLAS as the native libblas.so.3 Spark ALS uses (skip with RECO_NATIVE_BLAS=0),
#   - Chromium for the tests (headless, opens the training report) when missing (needs root and apt-get),
#   - the Python dependencies into .venv/: the exact versions, hash-checked, of requirements-lock.txt
#     (pyproject.toml's dependencies with the extras dev and local; `make lock` remakes it), then the
#     project itself (editable, no dependencies, built by the locked setuptools),
#   - the JVM jars pinned in jvm/pom.xml into .cache/jars/ (Kafka connector for Spark, Kafka broker).
# Re-runs only the steps whose inputs changed (stamps under .cache/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMPS=.cache/stamps
mkdir -p "$STAMPS"

say() { printf '[setup] %s\n' "$*"; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing system packages: $*; install them (needs root and apt-get) and re-run"; exit 1
  fi
  if [ $apt_updated = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. System: Java 17+ and Maven.
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1 || true)
if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then say "installing OpenJDK 17"; apt_install openjdk-17-jdk-headless; fi
command -v mvn >/dev/null || { say "installing Maven"; apt_install maven; }

# 2. Native BLAS for Spark ALS (it falls back to a slower Java BLAS without libblas.so.3).
if [ "${RECO_NATIVE_BLAS:-1}" = 1 ] && ! ldconfig -p | grep -q 'libblas.so.3 '; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing OpenBLAS (native libblas.so.3 for Spark ALS)"; apt_install libopenblas0-pthread
  else
    say "no native libblas.so.3: Spark ALS will use its Java BLAS (slower); install libopenblas0 to speed it up"
  fi
fi

# docker-compose validates docker-compose.yml in the tests (there may be no Docker engine at all).
if ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing docker-compose (to validate docker-compose.yml)"; apt_install docker-compose
  fi
fi

# Chromium (headless) opens the batch job's report.html in the tests.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing chromium (to check the training report renders)"; apt_install chromium
  fi
fi

# 3. Python dependencies, from the lock file (re-installed when it, pyproject.toml or Python changes).
PY=${RECO_PYTHON:-python3}
LOCK=requirements-lock.txt
# The lock is made for Python 3.11 (the image's); several locked versions need 3.11 or newer.
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "Python 3.11+ required ($PY is older)"; exit 1; }
py_version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
py_key=$( (cat "$LOCK" pyproject.toml; "$PY" --version) | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || ! stamp_ok python "$py_key"; then
  say "installing the locked Python dependencies ($LOCK) into .venv/"
  [ "$py_version" = 3.11 ] || say "note: $LOCK is made for Python 3.11 and $PY is $py_version; if a locked version" \
    "does not install on it, run with RECO_PYTHON=python3.11 (and delete .venv/)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --require-hashes -r "$LOCK"
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$py_key" > "$STAMPS/python"
fi

# 4. JVM jars.
jar_key=$(sha256sum jvm/pom.xml | cut -c1-16)
if ! stamp_ok jars "$jar_key" || [ -z "$(ls .cache/jars/spark/*.jar 2>/dev/null)" ]; then
  say "copying JVM jars from Maven Central into .cache/jars/"
  rm -rf .cache/jars
  mvn -q -B -f jvm/pom.xml generate-resources
  echo "$jar_key" > "$STAMPS/jars"
fi
say "ready: $(.venv/bin/python -c 'import pyspark; print("pyspark", pyspark.__version__)'), $(ls .cache/jars/spark | wc -l) connector jars, $(ls .cache/jars/kafka | wc -l) broker jars"
