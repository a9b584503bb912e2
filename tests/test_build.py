"""The build: every CPU capability's loops give nn.LSTM's results, and CUDA kernels exist wherever CUDA can be built."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fused_lstm

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs a few parity cases of test_layer_op under the capability named by ATEN_CPU_CAPABILITY.
PARITY_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from test_layer_op import run_both, TOLERANCE
print(torch.ops.fused_lstm.cpu_capability())
for dtype in (torch.float64, torch.float32):
    for proj, packed in ((False, False), (True, True)):
        expected, actual = run_both(dtype, True, proj, packed, packed, True)
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, **TOLERANCE[dtype])
"""


def hardware_capabilities():
    order = ["default", "avx2", "avx512"]
    best = torch.ops.fused_lstm.cpu_capability() if "ATEN_CPU_CAPABILITY" not in os.environ else None
    return order[: order.index(best) + 1] if best else []


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_capability_builds_match_nn_lstm(capability):
    if capability not in hardware_capabilities():
        pytest.skip(f"this CPU (or ATEN_CPU_CAPABILITY) does not allow {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", PARITY_SCRIPT.format(here=HERE)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == capability


def cuda_buildable():
    """What setup.py decides: a CUDA build of torch, nvcc, and no FUSED_LSTM_SKIP_CUDA."""
    skip = os.environ.get("FUSED_LSTM_SKIP_CUDA", "0") not in ("", "0")
    nvcc = os.path.exists("/usr/local/cuda/bin/nvcc") or shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    return torch.version.cuda is not None and bool(nvcc) and not skip


@pytest.mark.parametrize("op", ["lstm_layer_forward", "lstm_layer_backward", "lstm_bidirectional_layer_forward",
                                "lstm_bidirectional_layer_backward"])
def test_cuda_kernels_registered_where_cuda_builds(op):
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", "CPU")
    assert has_cuda_kernel == cuda_buildable(), (
        f"CUDA kernel registered: {has_cuda_kernel}; CUDA buildable here: {cuda_buildable()} "
        "(rebuild after changing FUSED_LSTM_SKIP_CUDA)"
    )


def test_version():
    assert fused_lstm.__version__.count(".") == 2


def test_cpu_steps_call_mkl_directly_where_torch_has_it():
    """The fast CPU path finds MKL's GEMM and packed-GEMM entry points inside libtorch at run time; if a torch
    build stopped exporting them, fused_lstm would silently fall back to ATen per-step GEMMs (correct, slower)."""
    gemm = torch.ops.fused_lstm.cpu_gemm()
    assert gemm in ("mkl-packed", "mkl", "aten")
    if torch.backends.mkl.is_available():
        assert gemm == "mkl-packed"
