# `make test` and `make bench` each set up everything they need on a fresh machine: a virtualenv in .venv,
# the pinned requirements, and a build of the extension (CUDA sources too wherever nvcc and a CUDA build of
# torch are present; FUSED_LSTM_SKIP_CUDA=1 skips them for a faster local loop, and CI never sets it).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
REQUIREMENTS_STAMP := $(VENV)/.requirements-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test test-cpus bench build clean sanitize gpu-check

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

# `make test TORCH=2.15.0`: the suite against another release of torch, in a virtualenv of its own
# (.venv-torch2.15.0) and on a CPU build of a copy of the sources (build-torch2.15.0/), so that the main .venv
# and build are left alone. PIP_CONSTRAINT=/dev/null sets aside a machine-wide pip constraint on torch, if any:
# the release asked for is the one wanted. setuptools is left to that release (2.11 wants setuptools<82).
# (Only a TORCH given on make's command line, not one in the environment.)
ifneq ($(origin TORCH),command line)
test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS)
else
TORCH_VENV := .venv-torch$(TORCH)
TORCH_DIR := build-torch$(TORCH)
TORCH_PYTHON := $(TORCH_VENV)/bin/python

test:
	test -x $(TORCH_PYTHON) || python3 -m venv $(TORCH_VENV)
	sed -e 's/^torch==.*/torch==$(TORCH)/' -e 's/^setuptools==.*/setuptools/' requirements.txt \
		> $(TORCH_VENV)/requirements.txt
	PIP_CONSTRAINT=/dev/null $(TORCH_PYTHON) -m pip install --quiet -r $(TORCH_VENV)/requirements.txt
	$(call build_copy,$(TORCH_DIR),$(TORCH_PYTHON),FUSED_LSTM_SKIP_CUDA=1)
	$(call run_on_copy,$(TORCH_DIR),$(TORCH_PYTHON),FUSED_LSTM_SKIP_CUDA=1) $(PYTEST_ARGS)
endif

# The CPUs this one can stand in for, CI's second pass: the tests whose results depend on the instruction set
# (parity, reliability, fuzz) once as on an AVX2-only CPU (our kernels' AVX2 build, oneDNN and MKL held to
# AVX2), then on the baseline x86-64 build of our kernels. ATEN_CPU_CAPABILITY lowers ours as it lowers ATen's.
CPU_PASS_TESTS ?= tests/test_module_parity.py tests/test_layer_op.py tests/test_reliability.py tests/test_fuzz.py
CPU_PASS_LIMITS := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

test-cpus: build
	for capability in avx2 default; do \
		echo "== our kernels: $$capability; oneDNN and MKL: AVX2 at most"; \
		ATEN_CPU_CAPABILITY=$$capability $(CPU_PASS_LIMITS) $(PYTHON) -m pytest $(PYTEST_ARGS) $(CPU_PASS_TESTS) || exit 1; \
	done

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
SANITIZE_ENV = LD_PRELOAD="$(SANITIZE_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

sanitize: $(REQUIREMENTS_STAMP)
	$(call build_copy,$(SANITIZE_DIR),$(PYTHON),FUSED_LSTM_SANITIZE=1 FUSED_LSTM_SKIP_CUDA=1)
	$(call run_on_copy,$(SANITIZE_DIR),$(PYTHON),$(SANITIZE_ENV)) $(PYTEST_ARGS) $(SANITIZE_TESTS)

# build_copy(folder, python, environment): builds the extension in place in a copy of the sources and tests.
# The copy is made anew but keeps the sources' times and the folder's build/, so that ninja recompiles what
# changed.
COPIED := csrc fused_lstm tests benchmarks examples setup.py pyproject.toml
define build_copy
	rm -rf $(addprefix $(1)/,$(COPIED)) && mkdir -p $(1)
	cp -r --preserve=timestamps $(COPIED) $(1)/ && rm -f $(1)/fused_lstm/*.so
	cd $(1) && $(3) $(abspath $(2)) setup.py --quiet build_ext --inplace
endef

# run_on_copy(folder, python, environment): pytest on that copy, in its folder: `-m` and `-c` put the working
# directory first on sys.path, the tests' child processes' too, so they import the copy's build (the first
# command checks which one loads). The arguments that follow the call go to pytest.
define run_on_copy
	cd $(1) && $(3) PYTHONPATH=tests $(abspath $(2)) -c \
		"import fused_lstm._C as c; assert '/$(1)/' in c.__file__, c.__file__"
	cd $(1) && $(3) PYTHONPATH=tests $(abspath $(2)) -m pytest -p no:cacheprovider
endef

# The GPU check (benchmarks/gpu_check.sh): on a GPU machine with no network, builds in place for sm_90 against
# GPU_CHECK_PYTHON's own torch (no venv, no pip), runs the CUDA tests and the benchmarks, and writes everything
# to GPU_CHECK_OUT. Each step has a timeout: about 8 minutes in all.
GPU_CHECK_OUT ?= gpu-check-results
GPU_CHECK_PYTHON ?= python3

gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf build *.egg-info fused_lstm/*.so $(SANITIZE_DIR) build-torch*
