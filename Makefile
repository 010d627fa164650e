# hvdtrain: `make demo` and `make test` are the whole quick start (see README.md).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test-deps.sh
	$(PY) -m pytest -q --durations=20 tests

clean:
	rm -rf runs .pytest_cache
