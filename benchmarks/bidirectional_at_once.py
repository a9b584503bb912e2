"""Both directions of a bidirectional layer at once (ops.lstm_bidirectional_layer, which fused_lstm.LSTM uses)
against one direction after the other (ops.lstm_layer twice), and nn.LSTM, in one process.

Usage (from the repo root, with the package built):

    .venv/bin/python benchmarks/bidirectional_at_once.py                          # the shapes below
    .venv/bin/python benchmarks/bidirectional_at_once.py --shapes 100x16x128x256 --layers 2

Shapes are T x B x I x H; float32, default thread count. The same fused_lstm.LSTM runs with each of the two
layer functions in turn, interleaved with nn.LSTM (A B C A B C ...): each timed block is 3 calls after one
untimed call, and the figure is the median over --reps blocks. Ratios are of the medians measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused_lstm
import fused_lstm.modules
from fused_lstm.ops import directions_one_after_the_other, lstm_bidirectional_layer

DEFAULT_SHAPES = "100x16x128x256,50x1x64x64,100x4x128x128,50x64x256x256,50x32x512x512,50x64x512x512"


def block_time(run, calls=3):
    run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def measure(steps, batch, input_size, hidden, layers, reps):
    torch.manual_seed(0)
    reference = torch.nn.LSTM(input_size, hidden, num_layers=layers, bidirectional=True)
    fused = fused_lstm.LSTM(input_size, hidden, num_layers=layers, bidirectional=True)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(steps, batch, input_size)
    layer_functions = {"after the other": directions_one_after_the_other, "at once": lstm_bidirectional_layer}

    def inference(module):
        with torch.no_grad():
            module(x)

    def training(module):
        module(x)[0].sum().backward()

    rows = {}
    for mode, step in (("inference", inference), ("training", training)):
        times = {"nn.LSTM": [], **{name: [] for name in layer_functions}}
        for _ in range(reps):
            times["nn.LSTM"].append(block_time(lambda: step(reference)))
            for name, function in layer_functions.items():
                fused_lstm.modules.lstm_bidirectional_layer = function
                times[name].append(block_time(lambda: step(fused)))
        fused_lstm.modules.lstm_bidirectional_layer = lstm_bidirectional_layer
        rows[mode] = {name: statistics.median(values) for name, values in times.items()}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated TxBxIxH")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.layers} layer(s), "
          f"median of {args.reps} blocks; ms, and nn.LSTM time / fused time")  # fmt: skip
    print(f"{'shape':>18} {'mode':>9} {'nn.LSTM':>9} {'after the other':>22} {'at once':>16} {'gain':>6}")
    for shape in args.shapes.split(","):
        steps, batch, input_size, hidden = (int(n) for n in shape.split("x"))
        for mode, t in measure(steps, batch, input_size, hidden, args.layers, args.reps).items():
            after, at_once = t["after the other"], t["at once"]
            print(f"{shape:>18} {mode:>9} {t['nn.LSTM'] * 1e3:9.2f} {after * 1e3:13.2f} ({t['nn.LSTM'] / after:.2f}x) "
                  f"{at_once * 1e3:8.2f} ({t['nn.LSTM'] / at_once:.2f}x) {after / at_once:5.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
