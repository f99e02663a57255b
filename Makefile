# The two README commands (`make demo`, `make test`) and a few helpers. Each runs the set-up first.
.PHONY: setup demo test services-up services-down services-status

setup:
	@scripts/setup.sh

demo: setup
	@.venv/bin/python -m tools.demo

test: setup
	@scripts/test.sh

services-up: setup
	@.venv/bin/python -m infra start

services-down:
	@.venv/bin/python -m infra stop

services-status:
	@.venv/bin/python -m infra status
