"""The fused layer op against nn.LSTM, one layer and one direction at a time: outputs, states and every gradient."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from fused_lstm.ops import lstm_layer, reference_lstm_layer

# Float64 results agree to rounding; float32 to the accumulated rounding of a few dozen GEMM terms and of
# oneDNN's own float32 kernel (whose results differ from nn.LSTM's native path by ~1e-7).
TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}

I, H, P, T, B = 3, 5, 2, 6, 4
LENGTHS = [6, 4, 4, 1]  # sorted, as pack_padded_sequence(enforce_sorted=True) wants


def direction_weights(lstm, reverse):
    suffix = "_l0_reverse" if reverse else "_l0"
    get = lambda name: getattr(lstm, name + suffix, None)  # noqa: E731
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


def run_both(dtype, bias, proj, reverse, packed, given_state, seed=0):
    """Runs nn.LSTM (bidirectional, to reach the reverse weights) and lstm_layer for one direction on the same
    inputs, backpropagates the same random cotangents through each, and returns both sides' results."""
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(I, H, bias=bias, proj_size=P if proj else 0, bidirectional=True, dtype=dtype)
    out_size = P if proj else H
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, B, out_size, dtype=dtype, requires_grad=True)
    c0 = torch.randn(2, B, H, dtype=dtype, requires_grad=True)
    d = int(reverse)
    weights = direction_weights(lstm, reverse)
    params = [p for p in weights if p is not None]
    inputs = [x, h0, c0] if given_state else [x]

    def results(out, h_n, c_n):
        torch.manual_seed(seed + 1)
        cotangents = [torch.randn_like(t) for t in (out, h_n, c_n)]
        loss = sum((t * g).sum() for t, g in zip((out, h_n, c_n), cotangents))
        return [out.detach(), h_n.detach(), c_n.detach(), *torch.autograd.grad(loss, inputs + params, retain_graph=True)]

    if packed:
        seq = pack_padded_sequence(x, LENGTHS)
        data, batch_sizes = seq.data, seq.batch_sizes
    else:
        seq, data, batch_sizes = x, x, None
    out, (h_n, c_n) = lstm(seq, (h0, c0) if given_state else None)
    out = out.data if packed else out
    torch_results = results(out[..., d * out_size : (d + 1) * out_size], h_n[d], c_n[d])

    h0_d = h0[d] if given_state else torch.zeros(B, out_size, dtype=dtype)
    c0_d = c0[d] if given_state else torch.zeros(B, H, dtype=dtype)
    ours = lstm_layer(data, h0_d, c0_d, *weights, batch_sizes=batch_sizes, reverse=reverse)
    return torch_results, results(*ours)


GRID = list(itertools.product([torch.float64, torch.float32], [True, False], [False, True], [False, True],
                              [False, True], [True, False]))  # fmt: skip


@pytest.mark.parametrize("dtype,bias,proj,reverse,packed,given_state", GRID)
def test_matches_nn_lstm(dtype, bias, proj, reverse, packed, given_state):
    expected, actual = run_both(dtype, bias, proj, reverse, packed, given_state)
    names = ["output", "h_n", "c_n", "grad_x"] + (["grad_h0", "grad_c0"] if given_state else [])
    names += ["grad_w_ih", "grad_w_hh"] + (["grad_b_ih", "grad_b_hh"] if bias else []) + (["grad_w_hr"] if proj else [])
    assert len(names) == len(expected) == len(actual)
    for name, e, a in zip(names, expected, actual):
        torch.testing.assert_close(a, e, **TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_reduced_precision_close_to_float64(dtype, tolerance):
    """Half and bfloat16 run the cell in float; what remains is the rounding of their storage and GEMMs."""
    torch.manual_seed(0)
    args = [torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I) * 0.5,
            torch.randn(4 * H, H) * 0.5, torch.randn(4 * H) * 0.1, torch.randn(4 * H) * 0.1]  # fmt: skip
    expected = lstm_layer(*[a.double() for a in args])
    leaves = [a.to(dtype).requires_grad_() for a in args]
    actual = lstm_layer(*leaves)
    for e, a in zip(expected, actual):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, atol=tolerance, rtol=tolerance)
    sum(t.float().sum() for t in actual).backward()
    assert all(leaf.grad is not None and leaf.grad.dtype == dtype and leaf.grad.isfinite().all() for leaf in leaves)


