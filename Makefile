# m3-memory: the commands the README promises.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-all demo bench

setup:          ## venv + torch + ROS 2 wheels + interfaces + m3 packages
	./scripts/setup.sh

test:           ## the test suite CI runs (no slow end-to-end runs)
	$(PY) -m pytest

test-all:       ## everything, slow end-to-end runs included
	$(PY) -m pytest -m "slow or not slow"

demo:           ## scan -> train -> locate on the demo bag through the ROS 2 nodes; DEMO_ARGS=--json for one JSON line
	$(VENV)/bin/m3 demo $(DEMO_ARGS)

bench:          ## benchmark scripts; tables printed, results under bench/results/
	for script in bench/bench_*.py; do $(PY) $$script || exit 1; done
