"""Benchmark fused_lstm.LSTM against torch.nn.LSTM, side by side, and print one table.

Usage (from the repo root, with the package built, e.g. by `make bench`):

    .venv/bin/python benchmarks/compare.py                       # default suite (issue 7's table), a few minutes
    .venv/bin/python benchmarks/compare.py --quick --shapes 5x2x8x8              # smoke test, seconds
    .venv/bin/python benchmarks/compare.py --shapes 50x1x64x64,100x8x128x128 --layers 2 --bidirectional
    .venv/bin/python benchmarks/compare.py --json results.json --plot speedups.png  # --plot needs matplotlib
    .venv/bin/python benchmarks/compare.py --device cuda          # against cuDNN and nn.LSTM without cuDNN

Shapes are T x B x I x H (steps, batch, input size, hidden size); float32, default thread count.
For every shape it measures two modes: inference (forward under torch.no_grad()) and training (forward, then
backward of the sum of the outputs). Candidates, run in the same process with the same weights and inputs:
  * fused_lstm.LSTM;
  * nn.LSTM as it runs by default (CPU: oneDNN; CUDA: cuDNN);
  * nn.LSTM's fallback path (CPU: oneDNN disabled via torch.backends.mkldnn.flags; CUDA: cuDNN disabled);
  * one torch.mm with the same FLOPs as the LSTM (2*rows*4H*(I_layer + H) per layer and direction, 3x that for
    training): the "one-GEMM limit"; GEMM% = gemm time / candidate time.
On the CPU, nn.LSTM takes its native path for PackedSequence input whatever the flags, so both nn.LSTM columns
of the packed row run the native path there (on CUDA, cuDNN takes packed input).
On CUDA, float32 runs in full float32 everywhere unless --tf32 on (cuDNN's RNN would otherwise use TF32 on
Ampere and newer by default while the fused op's and the GEMM's cuBLAS calls do not: not like for like).

Timing: each candidate warms up (--warmup seconds, at least --warmup-calls calls), then every repetition runs
the candidates in turn (A B C D A B C D ...); each timed block repeats a call enough times to last --min-block
seconds; the figure is the median over repetitions of the per-call time (time.perf_counter on the CPU, CUDA events
on CUDA). The number of repetitions adapts to --budget (seconds per shape and mode) between --min-reps and
--max-reps, unless --reps fixes it. Other busy processes skew everything (with 2 cores, oneDNN's threads then
stall for ~100 ms at a time): the header prints the load average, and a warning goes to stderr if it is high.
Peak memory is measured on one extra call per candidate (the forward alone in inference, forward and backward in
training): on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call; on the CPU, the
running peak of the bytes allocated through c10's CPU allocator as recorded by torch.profiler(profile_memory=True)
(memory that a library allocates on its own, outside that allocator, is not seen).
Speedup = nn.LSTM time / fused time. "out diff" is the max abs difference of output, h_n and c_n between fused and
default nn.LSTM; "grad diff" that of the gradients of the input and of every parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

try:
    import fused_lstm
except ImportError:  # run from a checkout with an in-place build
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_lstm

warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # printed by mkldnn.flags()

DEFAULT_SHAPES = [(50, 1, 64, 64), (100, 8, 128, 128), (100, 32, 256, 256), (100, 64, 512, 512), (50, 128, 1024, 1024)]
MODES = ("inference", "training")


@dataclass
class Case:
    """One benchmarked LSTM: nn.LSTM(input_size, hidden_size, layers, bidirectional) on [steps, batch, input_size]."""

    name: str
    steps: int
    batch: int
    input_size: int
    hidden_size: int
    layers: int = 1
    bidirectional: bool = False
    lengths: list[int] | None = None  # packed input: one length per sequence, sorted longest first

    @property
    def rows(self) -> int:
        """Number of (step, sequence) pairs really computed."""
        return sum(self.lengths) if self.lengths else self.steps * self.batch


@dataclass
class Result:
    """The figures of one table row (one case, one mode)."""

    case: Case
    mode: str
    reps: int
    times: dict[str, float] = field(default_factory=dict)  # candidate -> median seconds per call
    out_diff: float = float("nan")
    grad_diff: float | None = None
    peak_bytes: dict[str, int | None] = field(default_factory=dict)


def default_suite() -> list[Case]:
    cases = [Case(f"{t}x{b}x{i}x{h}", t, b, i, h) for t, b, i, h in DEFAULT_SHAPES]
    cases.append(Case("2L bidir 100x16x128x256", 100, 16, 128, 256, layers=2, bidirectional=True))
    lengths = torch.linspace(100, 10, 32).round().int().tolist()
    cases.append(Case("packed 100..10 x32x256x256", 100, 32, 256, 256, lengths=lengths))
    return cases


def parse_shapes(text: str, layers: int, bidirectional: bool) -> list[Case]:
    cases = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        try:
            t, b, i, h = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"compare.py: bad shape {spec!r}; expected TxBxIxH, e.g. 50x1x64x64")
        suffix = (f" {layers}L" if layers > 1 else "") + (" bidir" if bidirectional else "")
        cases.append(Case(spec + suffix, t, b, i, h, layers=layers, bidirectional=bidirectional))
    return cases


def lstm_flops(case: Case, mode: str) -> int:
    """Multiply-add FLOPs of the LSTM's GEMMs: forward, or forward + backward (3x) for training."""
    directions = 2 if case.bidirectional else 1
    total = 0
    for layer in range(case.layers):
        layer_input = case.input_size if layer == 0 else case.hidden_size * directions
        total += directions * 2 * case.rows * 4 * case.hidden_size * (layer_input + case.hidden_size)
    return total * (3 if mode == "training" else 1)


