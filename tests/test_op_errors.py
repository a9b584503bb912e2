"""The raw ops reject bad arguments with a RuntimeError that says what is wrong, before touching memory."""

import re

import pytest
import torch

from fused_lstm.ops import lstm_layer

I, H, T, B = 3, 5, 4, 2


def good_args(**overrides):
    args = dict(
        x=torch.randn(T, B, I), h0=torch.randn(B, H), c0=torch.randn(B, H), w_ih=torch.randn(4 * H, I),
        w_hh=torch.randn(4 * H, H), b_ih=torch.randn(4 * H), b_hh=torch.randn(4 * H), w_hr=None, batch_sizes=None,
    )  # fmt: skip
    args.update(overrides)
    return args


PACKED = dict(x=torch.randn(6, I), batch_sizes=torch.tensor([2, 2, 1, 1]))

BAD_FORWARD = {
    "x rank": (dict(x=torch.randn(T, I)), "x must be [T, B, I]"),
    "packed x rank": (dict(batch_sizes=torch.tensor([2, 2])), "x must be [N, I]"),
    "integer x": (dict(x=torch.ones(T, B, I, dtype=torch.long)), "x must be float32, float64"),
    "h0 dtype": (dict(h0=torch.randn(B, H, dtype=torch.float64)), "h0 has dtype Double but x has dtype Float"),
    "w_hh dtype": (dict(w_hh=torch.randn(4 * H, H, dtype=torch.float64)), "w_hh has dtype Double"),
    "b_ih dtype": (dict(b_ih=torch.randn(4 * H, dtype=torch.half)), "b_ih has dtype Half"),
    "h0 device": (dict(h0=torch.randn(B, H, device="meta")), "h0 is on device meta but x is on device cpu"),
    "one bias": (dict(b_hh=None), "give both b_ih and b_hh, or neither"),
    "w_ih rows": (dict(w_ih=torch.randn(4 * H + 1, I)), "w_ih must have 4 * hidden_size rows"),
    "w_ih cols": (dict(w_ih=torch.randn(4 * H, I + 1)), "expected w_ih of shape [20, 3], got [20, 4]"),
    "w_hh shape": (dict(w_hh=torch.randn(4 * H, H + 1)), "expected w_hh of shape [20, 5], got [20, 6]"),
    "bias shape": (dict(b_ih=torch.randn(4 * H + 2)), "expected b_ih of shape [20], got [22]"),
    "h0 batch": (dict(h0=torch.randn(B + 1, H)), "expected h0 of shape [2, 5], got [3, 5]"),
    "c0 size": (dict(c0=torch.randn(B, H + 1)), "expected c0 of shape [2, 5], got [2, 6]"),
    "h0 rank": (dict(h0=torch.randn(1, B, H)), "expected h0 to be 2-D, got 3-D"),
    "w_hr shape": (dict(w_hr=torch.randn(2, H + 1)), "expected w_hr of shape [2, 5], got [2, 6]"),
    "h0 without projection size": (dict(w_hr=torch.randn(2, H), w_hh=torch.randn(4 * H, 2)), "expected h0 of shape [2, 2], got [2, 5]"),
    "batch_sizes increasing": (dict(PACKED, batch_sizes=torch.tensor([1, 2, 2, 1])), "batch_sizes must be non-increasing"),
    "batch_sizes zero": (dict(PACKED, x=torch.randn(4, I), batch_sizes=torch.tensor([2, 2, 0])), "batch_sizes must be positive"),
    "batch_sizes sum": (dict(PACKED, batch_sizes=torch.tensor([2, 2, 1])), "batch_sizes sum to 5 but x has 6 rows"),
    "batch_sizes first": (dict(PACKED, batch_sizes=torch.tensor([3, 1, 1, 1])), "expected h0 of shape [3, 5], got [2, 5]"),
    "batch_sizes dtype": (dict(PACKED, batch_sizes=torch.tensor([2, 2, 1, 1], dtype=torch.int32)), "batch_sizes must be int64"),
    "batch_sizes rank": (dict(PACKED, batch_sizes=torch.tensor([[2, 2, 1, 1]])), "expected batch_sizes to be 1-D"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_forward_rejects(case):
    overrides, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        lstm_layer(**good_args(**overrides))


def backward_args(**overrides):
    a = good_args()
    out, h_n, c_n, gates, cells = torch.ops.fused_lstm.lstm_layer_forward(*a.values(), False)
    args = dict(
        grad_output=torch.ones_like(out), grad_h_n=torch.ones_like(h_n), grad_c_n=torch.ones_like(c_n), x=a["x"],
        h0=a["h0"], c0=a["c0"], w_ih=a["w_ih"], w_hh=a["w_hh"], w_hr=None, batch_sizes=None, reverse=False,
        has_bias=True, output=out, gates=gates, cells=cells,
    )  # fmt: skip
    args.update(overrides)
    return args


BAD_BACKWARD = {
    "grad_output shape": (dict(grad_output=torch.ones(T, B, H + 1)), "expected grad_output of shape [4, 2, 5]"),
    "grad_h_n shape": (dict(grad_h_n=torch.ones(B + 1, H)), "expected grad_h_n of shape [2, 5]"),
    "grad_c_n dtype": (dict(grad_c_n=torch.ones(B, H, dtype=torch.float64)), "grad_c_n has dtype Double"),
    "gates shape": (dict(gates=torch.ones(T * B - 1, 4 * H)), "expected gates of shape [8, 20]"),
    "cells shape": (dict(cells=torch.ones(T * B, H - 1)), "expected cells of shape [8, 5]"),
    "output shape": (dict(output=torch.ones(T, B + 1, H)), "expected output of shape [4, 2, 5]"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_BACKWARD)
def test_backward_rejects(case):
    overrides, message = BAD_BACKWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.fused_lstm.lstm_layer_backward(**backward_args(**overrides))


def test_good_args_are_accepted():
    """The error cases above differ from these arguments only in the named way."""
    out, h_n, c_n = lstm_layer(**good_args())
    assert out.shape == (T, B, H) and h_n.shape == (B, H) and c_n.shape == (B, H)
    packed_out, _, _ = lstm_layer(**good_args(**PACKED))
    assert packed_out.shape == (6, H)
    assert len(torch.ops.fused_lstm.lstm_layer_backward(**backward_args())) == 7
