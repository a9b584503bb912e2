"""benchmarks/compare.py, the tool a user runs, on its --quick setting: every row it prints and every figure of its
JSON. The speed figures are not judged here (a timed test would only measure the host's load); that fused_lstm and
nn.LSTM agree, that each candidate was timed and that peak memory was measured in both modes are."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare  # noqa: E402

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
