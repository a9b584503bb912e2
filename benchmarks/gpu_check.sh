#!/usr/bin/env bash
# The GPU check: the first run of fused_lstm's CUDA path on a machine with a GPU, in one command that needs no
# network and no pip. It builds the extension in place for sm_90 (H100 / H200) against the interpreter's own
# torch, then runs the CUDA tests (a short subset under compute-sanitizer first, then all), and benchmarks
# fused_lstm against nn.LSTM on the GPU and on the CPU. Everything it learns goes to OUTDIR.
#
# Usage: benchmarks/gpu_check.sh OUTDIR            (or: make gpu-check GPU_CHECK_OUT=OUTDIR)
#   PYTHON                 the interpreter (default python3); its torch is the one built against.
#   GPU_CHECK_SKIP_BUILD=1 use the extension already built in place (tests/test_gpu_check.py takes the no-GPU
#                          path so, without a second CUDA build).
#   GPU_CHECK_BUILD_TIMEOUT  the build's limit in seconds (default 120; raise it on a slow machine).
# Exit status: 0 every step passed; 1 some step failed (summary.txt names it); 2 usage; 3 the build passed
# but torch sees no CUDA device, so nothing ran on a GPU (the message says "no CUDA device").
# OUTDIR gets: build.log, versions.txt, nvidia-smi.txt, one log (and junit XML) per test step, the benchmark
# tables (*.md) and their figures (*.json), and summary.txt, the screen printed at the end.
#
# Every step has its own timeout, so the script ends in about 8 minutes even if steps hang: the limits add up
# to 450 s (build 120, small steps 60, memcheck 60, tests 70, benchmarks 140). A failing step does not stop
# the next ones (but nothing runs without a build).
set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR   (PYTHON=interpreter, default python3)" >&2
  exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
# The in-place build and the tests' helper modules; python -P below keeps the working directory off sys.path,
# so this is the only fused_lstm it can import.
export PYTHONPATH=$ROOT:$ROOT/tests
CORES=$(nproc)
FAILED=0
STATUS=()  # one line per step, for the summary

# step NAME SECONDS LOG COMMAND...: runs COMMAND under its timeout (the whole process group, children too),
# output to OUTDIR/LOG, and records NAME's result: pytest's count line where there is one.
step() {
  local name=$1 limit=$2 log=$OUT/$3 start=$SECONDS rc result
  shift 3
  echo "== $name (up to ${limit} s) ..."
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  rc=$?
  result=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  if [[ $rc -eq 0 ]]; then
    result="PASS  ${result}"
  else
    FAILED=1
    [[ $rc -eq 124 || $rc -eq 137 ]] && result="timed out after ${limit} s; ${result}"
    result="FAIL  (exit $rc) ${result}"
  fi
  STATUS+=("$(printf '%-22s %4d s  %s' "$name" $((SECONDS - start)) "$result")")
}

# A benchmark table's rows, one short line each: shape, mode, fused ms, and nn.LSTM time / fused time for
# both nn.LSTM paths (above 1: fused is faster), with the largest differences of outputs and gradients.
ratios() {
  [[ -s $1 ]] || return 0
  awk -F'|' 'NF > 12 { for (i = 2; i <= 11; i++) gsub(/^ +| +$/, "", $i) }
    NF > 12 && $2 == "shape" { printf "  %-26s %-9s %9s %9s %11s %8s %9s\n", "shape", "mode", "fused ms", $8, $9, "out diff", "grad diff" }
    NF > 12 && $2 != "shape" && $2 !~ /^-+$/ { printf "  %-26s %-9s %9s %9s %11s %8s %9s\n", $2, $3, $5, $8, $9, $10, $11 }' "$1"
}

summary() {
  echo "GPU check of fused_lstm at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git)'), $(date -Is)"
  head -n 4 "$OUT/versions.txt" 2>/dev/null | sed 's/^/  /'
  printf '%s\n' "${STATUS[@]}"
  for table in bench-cuda bench-cuda-extra bench-cpu; do
    [[ -s $OUT/$table.md ]] && echo "$table:" && ratios "$OUT/$table.md"
  done
  echo "wall time: ${SECONDS} s"
  echo "$1"
}

finish() {  # finish EXIT_CODE MESSAGE: the summary on screen and in summary.txt
  summary "$2" | tee "$OUT/summary.txt"
  exit "$1"
}

# 1. The build: sm_90 alone (one architecture: the fastest build that runs on H100 and H200), all cores.
BUILT="the sm_90 build passed"
if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
  BUILT="GPU_CHECK_SKIP_BUILD=1: the extension built in place loads"
  echo "$BUILT" >"$OUT/build.log"
else
  step build "${GPU_CHECK_BUILD_TIMEOUT:-120}" build.log env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$CORES" \
    "$PYTHON" setup.py build_ext --inplace
  rm -f .venv/.built-cuda-*  # this build replaced make's own in place: `make test` must build again
