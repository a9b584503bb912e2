"""Where a compare.py row's time goes: each row's fused_lstm (or nn.LSTM) call under Linux perf, by category.

Usage (from the repo root, with the package built, e.g. by `make bench`; needs `perf` and permission to use it):

    .venv/bin/python benchmarks/profile_rows.py                          # compare.py's default suite
    .venv/bin/python benchmarks/profile_rows.py --shapes 100x8x128x128 --modes inference --seconds 10
    .venv/bin/python benchmarks/profile_rows.py --candidate nn.LSTM      # oneDNN (its JIT code shows as "other")

For every row and mode it warms the candidate up, then calls it in a loop while `perf record -p` samples this
process (every thread) for --seconds, and sorts the samples by symbol into the categories below. "GEMM floor" is
the thread time of MKL's GEMM kernels per call divided by the thread count: what a call would take if everything
but those kernels took no time and they kept every thread busy. A row's target cannot be met where that floor,
plus whatever else cannot go (the cell, say), is above the time the target asks for (nn.LSTM's time divided by
the target ratio), unless the GEMMs themselves run faster.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import compare

# (category, pattern on "dso symbol"), first match wins; the rest is "other" (Python, the dispatcher, ATen).
CATEGORIES = [
    ("MKL GEMM kernels", re.compile(r"mkl_blas_\w*[sd]gemm_kernel")),
    ("MKL copies", re.compile(r"mkl_blas_\w*(copy|pack)|omatcopy|mkl_trans")),
    ("cell (ours)", re.compile(r"(forward|backward)_rows_as")),
    ("small GEMM (ours)", re.compile(r"small_gemm")),
    ("OpenMP waits", re.compile(r"^lib[gi]omp")),
    ("libc copies", re.compile(r"^libc\S* \S*(memmove|memcpy|memset)")),
    ("kernel", re.compile(r"^\[kernel")),
]
OTHER = "other"


def categorize(report: str) -> dict[str, int]:
    """perf report -n --sort dso,sym lines ("  12.34%  1234  libfoo.so  [.] symbol") -> samples per category."""
    samples = {name: 0 for name, _ in CATEGORIES} | {OTHER: 0}
    for line in report.splitlines():
        match = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)", line)
        if not match:
            continue
        count, dso, symbol = int(match[1]), match[2], match[3]
        key = f"{dso} {symbol}"
        name = next((name for name, pattern in CATEGORIES if pattern.search(key)), OTHER)
        samples[name] += count
    return samples


def profile(call, seconds: float, frequency: int) -> tuple[dict[str, int], int, float]:
    """Samples per category of this process's threads while it runs call() for `seconds`, the calls made, and
    the seconds they took."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        record = ["perf", "record", "-q", "-F", str(frequency), "-p", str(os.getpid()), "-o", data]
        perf = subprocess.Popen([*record, "--", "sleep", str(seconds)], stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)  # perf attaches
        calls, begin = 0, time.perf_counter()
        while perf.poll() is None:
            call()
            calls += 1
        elapsed = time.perf_counter() - begin
        if perf.returncode != 0:
            raise SystemExit(f"profile_rows.py: perf record failed: {perf.stderr.read().strip()}")
        report = subprocess.run(["perf", "report", "-n", "-i", data, "--stdio", "--no-children", "-g", "none",
                                 "--sort", "dso,sym"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    return categorize(report), calls, elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help="comma-separated TxBxIxH (default: compare.py's suite)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--modes", default="inference,training", help="inference, training or both (default)")
    p.add_argument("--candidate", choices=["fused_lstm", "nn.LSTM"], default="fused_lstm")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds sampled per row and mode")
    p.add_argument("--frequency", type=int, default=1999, help="samples per second and thread")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("profile_rows.py: needs Linux perf (e.g. apt install linux-perf)")
    if args.shapes:
        cases = compare.parse_shapes(args.shapes, args.layers, args.bidirectional)
    else:
        cases = compare.default_suite()
    device = torch.device("cpu")
    names = [name for name, _ in CATEGORIES] + [OTHER]
    print(f"{args.candidate}, {torch.get_num_threads()} threads; shares of all threads' samples, in percent\n")
    print("| row | mode | ms a call | " + " | ".join(names) + " | GEMM floor ms |")
    print("|---|---|---:|" + "---:|" * len(names) + "---:|")
    for case in cases:
        for mode in filter(None, args.modes.split(",")):
            torch.manual_seed(0)
            kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional)
            module = (compare.fused_lstm.LSTM if args.candidate == "fused_lstm" else torch.nn.LSTM)(
                case.input_size, case.hidden_size, **kwargs
            )
            x = compare.make_input(case, device)
            call = lambda: compare.run_step(module, x, mode)
            warm_until = time.perf_counter() + 1.0
            while time.perf_counter() < warm_until:
                call()
            samples, calls, elapsed = profile(call, args.seconds, args.frequency)
            per_call = elapsed / calls
            total = sum(samples.values())
            # perf samples for exactly --seconds, while the calls (timed) also run during its start and exit.
            gemm_thread_seconds = samples["MKL GEMM kernels"] / args.frequency
            floor = gemm_thread_seconds / args.seconds * per_call / torch.get_num_threads()
            cells = " | ".join(f"{100 * samples[name] / total:.1f}" for name in names)
            print(f"| {case.name} | {mode} | {per_call * 1e3:.3f} | {cells} | {floor * 1e3:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
