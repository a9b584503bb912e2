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
    "batch_sizes on meta": (dict(PACKED, batch_sizes=torch.tensor([2, 2, 1, 1], device="meta")), "batch_sizes must be on the CPU, got meta"),
    # Four times 2^62 wraps around int64 to 0, the row count of this x: only an overflow check catches it
    # (2^62 + 2^62 is already past int64 at step 1).
    "batch_sizes sum overflow": (dict(x=torch.randn(0, I), batch_sizes=torch.tensor([2**62] * 4)), "batch_sizes sum past int64 at step 1"),
    "w_hr of no rows": (dict(w_hr=torch.randn(0, H), w_hh=torch.randn(4 * H, 0), h0=torch.randn(B, 0)), "w_hr must have rows (proj_size > 0), got [0, 5]"),
    "w_hr rank 0": (dict(w_hr=torch.tensor(1.0)), "expected w_hr to be 2-D, got 0-D"),
    "b_ih rank": (dict(b_ih=torch.randn(1, 4 * H), b_hh=torch.randn(1, 4 * H)), "expected b_ih to be 1-D, got 2-D"),
    "hidden size 0": (dict(w_ih=torch.randn(0, I), w_hh=torch.randn(0, 0), h0=torch.randn(B, 0), c0=torch.randn(B, 0), b_ih=None, b_hh=None), "with hidden_size > 0, got 0"),
    # x exists without memory ([2^40, 2^22, 0]), but the [T * B, 4H] gates buffer would need 2^64 elements.
    "gates buffer overflow": (dict(x=torch.empty(2**40, 2**22, 0), w_ih=torch.randn(4, 0), w_hh=torch.randn(4, 1), b_ih=None, b_hh=None,
                                   h0=torch.zeros(1, 1).expand(2**22, 1), c0=torch.zeros(1, 1).expand(2**22, 1)),
                              "the gates buffer [N, 4H] would have 4611686018427387904 x 4 elements, more than int64 can count"),
}  # fmt: skip

# Cases whose arguments are all valid once moved to the meta device (the device mix is what they test).
DEVICE_CASES = {"h0 device", "batch_sizes on meta"}


def on_meta(args):
    """Every tensor argument on the meta device but batch_sizes, which the op reads on the CPU."""
    return {k: v.to("meta") if isinstance(v, torch.Tensor) and k != "batch_sizes" else v for k, v in args.items()}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_forward_rejects(case):
    overrides, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        lstm_layer(**good_args(**overrides))


@pytest.mark.parametrize("case", sorted(set(BAD_FORWARD) - DEVICE_CASES))
def test_forward_rejects_on_meta(case):
    """The fake (meta) kernel makes the same checks: it is what runs for meta tensors and under torch.compile."""
    overrides, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        lstm_layer(**on_meta(good_args(**overrides)))


def test_empty_batch_sizes_is_a_sequence_of_no_steps():
    """No steps: as a dense [0, B, I] x, the states pass through and every gradient but theirs is zero."""
    args = good_args(x=torch.randn(0, I, requires_grad=True), batch_sizes=torch.tensor([], dtype=torch.long))
    for name in ("h0", "c0", "w_ih"):
        args[name].requires_grad_()
    out, h_n, c_n = lstm_layer(**args)
    assert out.shape == (0, H) and torch.equal(h_n, args["h0"]) and torch.equal(c_n, args["c0"])
    (h_n.sum() + 2 * c_n.sum()).backward()
    assert torch.equal(args["h0"].grad, torch.ones(B, H)) and torch.equal(args["c0"].grad, torch.full((B, H), 2.0))
    assert torch.equal(args["w_ih"].grad, torch.zeros(4 * H, I)) and args["x"].grad.shape == (0, I)


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
    "output rank": (dict(output=torch.ones(T * B, H)), "expected output of shape [4, 2, 5], got [8, 5]"),
    "x rank": (dict(x=torch.randn(T * B, I)), "x must be [T, B, I]"),
    "w_hr rank": (dict(w_hr=torch.randn(H)), "expected w_hr to be 2-D, got 1-D"),
    "gates dtype": (dict(gates=torch.ones(T * B, 4 * H, dtype=torch.float64)), "gates has dtype Double"),
    "cells rank": (dict(cells=torch.tensor(1.0)), "expected cells of shape [8, 5], got []"),
    "packed without rows": (dict(batch_sizes=torch.tensor([2, 2, 2, 2])), "x must be [N, I]"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_BACKWARD)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_rejects(case, device):
    overrides, message = BAD_BACKWARD[case]
    args = backward_args(**overrides)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.fused_lstm.lstm_layer_backward(**(on_meta(args) if device == "meta" else args))


def test_good_args_are_accepted():
    """The error cases above differ from these arguments only in the named way."""
    out, h_n, c_n = lstm_layer(**good_args())
    assert out.shape == (T, B, H) and h_n.shape == (B, H) and c_n.shape == (B, H)
    packed_out, _, _ = lstm_layer(**good_args(**PACKED))
    assert packed_out.shape == (6, H)
    assert len(torch.ops.fused_lstm.lstm_layer_backward(**backward_args())) == 7