def backend_labels(device: torch.device) -> tuple[str, str]:
    return ("cuDNN", "no cuDNN") if device.type == "cuda" else ("oneDNN", "native")


def backend_context(device: torch.device, enabled: bool):
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=enabled)
    return torch.backends.mkldnn.flags(enabled=enabled)


def make_input(case: Case, device: torch.device):
    """A [T, B, I] tensor, or a PackedSequence whose data is a leaf, both requiring grad."""
    x = torch.randn(case.steps, case.batch, case.input_size, device=device)
    if case.lengths is None:
        return x.requires_grad_()
    packed = pack_padded_sequence(x, torch.tensor(case.lengths), enforce_sorted=True)
    return PackedSequence(packed.data.detach().requires_grad_(), packed.batch_sizes)


def leaf_of(x) -> torch.Tensor:
    return x.data if isinstance(x, PackedSequence) else x


def run_step(module, x, mode: str):
    """One forward (inference) or forward + backward of the sum of the outputs (training)."""
    if mode == "inference":
        with torch.no_grad():
            return module(x)
    module.zero_grad(set_to_none=True)
    leaf_of(x).grad = None
    output, state = module(x)
    leaf_of(output).sum().backward()
    return output, state


class Candidate(NamedTuple):
    call: Callable[[], object]  # one call
    context: Callable[[], contextlib.AbstractContextManager]  # entered around each timed block
    scale: float = 1.0  # multiplies the measured time


def candidates(case: Case, mode: str, device: torch.device, ref, fused, x) -> dict[str, Candidate]:
    """The four timed candidates of one row, by name."""
    default, fallback = backend_labels(device)
    k, n = case.input_size + case.hidden_size, 4 * case.hidden_size
    flops = lstm_flops(case, mode)
    m = max(1, round(flops / (2 * k * n)))
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    c = torch.empty(m, n, device=device)
    return {
        "fused_lstm": Candidate(lambda: run_step(fused, x, mode), contextlib.nullcontext),
        f"nn.LSTM ({default})": Candidate(lambda: run_step(ref, x, mode), contextlib.nullcontext),
        f"nn.LSTM ({fallback})": Candidate(lambda: run_step(ref, x, mode), lambda: backend_context(device, False)),
        # [m, I+H] @ [I+H, 4H]; its time is scaled to the LSTM's FLOPs exactly, since m was rounded.
        "gemm": Candidate(lambda: torch.mm(a, b, out=c), contextlib.nullcontext, flops / (2 * m * k * n)),
    }


def time_block(fn, context, calls: int, device: torch.device) -> float:
    """Seconds per call of `calls` back-to-back calls."""
    with context():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls


def time_interleaved(cands: dict[str, Candidate], device: torch.device, args) -> tuple[dict[str, float], int]:
    """Warm up, size each candidate's block and the repetitions, then A B C D A B C D ...; medians."""
    single = {}
    for name, (fn, ctx, _) in cands.items():
        warm_until, calls = time.perf_counter() + args.warmup, 0
        while calls < args.warmup_calls or time.perf_counter() < warm_until:
            time_block(fn, ctx, 1, device)
            calls += 1
        single[name] = max(time_block(fn, ctx, 1, device), 1e-7)
    calls = {name: max(1, math.ceil(args.min_block / t)) for name, t in single.items()}
    per_rep = sum(calls[name] * single[name] for name in cands)
    reps = args.reps or min(args.max_reps, max(args.min_reps, int(args.budget / per_rep)))
    samples = {name: [] for name in cands}
    for _ in range(reps):
        for name, (fn, ctx, _) in cands.items():
            samples[name].append(time_block(fn, ctx, calls[name], device))
    return {name: statistics.median(s) * cands[name].scale for name, s in samples.items()}, reps


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((u.detach().double() - v.detach().double()).abs().max().item() for u, v in zip(a, b))


