"""Sequence regression (denoising) trained with torch.nn.LSTM and with fused_lstm.LSTM, side by side.

Each sample is a sum of two sines with random frequencies, amplitudes and phases, observed with Gaussian
noise; the model reads the noisy sequence and predicts the clean value at every step (mean squared error).
A bidirectional 2-layer LSTM with projections (proj_size) and batch_first=True sees both sides of each step,
so it can learn to smooth far better than the noise level (the MSE of just echoing the input).

The model is built once with nn.LSTM and the fused copy is made with `fused_lstm.convert(copy.deepcopy(model))`,
so both runs start from the same weights; they see the same batches and draw the same dropout masks, so their
losses should agree to float32 rounding. Over a long run the two columns drift apart slowly, as any two float32
trainings whose arithmetic differs in the last bit do (nn.LSTM runs oneDNN or ATen's kernels on the CPU,
fused_lstm its own); a 1-ulp nudge to nn.LSTM's initial weights moves its own losses by a similar amount.

Run:  .venv/bin/python examples/sequence_regression.py --steps 100
"""

import copy
import math

import torch
from torch import nn

import fused_lstm
import side_by_side


class Denoiser(nn.Module):
    def __init__(self, hidden=48, proj=16, layers=2, dropout=0.1):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, num_layers=layers, dropout=dropout, batch_first=True,
                            bidirectional=True, proj_size=proj)  # fmt: skip
        self.head = nn.Linear(2 * proj, 1)

    def forward(self, x):  # x: [B, T, 1] -> [B, T, 1]
        output, _ = self.lstm(x)
        return self.head(output)


def make_batches(steps, batch_size, seq_len, noise, seed):
    """`steps` batches of (noisy [B, T, 1], clean [B, T, 1]) sums of two random sines."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(seq_len, dtype=torch.float32)
    batches = []
    for _ in range(steps):
        freq = 0.05 + 0.25 * torch.rand(batch_size, 2, 1, generator=gen)
        amp = 0.5 + 0.5 * torch.rand(batch_size, 2, 1, generator=gen)
        phase = 2 * math.pi * torch.rand(batch_size, 2, 1, generator=gen)
        clean = (amp * torch.sin(freq * t + phase)).sum(1).unsqueeze(-1)
        batches.append((clean + noise * torch.randn(clean.shape, generator=gen), clean))
    return batches


def train(model, batches, args):
    model = model.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed + 1)  # same dropout masks for both runs
    losses = []
    for noisy, clean in batches:
        noisy, clean = noisy.to(args.device), clean.to(args.device)
        loss = nn.functional.mse_loss(model(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    parser = side_by_side.parser(__doc__.split("\n")[0], steps=100, lr=5e-3)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.3)
    args = parser.parse_args(argv)

    batches = make_batches(args.steps, args.batch_size, args.seq_len, args.noise, args.seed)
    print(f"{args.steps} steps of {args.batch_size}x{args.seq_len}; echoing the input scores MSE {args.noise**2:.4f}")

    torch.manual_seed(args.seed)
    model = Denoiser()
    fused_model = fused_lstm.convert(copy.deepcopy(model))  # same weights, fused_lstm.LSTM inside
    ref = train(model, batches, args)
    fused = train(fused_model, batches, args)
    side_by_side.print_table(ref, fused, args.log_every or max(1, args.steps // 10))
    return ref, fused


if __name__ == "__main__":
    main()