def gradcheck_inputs(bias, proj, packed):
    torch.manual_seed(0)
    out_size = P if proj else H
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    rows = sum(LENGTHS) if packed else None
    x = make(rows, I) if packed else make(T, B, I)
    return dict(
        x=x, h0=make(B, out_size), c0=make(B, H), w_ih=make(4 * H, I), w_hh=make(4 * H, out_size),
        b_ih=make(4 * H) if bias else None, b_hh=make(4 * H) if bias else None,
        w_hr=make(P, H) if proj else None,
        batch_sizes=torch.tensor([4, 3, 3, 3, 1, 1]) if packed else None,
    )  # fmt: skip


@pytest.mark.parametrize("bias,proj,packed,reverse", list(itertools.product([True, False], repeat=4)))
def test_gradcheck(bias, proj, packed, reverse):
    kwargs = gradcheck_inputs(bias, proj, packed)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def layer(*tensors):
        return lstm_layer(**{**kwargs, **dict(zip(names, tensors))}, reverse=reverse)

    assert torch.autograd.gradcheck(layer, [kwargs[n] for n in names])


@pytest.mark.parametrize("proj,packed", [(False, False), (True, True)])
def test_gradgradcheck(proj, packed):
    kwargs = gradcheck_inputs(True, proj, packed)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def layer(*tensors):
        return lstm_layer(**{**kwargs, **dict(zip(names, tensors))}, reverse=packed)

    assert torch.autograd.gradgradcheck(layer, [kwargs[n] for n in names])


@pytest.mark.parametrize("packed,reverse,proj", list(itertools.product([False, True], repeat=3)))
def test_reference_layer_matches_op(packed, reverse, proj):
    """The differentiable recomputation used for double backward is the same function as the op."""
    kwargs = gradcheck_inputs(True, proj, packed)
    for e, a in zip(reference_lstm_layer(**kwargs, reverse=reverse), lstm_layer(**kwargs, reverse=reverse)):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float64])


