# The two README commands (`make demo`, `make test`) and a few helpers. Each runs the set-up first.
.PHONY: setup demo test lint services-up services-down services-status lock

setup:
	@scripts/setup.sh

demo: setup
	@.venv/bin/python -m tools.demo

# The suite runs after the lint, so CI (which runs make test) fails on either.
test: setup lint
	@scripts/test.sh

# ruff with the settings in pyproject.toml: pyflakes, pycodestyle, import order, bugbear, pyupgrade.
lint: setup
	@.venv/bin/ruff check .

services-up: setup
	@.venv/bin/python -m infra start

services-down:
	@.venv/bin/python -m infra stop

services-status:
	@.venv/bin/python -m infra status

# requirements-lock.txt: every Python dependency (the runtime ones, the dev and local extras, and
# setuptools, which builds the project itself) at an exact version with its hashes, for Python 3.11
# on linux x86_64 (the image's). scripts/setup.sh and docker/Dockerfile install from it. Regenerate
# it after changing the dependencies in pyproject.toml; it keeps every pin the new ranges allow
# (`make lock LOCK_ARGS=--upgrade` moves everything to the newest). uv runs from .cache/lock-tools.
LOCK_PYTHON ?= python3
lock:
	@[ -x .cache/lock-tools/bin/uv ] || { $(LOCK_PYTHON) -m venv .cache/lock-tools && .cache/lock-tools/bin/python -m pip install -q uv==0.13.9; }
	@.cache/lock-tools/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" \
	  | .cache/lock-tools/bin/uv pip compile -q pyproject.toml - --extra dev --extra local --generate-hashes \
	      --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --custom-compile-command "make lock" \
	      -o requirements-lock.txt $(LOCK_ARGS)
	@echo "requirements-lock.txt: $$(grep -c '^[A-Za-z]' requirements-lock.txt) packages pinned with hashes"
