# `make test` and `make bench` each set up everything they need on a fresh machine: a virtualenv in .venv,
# the pinned requirements, and a build of the extension (CUDA sources too wherever nvcc and a CUDA build of
# torch are present; FUSED_LSTM_SKIP_CUDA=1 skips them for a faster local loop, and CI never sets it).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
REQUIREMENTS_STAMP := $(VENV)/.requirements-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench build clean sanitize gpu-check

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

# The op tests under AddressSanitizer and UndefinedBehaviorSanitizer, on a CPU-only build of a copy of the
# sources in $(SANITIZE_DIR), so the normal build is left alone. Python is not instrumented, so libasan must be
# loaded before it (LD_PRELOAD), and libstdc++ with it: Python does not link libstdc++, and ASan's __cxa_throw
# interceptor, finding no real __cxa_throw at start-up, aborts at the first C++ exception.
# detect_leaks=0: CPython and torch keep interned objects and caches alive until exit on purpose, which
# LeakSanitizer would report as leaks of ours (memory growth is tested in test_reliability.py instead).
# allocator_may_return_null=1: the fuzz asks for impossible allocations on purpose and expects the op's
# exception, not ASan's abort. Not part of `make test`: about 8 minutes on 2 cores with its build.
SANITIZE_DIR := build-sanitize
SANITIZE_TESTS ?= tests/test_layer_op.py tests/test_bidirectional_op.py tests/test_inference_op.py tests/test_op_errors.py \
	tests/test_fuzz.py
SANITIZE_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
# python -P: without it `-m` puts the working directory first on sys.path, and the tests would import the
# normal build in ./fused_lstm instead of the sanitized one (the first command checks which one loads).
SANITIZE_ENV = LD_PRELOAD="$(SANITIZE_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONPATH=$(abspath $(SANITIZE_DIR)):$(abspath tests)

sanitize: $(REQUIREMENTS_STAMP)
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	cp -r csrc fused_lstm setup.py pyproject.toml $(SANITIZE_DIR)/ && rm -f $(SANITIZE_DIR)/fused_lstm/*.so
	cd $(SANITIZE_DIR) && FUSED_LSTM_SANITIZE=1 FUSED_LSTM_SKIP_CUDA=1 $(abspath $(PYTHON)) setup.py --quiet build_ext --inplace
	$(SANITIZE_ENV) $(PYTHON) -P -c "import fused_lstm._C as c; assert '/$(SANITIZE_DIR)/' in c.__file__, c.__file__"
	$(SANITIZE_ENV) $(PYTHON) -P -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(SANITIZE_TESTS)

# The GPU check (benchmarks/gpu_check.sh): on a GPU machine with no network, builds in place for sm_90 against
# GPU_CHECK_PYTHON's own torch (no venv, no pip), runs the CUDA tests and the benchmarks, and writes everything
# to GPU_CHECK_OUT. Each step has a timeout: 8 minutes at most.
GPU_CHECK_OUT ?= gpu-check-results
GPU_CHECK_PYTHON ?= python3

gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf build *.egg-info fused_lstm/*.so $(SANITIZE_DIR)