def test_zero_batch_and_single_step():
    kwargs = gradcheck_inputs(True, False, False)
    for x, h0, c0 in [(kwargs["x"][:, :0], kwargs["h0"][:0], kwargs["c0"][:0]), (kwargs["x"][:1], kwargs["h0"], kwargs["c0"])]:
        args = {**kwargs, "x": x, "h0": h0, "c0": c0}
        out, h_n, c_n = lstm_layer(**args)
        expected = reference_lstm_layer(**args)
        for e, a in zip(expected, (out, h_n, c_n)):
            torch.testing.assert_close(a, e, **TOLERANCE[torch.float64])
        (out.sum() + h_n.sum() + c_n.sum()).backward()
        assert kwargs["w_ih"].grad is not None and kwargs["w_ih"].grad.isfinite().all()


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_large_batch_matches_nn_lstm(proj, reverse):
    """From 16 rows a dense float32 sequence takes MKL's packed-weight GEMM path on the CPU."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 16, proj_size=4 if proj else 0, bidirectional=True)
    x = torch.randn(5, 20, 8, requires_grad=True)
    out, (h_n, c_n) = lstm(x)
    d, out_size = int(reverse), 4 if proj else 16
    expected = [out[..., d * out_size : (d + 1) * out_size], h_n[d], c_n[d]]
    actual = lstm_layer(x, torch.zeros(20, out_size), torch.zeros(20, 16), *direction_weights(lstm, reverse), reverse=reverse)
    params = [p for p in direction_weights(lstm, reverse) if p is not None]
    grads = [torch.autograd.grad(sum((t * t).sum() for t in ts), [x, *params]) for ts in (expected, actual)]
    for e, a in zip([*expected, *grads[0]], [*actual, *grads[1]], strict=True):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,hidden", [(1, 200), (2, 128), (8, 64), (20, 64), (3, 200)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("steps", [6, 64])
def test_wide_layers_match_nn_lstm(dtype, batch, hidden, packed, steps):
    """Sizes that take each CPU path. With 64 steps the weights are prepared (csrc/cpu/backend.cpp
    steps_to_prepare): the path where threads split the hidden units (up to 2 rows and from 2^16 multiply-adds
    a step), the small-batch kernel, the tiled BLAS past 2 rows (MKL's packed weights at 20 rows; with more
    than one thread and two column tiles, in parallel regions with barriers: steps_with_barriers); hidden
    sizes that are not a multiple of the small-batch kernel's panel width. With 6 steps they are not: every
    step goes to the BLAS, reading W_hh as stored."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, hidden, bidirectional=True, dtype=dtype)
    x = torch.randn(steps, batch, 8, dtype=dtype, requires_grad=True)
    lengths = sorted(torch.randint(1, steps + 1, (batch,)).tolist(), reverse=True)
    lengths[0] = steps
    seq = pack_padded_sequence(x, lengths) if packed else x
    out, (h_n, c_n) = lstm(seq)
    out = out.data if packed else out
    data, batch_sizes = (seq.data, seq.batch_sizes) if packed else (x, None)
    for d in (0, 1):
        expected = [out[..., d * hidden : (d + 1) * hidden], h_n[d], c_n[d]]
        zeros = torch.zeros(batch, hidden, dtype=dtype)
        actual = lstm_layer(data, zeros, zeros, *direction_weights(lstm, bool(d)), batch_sizes=batch_sizes, reverse=bool(d))
        params = [p for p in direction_weights(lstm, bool(d)) if p is not None]
        grads = [torch.autograd.grad(sum((t * t).sum() for t in ts), [x, *params], retain_graph=True) for ts in (expected, actual)]
        for e, a in zip([*expected, *grads[0]], [*actual, *grads[1]], strict=True):
            # Relative to each tensor's scale: over 64 steps a weight or bias gradient sums up to 1280 rows,
            # and its every element carries rounding of that sum's size (float32, B=20: bias gradients up to
            # 145, off by up to 1.2e-4, 8e-7 of their scale, against nn.LSTM's own float32 result).
            tolerance = dict(TOLERANCE[dtype])
            tolerance["atol"] *= max(1.0, e.abs().max().item())
            torch.testing.assert_close(a, e, **tolerance)


def test_op_ignores_autocast():
    """The op computes in its inputs' dtype: autocast must not reach the GEMMs it makes inside."""
    args = gradcheck_inputs(bias=True, proj=True, packed=False)
    args = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    expected = lstm_layer(**args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = lstm_layer(**args)
    for e, a in zip(expected, actual):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, atol=0, rtol=0)


class OpCalls(TorchDispatchMode):
    """Records (op, args, result) of every op dispatched while active (below autograd, so a backward's too)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, out))
        return out


BACKWARD_RESULTS = ["grad_x", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_bias", "grad_w_hr"]


def backward_call(packed):
    """The raw backward op's arguments for a layer with bias and projection, after its forward."""
    kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in gradcheck_inputs(True, True, packed).items()}
    out, h_n, c_n, gates, cells = torch.ops.fused_lstm.lstm_layer_forward(*kwargs.values(), True)
    grads = [torch.randn_like(t) for t in (out, h_n, c_n)]
    names = ["x", "h0", "c0", "w_ih", "w_hh", "w_hr", "batch_sizes"]
    return [*grads, *(kwargs[n] for n in names), True, True, out, gates, cells]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("skipped", [*BACKWARD_RESULTS, "weights", "all"])