fi
# The extension must load from this checkout with its CUDA kernels registered: setup.py builds CPU-only where
# it finds no nvcc or a CPU build of torch, and every CUDA test would then fail on a missing kernel.
step "build loads" 20 build-check.log "$PYTHON" -P -c "
import torch, fused_lstm
assert fused_lstm.__file__.startswith('$ROOT/'), fused_lstm.__file__
assert torch._C._dispatch_has_kernel_for_dispatch_key('fused_lstm::lstm_layer_forward', 'CUDA'), \
    'built without CUDA kernels: see build.log'
print('fused_lstm from', fused_lstm.__file__)"
[[ $FAILED -eq 0 ]] || finish 1 "gpu_check: FAILED: the build (see $OUT/build.log, build-check.log); nothing else ran"

# 2. What ran: the interpreter, torch, CUDA, cuDNN, the GPU, and what nvidia-smi says.
timeout 15 "$PYTHON" -P -c "
import platform, torch, fused_lstm
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| cudnn', torch.backends.cudnn.version())
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible to torch')
print('cores', $CORES, '| torch threads', torch.get_num_threads(), '| cpu capability', torch.ops.fused_lstm.cpu_capability())
print('fused_lstm', fused_lstm.__version__, 'from', fused_lstm.__file__)" >"$OUT/versions.txt" 2>&1
{ command -v nvcc >/dev/null && nvcc --version | tail -n 2; "$PYTHON" -c "import expecttest" 2>/dev/null &&
    echo "expecttest: present" || echo "expecttest: absent (tests/test_cuda.py does not need it)"; } >>"$OUT/versions.txt"
timeout 10 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed or is absent" >>"$OUT/nvidia-smi.txt"

# 3. Without a device the build is all that can be checked.
if ! timeout 15 "$PYTHON" -P -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  finish 3 "gpu_check: no CUDA device: torch sees none, so nothing ran on a GPU ($BUILT)"
fi

PYTEST=("$PYTHON" -P -m pytest -p no:cacheprovider -rfE)

# 4a. A short subset under compute-sanitizer's memcheck: the layer's kernels forward and backward (with
# projection, packed, reversed), a grid of more than one pass, no bias, and the inference op. Every launch
# blocks (CUDA_LAUNCH_BLOCKING), so a first fault names its kernel; torch's caching allocator is off, so that
# every tensor is its own allocation and an access past its end is seen.
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [[ -x $SANITIZER ]]; then
  step "memcheck subset" 60 memcheck.log env CUDA_LAUNCH_BLOCKING=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 "${PYTEST[@]}" -v tests/test_cuda.py \
    -k "(matches_cpu_float64 and float32) or more_than_one_pass or (bias_false and native) or (inference_op and native)"
  errors=$(grep -h 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -n 1)  # compute-sanitizer's own count
  [[ -n $errors ]] && STATUS+=("$(printf '%-30s %s' '' "$errors")")
else
  STATUS+=("memcheck subset        skipped: compute-sanitizer not found")
fi

# 4b. Every CUDA test.
step "tests/test_cuda.py" 70 test_cuda.log "${PYTEST[@]}" -q --junitxml="$OUT/test_cuda.xml" tests/test_cuda.py

# 4c. The GPU table: fused_lstm against nn.LSTM with cuDNN and without, float32 without TF32. The default rows,
# then a longer and larger row and a B=1 one, where each step is a few small kernels.
# Short timings (a second per row and mode, 3 to 7 repetitions): a first table, not the final word.
BENCH=("$PYTHON" -P benchmarks/compare.py --budget 1 --min-reps 3 --max-reps 7 --warmup 0.1)
step "bench cuda" 55 bench-cuda.log "${BENCH[@]}" --device cuda --json "$OUT/bench-cuda.json"
step "bench cuda extra" 30 bench-cuda-extra.log "${BENCH[@]}" --device cuda \
  --shapes 200x1x512x512,1000x16x768x768 --json "$OUT/bench-cuda-extra.json"

# 4d. The CPU table on every core of this machine (torch's default is one thread per physical core).
step "bench cpu" 55 bench-cpu.log env OMP_NUM_THREADS="$CORES" "${BENCH[@]}" --json "$OUT/bench-cpu.json"
for table in bench-cuda bench-cuda-extra bench-cpu; do  # the table alone, without the progress lines
  grep -E '^(\||`|- )' "$OUT/$table.log" >"$OUT/$table.md" 2>/dev/null
done

[[ $FAILED -eq 0 ]] && finish 0 "gpu_check: PASS: every step passed ($OUT)"
finish 1 "gpu_check: FAILED: see the steps marked FAIL above and their logs in $OUT"