def outputs_and_grads(module, x, mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    output, (h_n, c_n) = run_step(module, x, mode)
    outs = [leaf_of(output).detach().clone(), h_n.detach().clone(), c_n.detach().clone()]
    grads = [leaf_of(x).grad.clone()] + [p.grad.clone() for p in module.parameters()] if mode == "training" else []
    return outs, grads


@contextlib.contextmanager
def quiet_stderr():
    """Silences the profiler's own log lines on file descriptor 2 (progress goes to stderr too)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_step_memory(fn, context, module, x, device: torch.device) -> int | None:
    """Peak bytes allocated during one call of fn above what was allocated before it (None: not measurable)."""
    module.zero_grad(set_to_none=True)
    leaf_of(x).grad = None
    with context():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base
        from torch.profiler import ProfilerActivity, profile

        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:  # the profiler's raw events: private API, so fail soft ("n/a") if it moves
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())  # fmt: skip
    except AttributeError:
        return None
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure(case: Case, mode: str, device: torch.device, args) -> Result:
    torch.manual_seed(0)
    kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional)
    ref = torch.nn.LSTM(case.input_size, case.hidden_size, **kwargs).to(device)
    fused = fused_lstm.LSTM(case.input_size, case.hidden_size, **kwargs).to(device)
    fused.load_state_dict(ref.state_dict())
    x = make_input(case, device)

    result = Result(case, mode, reps=0)
    fused_out, fused_grads = outputs_and_grads(fused, x, mode)
    ref_out, ref_grads = outputs_and_grads(ref, x, mode)
    result.out_diff = max_abs_diff(fused_out, ref_out)
    if mode == "training":
        result.grad_diff = max_abs_diff(fused_grads, ref_grads)

    cands = candidates(case, mode, device, ref, fused, x)
    result.times, result.reps = time_interleaved(cands, device, args)
    for name, (fn, ctx, _) in cands.items():
        if name != "gemm":
            result.peak_bytes[name] = peak_step_memory(fn, ctx, fused if name == "fused_lstm" else ref, x, device)
    return result


def header(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "fused_lstm": getattr(fused_lstm, "__version__", "unknown"),
        "cpu capability": torch.ops.fused_lstm.cpu_capability(),
        "device": str(device),
        "load average (1 min, at start)": f"{os.getloadavg()[0]:.2f}",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda / cudnn"] = f"{torch.version.cuda} / {torch.backends.cudnn.version()}"
        info["tf32 (cudnn / cublas)"] = f"{torch.backends.cudnn.allow_tf32} / {torch.backends.cuda.matmul.allow_tf32}"
    return info


def table_rows(results: list[Result], device: torch.device) -> tuple[list[str], list[list[str]]]:
    default, fallback = (f"nn.LSTM ({label})" for label in backend_labels(device))
    short_default, short_fallback = backend_labels(device)
    columns = ["shape", "mode", "reps", "fused ms", f"{short_default} ms", f"{short_fallback} ms",
               f"x {short_default}", f"x {short_fallback}", "out diff", "grad diff",
               "GEMM% fused", f"GEMM% {short_default}", "peak fused", f"peak {short_default}"]  # fmt: skip
    rows = []
    for r in results:
        t = r.times
        mb = lambda name: human_bytes(r.peak_bytes[name])
        rows.append([
            r.case.name, r.mode, str(r.reps),
            f"{t['fused_lstm'] * 1e3:.3f}", f"{t[default] * 1e3:.3f}", f"{t[fallback] * 1e3:.3f}",
            f"{t[default] / t['fused_lstm']:.2f}x", f"{t[fallback] / t['fused_lstm']:.2f}x",
            f"{r.out_diff:.1e}", f"{r.grad_diff:.1e}" if r.grad_diff is not None else "-",
            f"{100 * t['gemm'] / t['fused_lstm']:.0f}%", f"{100 * t['gemm'] / t[default]:.0f}%",
            mb("fused_lstm"), mb(default),
        ])  # fmt: skip
    return columns, rows


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def print_table(info: dict[str, str], results: list[Result], device: torch.device, command: str) -> None:
    print(f"`{command}`\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print()
    columns, rows = table_rows(results, device)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                          for i, (cell, w) in enumerate(zip(cells, widths))) + " |"  # fmt: skip
    print(line(columns))
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(line(row))


def write_json(path: str, info: dict[str, str], results: list[Result], command: str) -> None:
    """Every figure: times (median seconds per call), speedup (nn.LSTM / fused), gemm_fraction (gemm / candidate),
    peak_bytes (peak above the bytes allocated before the call; null where not measurable)."""
    rows = []
    for r in results:
        t = r.times
        speedup = {name: t[name] / t["fused_lstm"] for name in t if name.startswith("nn.LSTM")}
        gemm_fraction = {name: t["gemm"] / t[name] for name in t if name != "gemm"}
        rows.append({**asdict(r), "flops": lstm_flops(r.case, r.mode), "speedup": speedup,
                     "gemm_fraction": gemm_fraction})  # fmt: skip
    with open(path, "w") as f:
        json.dump({"command": command, "header": info, "results": rows}, f, indent=2)


def write_plot(path: str, results: list[Result], device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = backend_labels(device)
    names = [f"{r.case.name}\n{r.mode}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results)), 4.5))
    width = 0.4
    for k, label in enumerate(labels):
        ratios = [r.times[f"nn.LSTM ({label})"] / r.times["fused_lstm"] for r in results]
        ax.bar([i + (k - 0.5) * width for i in range(len(results))], ratios, width, label=f"vs nn.LSTM ({label})")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(results)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speedup (nn.LSTM time / fused_lstm time)")
    ax.set_title(f"fused_lstm speedup, {device.type}, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shapes", help="comma-separated TxBxIxH, e.g. 50x1x64x64,100x8x128x128 (default: issue 7 suite)")
    p.add_argument("--layers", type=int, default=1, help="layers for --shapes (default 1)")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional LSTM for --shapes")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--tf32", choices=["on", "off"], default="off", help="CUDA: TF32 for cuDNN and cuBLAS (default off)")
    add_timing_arguments(p)
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speedups (needs matplotlib)")
    return timing_arguments_applied(p.parse_args(argv))


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """The options of time_interleaved (also benchmarks/bidirectional_at_once.py's)."""
    p.add_argument("--quick", action="store_true", help="few, short repetitions: a smoke test, not a measurement")
    p.add_argument("--reps", type=int, help="fixed number of repetitions (default: adapt to --budget)")
    p.add_argument("--budget", type=float, default=12.0, help="seconds of timing per shape and mode (default 12)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--warmup", type=float, default=0.3, help="seconds of untimed calls per candidate first")
    p.add_argument("--warmup-calls", type=int, default=2, help="untimed calls per candidate first, at least")
    p.add_argument("--min-block", type=float, default=0.02, help="seconds each timed block lasts at least")


def timing_arguments_applied(args: argparse.Namespace) -> argparse.Namespace:
    """args with --quick's settings in place of the timing options it overrides."""
    if args.quick:
        args.budget, args.min_reps, args.max_reps, args.min_block = 0.5, 3, 3, 0.002
        args.warmup, args.warmup_calls = 0.0, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        sys.exit("compare.py: --plot needs matplotlib, which is not installed (pip install matplotlib)")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("compare.py: --device cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(device)  # the events and synchronisations below use the current device
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    cases = parse_shapes(args.shapes, args.layers, args.bidirectional) if args.shapes else default_suite()
    command = " ".join(["benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])

    info = header(device)
    if os.getloadavg()[0] > 0.5:
        print(f"compare.py: warning: load average {os.getloadavg()[0]:.2f}; other processes will skew the timings",
              file=sys.stderr)  # fmt: skip
    results, started = [], time.perf_counter()
    jobs = [(case, mode) for case in cases for mode in MODES]
    for done, (case, mode) in enumerate(jobs):
        print(f"[{done + 1:2d}/{len(jobs)}] {case.name} {mode} ... ({time.perf_counter() - started:.0f} s elapsed)",
              file=sys.stderr, flush=True)  # fmt: skip
        results.append(measure(case, mode, device, args))
    print(f"[done] {len(jobs)} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    print_table(info, results, device, command)
    if args.json:
        write_json(args.json, info, results, command)
    if args.plot:
        write_plot(args.plot, results, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
