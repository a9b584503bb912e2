"""Both directions of a bidirectional layer at once (ops.lstm_bidirectional_layer, which fused_lstm.LSTM uses)
against one direction after the other (ops.lstm_layer twice), and nn.LSTM, in one process.

Usage (from the repo root, with the package built):

    .venv/bin/python benchmarks/bidirectional_at_once.py                          # the shapes below
    .venv/bin/python benchmarks/bidirectional_at_once.py --shapes 100x16x128x256 --layers 2

Shapes are T x B x I x H; float32, default thread count. The same fused_lstm.LSTM runs with each of the two
layer functions in turn, interleaved with nn.LSTM (A B C A B C ...), timed as compare.py times its candidates
(the same timing options; compare.py's docstring says how), training included x's gradient as there (before
this script used compare.py's pieces, its training step left x without one). Ratios are of the medians measured
in this run.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import fused_lstm
import fused_lstm.modules
from compare import (Candidate, add_timing_arguments, make_input, parse_shapes, run_step, time_interleaved,
                     timing_arguments_applied)  # fmt: skip
from fused_lstm.ops import directions_one_after_the_other, lstm_bidirectional_layer

DEFAULT_SHAPES = "100x16x128x256,50x1x64x64,100x4x128x128,50x64x256x256,50x32x512x512,50x64x512x512"
LAYER_FUNCTIONS = {"after the other": directions_one_after_the_other, "at once": lstm_bidirectional_layer}


@contextlib.contextmanager
def layer_function(function):
    """fused_lstm.LSTM runs its bidirectional layers with `function` meanwhile."""
    fused_lstm.modules.lstm_bidirectional_layer = function
    try:
        yield
    finally:
        fused_lstm.modules.lstm_bidirectional_layer = lstm_bidirectional_layer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated TxBxIxH")
    parser.add_argument("--layers", type=int, default=1)
    add_timing_arguments(parser)
    args = timing_arguments_applied(parser.parse_args())
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.layers} layer(s); "
          f"ms (medians), and nn.LSTM time / fused time")  # fmt: skip
    print(f"{'shape':>18} {'mode':>9} {'nn.LSTM':>9} {'after the other':>22} {'at once':>16} {'gain':>6}")
    for case in parse_shapes(args.shapes, args.layers, bidirectional=True):
        torch.manual_seed(0)
        reference = torch.nn.LSTM(case.input_size, case.hidden_size, num_layers=case.layers, bidirectional=True)
        fused = fused_lstm.LSTM(case.input_size, case.hidden_size, num_layers=case.layers, bidirectional=True)
        fused.load_state_dict(reference.state_dict())
        x = make_input(case, device)
        shape = f"{case.steps}x{case.batch}x{case.input_size}x{case.hidden_size}"
        for mode in ("inference", "training"):
            candidates = {"nn.LSTM": Candidate(lambda: run_step(reference, x, mode), contextlib.nullcontext)}
            for name, function in LAYER_FUNCTIONS.items():
                candidates[name] = Candidate(lambda: run_step(fused, x, mode), lambda f=function: layer_function(f))
            t, _ = time_interleaved(candidates, device, args)
            after, at_once = t["after the other"], t["at once"]
            print(f"{shape:>18} {mode:>9} {t['nn.LSTM'] * 1e3:9.2f} {after * 1e3:13.2f} ({t['nn.LSTM'] / after:.2f}x) "
                  f"{at_once * 1e3:8.2f} ({t['nn.LSTM'] / at_once:.2f}x) {after / at_once:5.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
