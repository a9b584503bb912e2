"""Shared by the module tests: run nn.LSTM and fused_lstm.LSTM on the same configuration and inputs."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm

# Float64 agrees to rounding. Float32: nn.LSTM runs oneDNN, whose float32 results differ from its own native
# path by ~1e-7 per op; through several layers and the backward pass that reaches a few 1e-6.
TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@dataclasses.dataclass(frozen=True)
class Config:
    input_size: int = 3
    hidden_size: int = 5
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    kind: str = "dense"  # dense | unbatched | packed | packed_unsorted
    given_state: bool = True
    dtype: torch.dtype = torch.float64
    lengths: tuple[int, ...] = (5, 3, 3, 1)
    training: bool = True
    device: str = "cpu"

    def module_kwargs(self):
        names = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"]
        return {n: getattr(self, n) for n in names}


def make_pair(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    ref = nn.LSTM(**cfg.module_kwargs(), dtype=cfg.dtype, device=cfg.device)
    ours = fused_lstm.LSTM(**cfg.module_kwargs(), dtype=cfg.dtype, device=cfg.device)
    ours.load_state_dict(ref.state_dict())
    ref.train(cfg.training)
    ours.train(cfg.training)
    return ref, ours


def make_inputs(cfg: Config, seed: int = 1, dtype: torch.dtype | None = None):
    """Returns (input for the module, leaves to differentiate, hx or None). dtype: cast to it (the values are
    drawn in cfg.dtype all the same)."""
    g = torch.Generator().manual_seed(seed)
    batch, steps = len(cfg.lengths), max(cfg.lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=cfg.dtype).to(cfg.device, dtype).requires_grad_()

    directions = 2 if cfg.bidirectional else 1
    out_size = cfg.proj_size or cfg.hidden_size
    if cfg.kind == "unbatched":
        x = randn(steps, cfg.input_size)
        hx = (randn(cfg.num_layers * directions, out_size), randn(cfg.num_layers * directions, cfg.hidden_size))
        inp = x
    else:
        x = randn(steps, batch, cfg.input_size)
        hx = (randn(cfg.num_layers * directions, batch, out_size), randn(cfg.num_layers * directions, batch, cfg.hidden_size))
        if cfg.kind == "dense":
            inp = x.transpose(0, 1) if cfg.batch_first else x
        else:
            lengths = list(cfg.lengths)
            if cfg.kind == "packed_unsorted":
                lengths = lengths[::-1]
            inp = pack_padded_sequence(x, lengths, enforce_sorted=cfg.kind == "packed")
    leaves = [x, *hx] if cfg.given_state else [x]
    return inp, leaves, hx if cfg.given_state else None


def run(module, cfg: Config, seed: int = 1, dropout_seed: int = 7, dtype: torch.dtype | None = None):
    """Forward and backward with fixed cotangents; returns the detached results then every gradient. dtype: run
    on cfg's inputs and cotangents cast to it (a float64 module as the truth for a float32 cfg)."""
    inp, leaves, hx = make_inputs(cfg, seed, dtype)
    torch.manual_seed(dropout_seed)
    output, (h_n, c_n) = module(inp, hx)
    out = output.data if cfg.kind.startswith("packed") else output
    g = torch.Generator().manual_seed(seed + 100)
    cotangents = [torch.randn(t.shape, generator=g, dtype=cfg.dtype).to(t.device, t.dtype) for t in (out, h_n, c_n)]
    loss = sum((t * c).sum() for t, c in zip((out, h_n, c_n), cotangents))
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return [out.detach(), h_n.detach(), c_n.detach(), *grads]


def assert_same(cfg: Config, seed: int = 0, tolerance=None, scale_relative=False):
    """scale_relative: atol is taken relative to each tensor's largest magnitude (for sums over very many
    steps, whose every element carries rounding of the sum's scale)."""
    ref, ours = make_pair(cfg, seed)
    expected, actual = run(ref, cfg), run(ours, cfg)
    assert len(expected) == len(actual)
    assert actual[0].stride() == expected[0].stride(), "output layout (batch_first gives a transposed view)"
    names = ["output", "h_n", "c_n", "grad_input"] + (["grad_h0", "grad_c0"] if cfg.given_state else [])
    names += [n for n, _ in ref.named_parameters()]
    for name, e, a in zip(names, expected, actual):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        tol = dict(tolerance or TOLERANCE[cfg.dtype])
        if scale_relative:
            tol["atol"] *= max(1.0, e.abs().max().item())
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{cfg}\n{name}: {m}")
