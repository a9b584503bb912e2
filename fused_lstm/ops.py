"""The fused LSTM layer ops: Python entry point, fake (meta) kernels and autograd.

The ops themselves are C++ (csrc/), registered as ``torch.ops.fused_lstm.*`` when ``fused_lstm._C`` loads:

* ``lstm_layer_forward``: one layer, one direction, a whole sequence; returns the output, h_n, c_n and what
  backward needs (activated gates and cell states).
* ``lstm_layer_backward``: its gradients (those its output_mask asks for), with the weight gradients as single
  GEMMs over all steps.
* ``lstm_layer_inference``: the forward's output, h_n and c_n alone, for calls that need no gradient; keeping
  nothing for backward, it holds a window of steps' gates at a time (csrc/layer.h).
* ``lstm_bidirectional_layer_forward``, ``_backward`` and ``_inference``: the same for both directions of a
  layer, run at once.

Their autograd is C++ (csrc/autograd.cpp). Double backward (``create_graph=True``) recomputes the layer with
differentiable ATen ops instead (``lstm_layer_recompute_backward``, implemented here): it is rare, and that
keeps one hand-written backward.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["lstm_bidirectional_layer", "lstm_layer"]


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
    elif _needs_gradient(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        output, h_n, c_n, _, _ = _forward(*args)
    else:
        output, h_n, c_n = _inference(*args)
    return output, h_n, c_n


def lstm_bidirectional_layer(
    x: Tensor, forward: tuple, reverse: tuple, batch_sizes: Tensor | None = None
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Both directions of a bidirectional layer over the same x: ``lstm_layer`` with each direction's
    ``(h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)``, the second with ``reverse=True``, and the same results. On the
    CPU they run at once, each on a thread of its own, forward and backward. Returns the two directions'
    (output, h_n, c_n)."""
    if len(forward) != 7 or len(reverse) != 7:
        raise ValueError(f"lstm_bidirectional_layer: each direction is (h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), "
                         f"got {len(forward)} and {len(reverse)} values")  # fmt: skip
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return directions_one_after_the_other(x, forward, reverse, batch_sizes)
    if _needs_gradient(x, *forward, *reverse):
        results = _bidirectional_forward(x, *forward, *reverse, batch_sizes)
        return results[0:3], results[5:8]
    results = _bidirectional_inference(x, *forward, *reverse, batch_sizes)
    return results[0:3], results[3:6]


def _needs_gradient(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors, or forward-mode AD carry tangents through it
    (whose dual tensors need not require grad, under no_grad too): then the forward op, which keeps what
    backward needs (and refuses forward-mode AD, as a C++ autograd Function does); otherwise the inference op."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def directions_one_after_the_other(
    x: Tensor, forward: tuple, reverse: tuple, batch_sizes: Tensor | None = None
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """lstm_bidirectional_layer's results, by one lstm_layer call per direction (torch.func runs this; tests
    and benchmarks compare with it)."""
    return (lstm_layer(x, *forward, batch_sizes=batch_sizes),
            lstm_layer(x, *reverse, batch_sizes=batch_sizes, reverse=True))  # fmt: skip


_forward = torch.ops.fused_lstm.lstm_layer_forward.default
_inference = torch.ops.fused_lstm.lstm_layer_inference.default
_bidirectional_forward = torch.ops.fused_lstm.lstm_bidirectional_layer_forward.default
_bidirectional_inference = torch.ops.fused_lstm.lstm_bidirectional_layer_inference.default


@torch.library.register_fake("fused_lstm::lstm_layer_forward")
def _forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    # Meta tensors run this kernel for real (a meta argument among CPU ones routes the whole call here), so it
    # makes the C++ checks (csrc/layer.cpp check_layer_inputs) that do not need tensor values.
    rows, hidden, out_size = _check_layer_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes)
    return (
        x.new_empty((*x.shape[:-1], out_size)),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        x.new_empty((rows, 4 * hidden)),
        x.new_empty((rows, hidden)),
    )


@torch.library.register_fake("fused_lstm::lstm_bidirectional_layer_forward")
def _bidirectional_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                                w_hr_r, batch_sizes):  # fmt: skip
    forward = _forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, False)
    with _in_reverse_direction():
        reverse = _forward_fake(x, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, batch_sizes, True)
    return (*forward, *reverse)


@torch.library.register_fake("fused_lstm::lstm_layer_inference")
def _inference_fake(*args):
    return _forward_fake(*args)[:3]


@torch.library.register_fake("fused_lstm::lstm_bidirectional_layer_inference")
def _bidirectional_inference_fake(*args):
    results = _bidirectional_forward_fake(*args)
    return (*results[0:3], *results[5:8])


@contextlib.contextmanager
def _in_reverse_direction():
    """The context the C++ kernels add to an error in the reverse direction's arguments (layer.h), as
    c10::Error prints one context."""
    try:
        yield
    except RuntimeError as error:
        if error.args and isinstance(error.args[0], str):
            error.args = (f"{error.args[0]} (fused_lstm: in the reverse direction's arguments)", *error.args[1:])
        raise


