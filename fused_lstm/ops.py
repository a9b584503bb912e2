"""The fused LSTM layer ops: Python entry point, fake (meta) kernels and autograd.

The ops themselves are C++ (csrc/), registered as ``torch.ops.fused_lstm.*`` when ``fused_lstm._C`` loads:

* ``lstm_layer_forward``: one layer, one direction, a whole sequence; returns the output, h_n, c_n and what
  backward needs (activated gates and cell states).
* ``lstm_layer_backward``: its gradients, with the weight gradients as single GEMMs over all steps.

Double backward (``create_graph=True``) recomputes the layer with differentiable ATen ops instead: it is rare,
and that keeps one hand-written backward.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["lstm_layer"]


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a whole sequence, differentiable in every tensor argument.

    Shapes (H = hidden size, Hout = projection size if ``w_hr`` is given, else H):
      x:  [T, B, I], or [N, I] packed (a PackedSequence's data) with ``batch_sizes`` [T] (int64, CPU)
      h0: [B, Hout]; c0: [B, H]; w_ih: [4H, I]; w_hh: [4H, Hout]; b_ih, b_hh: [4H]; w_hr: [Hout, H]
    ``reverse`` runs the sequence from its last step to its first (each packed sequence from its own end).
    Returns output ([T, B, Hout] or [N, Hout]), h_n [B, Hout] and c_n [B, H].
    """
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        output, h_n, c_n, _, _ = _FunctorchLayer.apply(*args)
    else:
        output, h_n, c_n, _, _ = torch.ops.fused_lstm.lstm_layer_forward(*args)
    return output, h_n, c_n


@torch.library.register_fake("fused_lstm::lstm_layer_forward")
def _forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    # Meta tensors run this kernel for real, so it repeats the C++ checks that decide dtypes and devices.
    torch._check(x.dim() == (2 if batch_sizes is not None else 3), lambda: f"fused_lstm: x has rank {x.dim()}")
    _check_like_x(x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    hidden = w_ih.shape[0] // 4
    out_size = w_hr.shape[0] if w_hr is not None else hidden
    rows = x.shape[0] if batch_sizes is not None else x.shape[0] * x.shape[1]
    return (
        x.new_empty((*x.shape[:-1], out_size)),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        x.new_empty((rows, 4 * hidden)),
        x.new_empty((rows, hidden)),
    )


def _check_like_x(x, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        torch._check(t.dtype == x.dtype, lambda: f"fused_lstm: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        torch._check(t.device == x.device, lambda: f"fused_lstm: {name} is on device {t.device} but x is on device {x.device}")


@torch.library.register_fake("fused_lstm::lstm_layer_backward")
def _backward_fake(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias, output, gates, cells
):
    _check_like_x(x, grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n, h0=h0, c0=c0, w_ih=w_ih,
                  w_hh=w_hh, w_hr=w_hr, output=output, gates=gates, cells=cells)  # fmt: skip
    return (
        x.new_empty(x.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        x.new_empty((w_ih.shape[0] if has_bias else 0,)),
        x.new_empty(w_hr.shape if w_hr is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
    out, _, _, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, gates, cells)
    ctx.reverse = reverse


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
        return _differentiable_backward(ctx, inputs, batch_sizes, (grad_output, grad_h_n, grad_c_n))
    grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = torch.ops.fused_lstm.lstm_layer_backward(
        grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse, b_ih is not None,
        out, gates, cells,
    )
    has_bias = b_ih is not None
    return (
        grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh,
        grad_bias if has_bias else None, grad_bias if has_bias else None,
        grad_w_hr if w_hr is not None else None,
        None, None,
    )  # fmt: skip


torch.library.register_autograd("fused_lstm::lstm_layer_forward", _backward, setup_context=_setup_context)


class _FunctorchLayer(torch.autograd.Function):
    """The same autograd as an autograd.Function, for torch.func transforms (grad, vjp, jacrev, vmap).

    The Function that register_autograd generates has no setup_context staticmethod, and torch.func refuses
    such Functions ("it must override the setup_context staticmethod"), so lstm_layer takes this route when a
    transform is active. vmap runs the op once per batch entry (PyTorch's batched fallback).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.fused_lstm.lstm_layer_forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _differentiable_backward(ctx, inputs, batch_sizes, grad_outputs):
    """The gradients by autograd through a recomputation of the layer with ATen ops (double backward)."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        outputs = reference_lstm_layer(*inputs, batch_sizes=batch_sizes, reverse=ctx.reverse)
        grads = torch.autograd.grad(
            outputs, [inputs[i] for i in wanted], grad_outputs, create_graph=True, allow_unused=True
        )
    result = [None] * (len(inputs) + 2)  # + batch_sizes, reverse
    for i, grad in zip(wanted, grads):
        result[i] = grad if grad is not None else torch.zeros_like(inputs[i])
    return tuple(result)


def reference_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None, reverse=False):
    """lstm_layer written with differentiable ATen ops, one step at a time (same arguments and results).

    The state of all B rows is carried along; step t updates its first batch_sizes[t] rows, so a packed
    sequence's final state stays in place once it ends (or, in reverse, h0 / c0 wait until it starts).
    """
    sizes = [x.shape[1]] * x.shape[0] if batch_sizes is None else batch_sizes.tolist()
    x_rows = x.reshape(-1, x.shape[-1])
    offsets = [0, *itertools.accumulate(sizes)][:-1]
    h, c = h0, c0
    outputs = [None] * len(sizes)
    for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
        rows = sizes[t]
        gates = x_rows[offsets[t] : offsets[t] + rows] @ w_ih.t() + h[:rows] @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih + b_hh
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c[:rows] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        outputs[t] = h_new
        h = torch.cat([h_new, h[rows:]])
        c = torch.cat([c_new, c[rows:]])
    output = torch.cat(outputs) if outputs else x_rows.new_empty((0, h0.shape[1]))
    if batch_sizes is None:
        output = output.view(x.shape[0], x.shape[1], h0.shape[1])
    return output, h, c