def test_backward_computes_what_its_mask_asks_for(packed, skipped):
    """Unwanted results come back as empty placeholders; the wanted ones are the very bits of a full call."""
    args = backward_call(packed)
    off = {"weights": {"grad_w_ih", "grad_w_hh", "grad_bias", "grad_w_hr"}, "all": set(BACKWARD_RESULTS)}.get(skipped, {skipped})
    mask = [name not in off for name in BACKWARD_RESULTS]
    full = torch.ops.fused_lstm.lstm_layer_backward(*args)
    masked = torch.ops.fused_lstm.lstm_layer_backward(*args, mask)
    for name, wanted, f, m in zip(BACKWARD_RESULTS, mask, full, masked, strict=True):
        if wanted:
            assert torch.equal(m, f), name
        else:
            assert m.shape == (0,), name


@pytest.mark.parametrize("frozen", ["x", "weights", "state", "nothing"])
def test_autograd_asks_only_for_the_gradients_its_inputs_need(frozen):
    """Backward's output_mask follows requires_grad (no GEMM for data input or frozen weights), and the
    gradients that are asked for equal those of a call where everything requires grad."""
    kwargs = gradcheck_inputs(True, True, False)
    groups = {"x": ["x"], "weights": ["w_ih", "w_hh", "b_ih", "b_hh", "w_hr"], "state": ["h0", "c0"], "nothing": []}
    expected_grads = torch.autograd.grad(sum(t.sum() for t in lstm_layer(**kwargs)), list(kwargs.values())[:8])
    for name in groups[frozen]:
        kwargs[name] = kwargs[name].detach()
    needing = [name for name in list(kwargs)[:8] if kwargs[name].requires_grad]
    with OpCalls() as calls:
        grads = torch.autograd.grad(sum(t.sum() for t in lstm_layer(**kwargs)), [kwargs[n] for n in needing])
    frozen_results = {"x": {"grad_x"}, "weights": {"grad_w_ih", "grad_w_hh", "grad_bias", "grad_w_hr"},
                      "state": {"grad_h0", "grad_c0"}, "nothing": set()}[frozen]  # fmt: skip
    masks = [list(args[15]) if len(args) > 15 else [True] * 7
             for func, args, _ in calls.calls if func is torch.ops.fused_lstm.lstm_layer_backward.default]  # fmt: skip
    assert masks == [[name not in frozen_results for name in BACKWARD_RESULTS]]
    expected = dict(zip(list(kwargs)[:8], expected_grads))
    for name, grad in zip(needing, grads, strict=True):
        torch.testing.assert_close(grad, expected[name], **TOLERANCE[torch.float64])


@pytest.mark.parametrize("functorch", [False, True])
def test_backward_fills_no_zero_gradients_for_gates_and_cells(functorch):
    """gates [N, 4H] and cells [N, H] get no gradient: autograd must not fill zeros of their size at every
    backward (it did, 2 of the 4 zero tensors of each call). The missing gradients of h_n and c_n, [B, H],
    are made."""
    kwargs = gradcheck_inputs(True, False, False)
    w_ih = kwargs["w_ih"]
    rows = T * B
    if functorch:
        def loss(w):
            return lstm_layer(**{**kwargs, "w_ih": w})[0].sum()

        with OpCalls() as calls:
            grad = torch.func.grad(loss)(w_ih.detach())
    else:
        output, _, _ = lstm_layer(**kwargs)
        with OpCalls() as calls:
            (grad,) = torch.autograd.grad(output.sum(), [w_ih])
    assert grad.shape == w_ih.shape and grad.abs().sum() > 0
    zero_fills = (torch.ops.aten.zero_.default, torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default,
                  torch.ops.aten.fill_.Scalar)  # fmt: skip
    shapes = [tuple(out.shape) for func, _, out in calls.calls if func in zero_fills]
    assert (rows, 4 * H) not in shapes and (rows, H) not in shapes, shapes
    assert shapes.count((B, H)) == 2, shapes