_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT64_MAX = 2**63 - 1


@functools.cache
def _aten_name(dtype: torch.dtype) -> str:
    """The name C++ messages print for a dtype (Float, Double, Long, ComplexFloat), from the legacy type string
    'torch.FloatTensor'; str(dtype) where there is none."""
    try:
        return torch.empty(0, dtype=dtype, device="cpu").type().removeprefix("torch.").removesuffix("Tensor")
    except (RuntimeError, TypeError):
        return str(dtype)


def _check_layer_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes):
    """The C++ argument checks with their messages, on shapes, dtypes and devices alone; returns N, H, Hout."""
    packed = batch_sizes is not None
    torch._check(x.dim() == (2 if packed else 3), lambda: f"fused_lstm: x must be {'[N, I]' if packed else '[T, B, I]'}, got a {x.dim()}-D tensor")
    torch._check(x.dtype in _FLOATING, lambda: f"fused_lstm: x must be float32, float64, float16 or bfloat16, got {_aten_name(x.dtype)}")
    _check_like_x(x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    torch._check((b_ih is None) == (b_hh is None), lambda: "fused_lstm: give both b_ih and b_hh, or neither")
    for name, t, rank in (("h0", h0, 2), ("c0", c0, 2), ("w_ih", w_ih, 2), ("w_hh", w_hh, 2), ("b_ih", b_ih, 1),
                          ("b_hh", b_hh, 1), ("w_hr", w_hr, 2)):  # fmt: skip
        torch._check(t is None or t.dim() == rank, lambda: f"fused_lstm: expected {name} to be {rank}-D, got {t.dim()}-D")
    gates = w_ih.shape[0]
    torch._check(gates > 0 and gates % 4 == 0, lambda: f"fused_lstm: w_ih must have 4 * hidden_size rows with hidden_size > 0, got {gates}")
    hidden = gates // 4
    torch._check(w_hr is None or w_hr.shape[0] > 0, lambda: f"fused_lstm: w_hr must have rows (proj_size > 0), got {list(w_hr.shape)}")
    out_size = w_hr.shape[0] if w_hr is not None else hidden
    rows = x.shape[0] if packed else x.shape[0] * x.shape[1]
    if packed:
        torch._check(batch_sizes.device.type == "cpu", lambda: f"fused_lstm: batch_sizes must be on the CPU, got {batch_sizes.device}")
        torch._check(batch_sizes.dtype == torch.int64, lambda: f"fused_lstm: batch_sizes must be int64, got {_aten_name(batch_sizes.dtype)}")
        torch._check(batch_sizes.dim() == 1, lambda: f"fused_lstm: expected batch_sizes to be 1-D, got {batch_sizes.dim()}-D")
    batch = x.shape[1] if not packed else _checked_packed_batch(batch_sizes, rows, h0.shape[0])
    expected = [("w_ih", w_ih, (gates, x.shape[-1])), ("w_hr", w_hr, (out_size, hidden)), ("w_hh", w_hh, (gates, out_size)),
                ("b_ih", b_ih, (gates,)), ("b_hh", b_hh, (gates,)), ("h0", h0, (batch, out_size)), ("c0", c0, (batch, hidden))]  # fmt: skip
    _check_shapes(expected)
    for buffer, columns in (("the gates buffer [N, 4H]", gates), ("the output [N, Hout]", out_size)):
        torch._check(rows * columns <= _INT64_MAX, lambda: f"fused_lstm: {buffer} would have {rows} x {columns} elements, more than int64 can count")
    return rows, hidden, out_size


def _checked_packed_batch(batch_sizes, rows, h0_rows):
    """The batch of a packed call: batch_sizes[0], validated as C++ does, where batch_sizes has values (a real
    CPU tensor beside meta ones); h0's rows under a fake mode, which has none (the real kernel checks them)."""
    if is_fake(batch_sizes):
        return h0_rows
    sizes = batch_sizes.tolist()
    total = 0
    for t, size in enumerate(sizes):
        torch._check(size > 0, lambda: f"fused_lstm: batch_sizes must be positive, got {size} at step {t}")
        torch._check(t == 0 or size <= sizes[t - 1], lambda: f"fused_lstm: batch_sizes must be non-increasing, got {sizes[t - 1]} then {size} at step {t}")
        total += size
        torch._check(total <= _INT64_MAX, lambda: f"fused_lstm: batch_sizes sum past int64 at step {t}")
    torch._check(total == rows, lambda: f"fused_lstm: batch_sizes sum to {total} but x has {rows} rows")
    return sizes[0] if sizes else h0_rows


def _check_shapes(expected):
    """expected: (name, tensor or None, shape) triples."""
    for name, t, shape in expected:
        torch._check(t is None or tuple(t.shape) == shape, lambda: f"fused_lstm: expected {name} of shape {list(shape)}, got {list(t.shape)}")


def _check_like_x(x, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        torch._check(t.dtype == x.dtype, lambda: f"fused_lstm: {name} has dtype {_aten_name(t.dtype)} but x has dtype {_aten_name(x.dtype)}")
        torch._check(t.device == x.device, lambda: f"fused_lstm: {name} is on device {t.device} but x is on device {x.device}")


@torch.library.register_fake("fused_lstm::lstm_layer_backward")
def _backward_fake(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias, output, gates, cells,
    output_mask=(True,) * 7,
):
    _check_like_x(x, grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n, output=output, gates=gates,
                  cells=cells)  # fmt: skip
    rows, hidden, out_size = _check_layer_inputs(x, h0, c0, w_ih, w_hh, None, None, w_hr, batch_sizes)
    batch = h0.shape[0]
    expected = [("output", output, (*x.shape[:-1], out_size)), ("grad_output", grad_output, (*x.shape[:-1], out_size)),
                ("grad_h_n", grad_h_n, (batch, out_size)), ("grad_c_n", grad_c_n, (batch, hidden)),
                ("gates", gates, (rows, 4 * hidden)), ("cells", cells, (rows, hidden))]  # fmt: skip
    _check_shapes(expected)
    shapes = (x.shape, h0.shape, c0.shape, w_ih.shape, w_hh.shape, (w_ih.shape[0],) if has_bias else (0,),
              w_hr.shape if w_hr is not None else (0,))  # fmt: skip
    return tuple(x.new_empty(shape if wanted else (0,)) for shape, wanted in zip(shapes, output_mask, strict=True))


@torch.library.register_fake("fused_lstm::lstm_bidirectional_layer_backward")
def _bidirectional_backward_fake(
    grad_output, grad_h_n, grad_c_n, grad_output_r, grad_h_n_r, grad_c_n_r, x, h0, c0, w_ih, w_hh, w_hr, h0_r, c0_r,
    w_ih_r, w_hh_r, w_hr_r, batch_sizes, has_bias, has_bias_r, output, gates, cells, output_r, gates_r, cells_r,
    output_mask=(True,) * 7, output_mask_r=(True,) * 7,
):
    forward = _backward_fake(grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, False,
                             has_bias, output, gates, cells, output_mask)  # fmt: skip
    with _in_reverse_direction():
        reverse = _backward_fake(grad_output_r, grad_h_n_r, grad_c_n_r, x, h0_r, c0_r, w_ih_r, w_hh_r, w_hr_r,
                                 batch_sizes, True, has_bias_r, output_r, gates_r, cells_r, output_mask_r)  # fmt: skip
    return (*forward, *reverse)


class _FunctorchLayer(torch.autograd.Function):
    """The op's autograd again, in Python, for torch.func transforms (grad, vjp, jacrev, vmap), which refuse a
    C++ torch::autograd::Function (csrc/autograd.cpp). Same saved tensors and gradients; vmap runs the op once
    per batch entry (PyTorch's batched fallback)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():  # past the C++ autograd kernel, which would refuse
            return _forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
        out, _, _, gates, cells = output
        ctx.mark_non_differentiable(gates, cells)
        ctx.set_materialize_grads(False)  # as the C++ autograd: no zero gradients for gates and cells
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, gates, cells)
        ctx.reverse = reverse

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
        grads = tuple(torch.zeros_like(like) if grad is None else grad
                      for grad, like in ((grad_output, out), (grad_h_n, h0), (grad_c_n, c0)))  # fmt: skip
        needed = ctx.needs_input_grad[:8]
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            result = _recompute_backward(*grads, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, ctx.reverse,
                                         needed)  # fmt: skip
        else:
            output_mask = [*needed[:5], needed[5] or needed[6], needed[7]]  # one gradient for both biases
            grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = torch.ops.fused_lstm.lstm_layer_backward(
                *grads, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse, b_ih is not None, out, gates, cells,
                output_mask,
            )  # fmt: skip
            result = (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias, grad_w_hr)
        return (*(g if need else None for g, need in zip(result, needed)), None, None)


def _recompute_backward(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, needs_input_grad
):
    """Differentiable gradients of the layer (double backward; csrc/autograd.cpp calls this under
    create_graph=True): the vector-Jacobian product of a recomputation with ATen ops, by torch.func.vjp, which
    autograd records, and which also composes with torch.func transforms around it (torch.autograd.grad on
    the recomputation did not: under torch.func.vjp and jacrev its inputs were not tracked). Empty where not
    needed."""
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
    result = [x.new_empty(0)] * len(inputs)
    if not wanted:
        return result

    def layer(*values):
        args = list(inputs)
        for i, value in zip(wanted, values):
            args[i] = value
        return reference_lstm_layer(*args, batch_sizes=batch_sizes, reverse=reverse)

    _, vjp = torch.func.vjp(layer, *(inputs[i] for i in wanted))
    for i, grad in zip(wanted, vjp((grad_output, grad_h_n, grad_c_n))):
        result[i] = grad
    return result


torch.library.impl("fused_lstm::lstm_layer_recompute_backward", "CompositeImplicitAutograd")(_recompute_backward)


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
