# `make test` and `make bench` each set up everything they need on a fresh machine: a virtualenv in .venv,
# the pinned requirements, and a build of the extension (CUDA sources too wherever nvcc and a CUDA build of
# torch are present; FUSED_LSTM_SKIP_CUDA=1 skips them for a faster local loop, and CI never sets it).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
REQUIREMENTS_STAMP := $(VENV)/.requirements-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench build clean

$(PYTHON):
	python3 -m venv $(VENV)

$(REQUIREMENTS_STAMP): requirements.txt | $(PYTHON)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

# Editable and without build isolation, so the extension is compiled against the venv's torch. pip rebuilds
# from scratch, so it runs only when a source changed or the CUDA choice did (the stamp names the choice).
SOURCES := $(shell find csrc fused_lstm -name '*.h' -o -name '*.cpp' -o -name '*.cu') setup.py pyproject.toml
BUILD_STAMP := $(VENV)/.built-cuda-$(if $(filter-out 0,$(FUSED_LSTM_SKIP_CUDA)),skipped,auto)

$(BUILD_STAMP): $(REQUIREMENTS_STAMP) $(SOURCES)
	$(PYTHON) -m pip install --quiet --no-build-isolation --no-deps --editable .
	rm -f $(VENV)/.built-cuda-*
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: build
	$(PYTHON) benchmarks/compare.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fused_lstm/*.so
