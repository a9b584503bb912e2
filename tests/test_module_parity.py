"""fused_lstm.LSTM and LSTMCell against nn.LSTM and nn.LSTMCell: outputs, states and every gradient."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fused_lstm
from module_cases import TOLERANCE, Config, assert_same

KINDS = ["dense", "unbatched", "packed", "packed_unsorted"]

# The full product of layers x bidirectional x proj x input kind x dtype; bias, batch_first, dropout, hx and
# train/eval cycle through it, so each of their values meets every value of the others in some case.
GRID = [
    Config(num_layers=layers, bidirectional=bidir, proj_size=2 if proj else 0, kind=kind, dtype=dtype,
           bias=i % 2 == 0, batch_first=i % 3 == 0, dropout=0.4 if i % 4 < 2 else 0.0,
           given_state=i % 5 != 0, training=i % 7 != 3)
    for i, (layers, bidir, proj, kind, dtype) in enumerate(
        itertools.product([1, 2, 3], [False, True], [False, True], KINDS, [torch.float64, torch.float32]))
]  # fmt: skip


@pytest.mark.parametrize("cfg", GRID, ids=str)
def test_lstm_matches_nn_lstm(cfg):
    assert_same(cfg)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    input_size=st.integers(1, 6), hidden_size=st.integers(2, 7), num_layers=st.integers(1, 3), bias=st.booleans(),
    batch_first=st.booleans(), dropout=st.sampled_from([0.0, 0.25, 1.0]), bidirectional=st.booleans(),
    proj=st.booleans(), kind=st.sampled_from(KINDS), given_state=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]), training=st.booleans(),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(lambda ls: tuple(sorted(ls, reverse=True))),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_lstm_matches_nn_lstm_random(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                                     proj, kind, given_state, dtype, training, lengths, seed):  # fmt: skip
    cfg = Config(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                 proj_size=hidden_size - 1 if proj else 0, kind=kind, given_state=given_state, dtype=dtype,
                 lengths=lengths, training=training)  # fmt: skip
    assert_same(cfg, seed)


def test_batch_first_output_is_a_transposed_view():
    cfg = Config(batch_first=True)
    m = fused_lstm.LSTM(**cfg.module_kwargs())
    out, _ = m(torch.randn(3, 5, 3))
    assert out.shape == (3, 5, 5) and not out.is_contiguous() and out.stride() == (5, 15, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched,given_state", [(True, True), (True, False), (False, True), (False, False)])
def test_lstm_cell_matches_nn_lstm_cell(dtype, bias, batched, given_state):
    torch.manual_seed(0)
    ref = nn.LSTMCell(4, 6, bias=bias, dtype=dtype)
    ours = fused_lstm.LSTMCell(4, 6, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 4, dtype=dtype, requires_grad=True)
    hx = (torch.randn(*shape, 6, dtype=dtype, requires_grad=True), torch.randn(*shape, 6, dtype=dtype, requires_grad=True))
    leaves = [x, *hx] if given_state else [x]

    def results(module):
        h, c = module(x, hx if given_state else None)
        loss = (h * torch.arange(h.numel(), dtype=dtype).view(h.shape)).sum() + (c * c).sum()
        return [h.detach(), c.detach(), *torch.autograd.grad(loss, leaves + list(module.parameters()))]

    for e, a in zip(results(ref), results(ours), strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, **TOLERANCE[dtype])
