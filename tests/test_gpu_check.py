"""benchmarks/gpu_check.sh where there is no GPU: the path every machine without one takes (this one, CI).

The script's GPU steps need a GPU machine; what can be checked without one is that it finds the extension,
writes what it learned, and stops with its "no CUDA device" message and exit status 3 instead of running (or
passing) tests that would all skip. GPU_CHECK_SKIP_BUILD=1 makes it use the extension this test session
imports, built in place, instead of a second CUDA build (minutes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_lstm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SKIP_BUILD="1")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs every step (minutes)")
@pytest.mark.skipif(Path(fused_lstm.__file__).resolve().parent.parent != ROOT, reason="fused_lstm is not built in place here")
def test_without_a_gpu_it_stops_with_no_cuda_device(tmp_path):
    """With CUDA kernels built (make test, CI), the script stops after its build check with exit status 3 and
    "no CUDA device" as its last line, in summary.txt too, beside versions.txt. A CPU-only build
    (FUSED_LSTM_SKIP_CUDA=1) must instead fail its build check, exit status 1: on a GPU machine every CUDA test
    would otherwise fail on a missing kernel."""
    out = tmp_path / "out"
    run = run_script(str(out))
    log = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    if torch._C._dispatch_has_kernel_for_dispatch_key("fused_lstm::lstm_layer_forward", "CUDA"):
        assert run.returncode == 3, log
        assert "no CUDA device" in run.stdout.strip().splitlines()[-1], log
        assert "no CUDA device" in (out / "summary.txt").read_text().strip().splitlines()[-1]
        assert f"torch {torch.__version__}" in (out / "versions.txt").read_text()
        assert re.search(r"^build loads +\d+ s  PASS", run.stdout, re.MULTILINE), log
    else:
        assert run.returncode == 1, log
        assert "built without CUDA kernels" in (out / "build-check.log").read_text()
        assert "FAILED: the build" in run.stdout.strip().splitlines()[-1], log


def test_without_an_output_folder_it_prints_its_usage():
    run = run_script()
    assert run.returncode == 2
    assert "usage:" in run.stderr
