"""torch.library.opcheck on every op: schema, fake (meta) kernels, autograd registration, AOT dispatch."""

import itertools

import pytest
import torch

from test_bidirectional_op import other_values
from test_layer_op import gradcheck_inputs

FORWARD_ARGS = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "batch_sizes"]


def forward_args(bias, proj, packed, requires_grad, dtype=torch.float64):
    kwargs = gradcheck_inputs(bias, proj, packed)
    convert = lambda t: t if t is None or not t.is_floating_point() else t.detach().to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return [convert(kwargs[name]) for name in FORWARD_ARGS]


@pytest.mark.parametrize("bias,proj,packed,requires_grad", list(itertools.product([True, False], repeat=4)))
def test_opcheck_forward(bias, proj, packed, requires_grad):
    args = forward_args(bias, proj, packed, requires_grad) + [packed]
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_forward.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_forward_dtypes(dtype):
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_forward.default, forward_args(True, True, True, True, dtype) + [True])


@pytest.mark.parametrize("bias,proj,packed", list(itertools.product([True, False], repeat=3)))
def test_opcheck_backward(bias, proj, packed):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes = forward_args(bias, proj, packed, False)
    out, h_n, c_n, gates, cells = torch.ops.fused_lstm.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, False)
    args = [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, h0, c0, w_ih, w_hh, w_hr,
            batch_sizes, False, bias, out, gates, cells]  # fmt: skip
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_backward.default, args)


def test_opcheck_backward_with_output_mask():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes = forward_args(True, True, False, False)
    out, h_n, c_n, gates, cells = torch.ops.fused_lstm.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, False)
    args = [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, h0, c0, w_ih, w_hh, w_hr,
            batch_sizes, False, True, out, gates, cells, [False, True, True, False, True, False, True]]  # fmt: skip
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_backward.default, args)


def bidirectional_forward_args(bias, proj, packed, requires_grad):
    """The forward direction's arguments of forward_args, and the reverse one's with other values."""
    x, *forward, batch_sizes = forward_args(bias, proj, packed, requires_grad)
    reverse = [other_values(t, requires_grad) for t in forward]
    return [x, *forward, *reverse, batch_sizes]


@pytest.mark.parametrize("bias,proj,packed,requires_grad", list(itertools.product([True, False], repeat=4)))
def test_opcheck_bidirectional_forward(bias, proj, packed, requires_grad):
    args = bidirectional_forward_args(bias, proj, packed, requires_grad)
    torch.library.opcheck(torch.ops.fused_lstm.lstm_bidirectional_layer_forward.default, args)


@pytest.mark.parametrize("bias,proj,packed", [(True, True, True), (False, False, False)])
def test_opcheck_bidirectional_backward(bias, proj, packed):
    args = bidirectional_forward_args(bias, proj, packed, False)
    results = torch.ops.fused_lstm.lstm_bidirectional_layer_forward(*args)
    x, forward, reverse, batch_sizes = args[0], args[1:8], args[8:15], args[15]
    without_biases = lambda direction: [*direction[:4], direction[6]]  # noqa: E731  (h0, c0, w_ih, w_hh, w_hr)
    grads = [torch.randn_like(results[i]) for i in (0, 1, 2, 5, 6, 7)]
    masks = [[True, False, True, True, False, True, True], [False, True, True, True, True, False, True]]
    backward_args = [*grads, x, *without_biases(forward), *without_biases(reverse), batch_sizes, bias, bias,
                     *(results[i] for i in (0, 3, 4, 5, 8, 9)), *masks]  # fmt: skip
    torch.library.opcheck(torch.ops.fused_lstm.lstm_bidirectional_layer_backward.default, backward_args)


@pytest.mark.parametrize("bias,proj,packed", list(itertools.product([True, False], repeat=3)))
def test_opcheck_inference(bias, proj, packed):
    args = forward_args(bias, proj, packed, requires_grad=False) + [packed]
    torch.library.opcheck(torch.ops.fused_lstm.lstm_layer_inference.default, args)


@pytest.mark.parametrize("bias,proj,packed", [(True, True, True), (False, False, False)])
def test_opcheck_bidirectional_inference(bias, proj, packed):
    args = bidirectional_forward_args(bias, proj, packed, requires_grad=False)
    torch.library.opcheck(torch.ops.fused_lstm.lstm_bidirectional_layer_inference.default, args)
