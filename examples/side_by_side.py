"""What the examples share: their command line and the table of nn.LSTM's losses beside fused_lstm's."""

import argparse


def parser(description, steps, lr):
    """The examples' common options; each adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--log-every", type=int, default=0, help="table row every N steps (default: steps/10)")
    return p


def print_table(ref, fused, every):
    print(f"{'step':>6}  {'nn.LSTM':>12}  {'fused_lstm':>12}  {'|diff|':>10}")
    for step in range(0, len(ref), every):
        print(f"{step + 1:>6}  {ref[step]:>12.6f}  {fused[step]:>12.6f}  {abs(ref[step] - fused[step]):>10.2e}")
    print(f"final loss: nn.LSTM {ref[-1]:.6f}, fused_lstm {fused[-1]:.6f}")
    print(f"max |diff| over {len(ref)} steps: {max(abs(a - b) for a, b in zip(ref, fused)):.3e}")
