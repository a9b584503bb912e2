"""benchmarks/compare.py, the tool a user runs, on its --quick setting: every row it prints and every figure of its
JSON. The speed figures are not judged here (a timed test would only measure the host's load); that fused_lstm and
nn.LSTM agree, that each candidate was timed and that peak memory was measured in both modes are. And
benchmarks/profile_rows.py's sorting of perf's samples, and one short run of it where perf works."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare  # noqa: E402
import profile_rows  # noqa: E402

CANDIDATES = {"fused_lstm", "nn.LSTM (oneDNN)", "nn.LSTM (native)", "gemm"}  # the CPU candidates


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One small shape in both modes: the JSON and the printed table."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    capture = pytest.MonkeyPatch()
    printed = []
    capture.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
    try:
        assert compare.main(["--quick", "--shapes", "4x3x5x8", "--json", str(path)]) == 0
    finally:
        capture.undo()
    return json.loads(path.read_text()), "\n".join(printed)


def test_every_row_is_measured_in_both_modes(quick_run):
    results, _ = quick_run
    assert [(r["case"]["name"], r["mode"]) for r in results["results"]] == [
        ("4x3x5x8", "inference"),
        ("4x3x5x8", "training"),
    ]
    for row in results["results"]:
        assert set(row["times"]) == CANDIDATES
        assert all(t > 0 for t in row["times"].values())
        assert row["speedup"]["nn.LSTM (oneDNN)"] == pytest.approx(
            row["times"]["nn.LSTM (oneDNN)"] / row["times"]["fused_lstm"]
        )


def test_outputs_and_gradients_agree_with_nn_lstm(quick_run):
    inference, training = quick_run[0]["results"]
    assert 0 <= inference["out_diff"] < 1e-5 and inference["grad_diff"] is None
    assert 0 <= training["out_diff"] < 1e-5
    assert 0 <= training["grad_diff"] < 1e-5


def test_peak_memory_is_measured_in_both_modes(quick_run):
    for row in quick_run[0]["results"]:
        peaks = row["peak_bytes"]
        assert set(peaks) == CANDIDATES - {"gemm"}
        # The output alone is 4 x 3 x 8 floats; every candidate allocates at least that.
        assert all(peak is not None and peak >= 4 * 3 * 8 * 4 for peak in peaks.values()), peaks


def test_table_shows_every_row(quick_run):
    _, table = quick_run
    lines = [line for line in table.splitlines() if line.startswith("| 4x3x5x8")]
    assert len(lines) == 2
    assert "| inference |" in lines[0] and "| training  |" in lines[1]
    assert "n/a" not in table


# A few lines of `perf report -n --stdio --no-children -g none --sort dso,sym`, as this machine prints them.
PERF_REPORT = """\
# Samples: 20K of event 'cpu-clock:ppp'
    30.79%          6150  libtorch_cpu.so                          [.] mkl_blas_avx512_sgemm_kernel_0
    12.04%          2405  libgomp.so.1                             [.] 0x000000000001de62
     4.78%           955  _C.cpython-311-x86_64-linux-gnu.so       [.] fused_lstm::cpu::AVX512::(anonymous namespace)::forward_rows_as<float, at::vec::AVX512::Vectorized<float> >
     3.24%           647  libtorch_cpu.so                          [.] mkl_blas_avx512_sgemm_scopy_right8_ea
     2.10%           419  libc.so.6                                [.] __memmove_avx512_unaligned_erms
     1.74%           348  libpython3.11.so.1.0                     [.] gc_collect_main
     0.25%            50  [kernel.kallsyms]                        [k] do_syscall_64
"""


def test_profile_sorts_samples_by_category():
    samples = profile_rows.categorize(PERF_REPORT)
    assert samples == {"MKL GEMM kernels": 6150, "MKL copies": 647, "cell (ours)": 955, "small GEMM (ours)": 0,
                       "OpenMP waits": 2405, "libc copies": 419, "kernel": 50, "other": 348}  # fmt: skip


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "stat", "-e", "task-clock", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not perf_works(), reason="needs Linux perf, allowed to sample")
def test_profile_run_finds_the_gemm_and_the_cell(capsys):
    assert profile_rows.main(["--shapes", "20x8x32x64", "--modes", "inference", "--seconds", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 20x8x32x64"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    shares = dict(zip([name for name, _ in profile_rows.CATEGORIES] + [profile_rows.OTHER], map(float, cells[3:-1])))
    assert sum(shares.values()) == pytest.approx(100, abs=0.5)
    assert shares["MKL GEMM kernels"] > 0 and shares["cell (ours)"] > 0, shares
    assert 0 < float(cells[-1]) < float(cells[2])  # the GEMM floor is part of the call's time
