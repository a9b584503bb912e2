"""lstm_bidirectional_layer, both directions of a layer at once: the same results, to the bit, as lstm_layer run
once per direction (which test_layer_op.py checks against nn.LSTM), its gradients, and its errors."""

import itertools
import re

import pytest
import torch

from fused_lstm.ops import directions_one_after_the_other, lstm_bidirectional_layer
from test_layer_op import OpCalls, gradcheck_inputs
from test_op_errors import good_args, on_meta

DIRECTION_ARGS = ["h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]


def other_values(t, requires_grad=True):
    """A leaf shaped like t with other values (the reverse direction's, made from the forward one's); None for None."""
    return None if t is None else (t.detach() * 0.8 + 0.1).requires_grad_(requires_grad)


def bidirectional_inputs(bias, proj, packed, bias_reverse=None):
    """x, batch_sizes and each direction's (h0, ..., w_hr), all float64 leaves; the reverse direction's values
    differ from the forward one's, and it has a bias where bias_reverse (default: bias) says."""
    forward = gradcheck_inputs(bias, proj, packed)
    reverse = gradcheck_inputs(bias if bias_reverse is None else bias_reverse, proj, packed)
    return (forward["x"], forward["batch_sizes"], tuple(forward[n] for n in DIRECTION_ARGS),
            tuple(other_values(reverse[n]) for n in DIRECTION_ARGS))  # fmt: skip


def leaves(x, forward, reverse):
    return [t for t in (x, *forward, *reverse) if t is not None and t.requires_grad]


def results_and_gradients(layer_pair, x, batch_sizes, forward, reverse):
    """Both directions' outputs and states, and the gradients of every leaf for fixed random cotangents."""
    results = [t for direction in layer_pair(x, forward, reverse, batch_sizes) for t in direction]
    generator = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in results)
    return results, torch.autograd.grad(loss, leaves(x, forward, reverse))


CASES = [(bias, proj, packed, bias) for bias, proj, packed in itertools.product([True, False], repeat=3)]
CASES += [(True, False, False, False), (False, True, True, True)]  # a bias in one direction only


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias,proj,packed,bias_reverse", CASES)
def test_same_results_as_directions_one_after_the_other(bias, proj, packed, bias_reverse, threads, restore_threads):
    """Bit for bit: each direction runs the same code, on a thread of its own with 2 threads, one after the
    other with 1 or 3 (CpuBackend::concurrently)."""
    torch.set_num_threads(threads)
    x, batch_sizes, forward, reverse = bidirectional_inputs(bias, proj, packed, bias_reverse)
    expected, expected_grads = results_and_gradients(directions_one_after_the_other, x, batch_sizes, forward, reverse)
    actual, grads = results_and_gradients(lstm_bidirectional_layer, x, batch_sizes, forward, reverse)
    assert len(grads) == len(expected_grads) == 1 + 7 * 2 - (not bias) * 2 - (not bias_reverse) * 2 - (not proj) * 2
    for e, a in zip(expected + list(expected_grads), actual + list(grads), strict=True):
        assert torch.equal(e, a)


@pytest.mark.parametrize("float32", [False, True])
def test_same_results_at_sizes_that_split_the_work(float32, restore_threads):
    """At sizes where each direction's steps go through the BLAS in tiles (B = 16), or through the small-batch
    kernel split over threads (B = 1): each direction alone on one thread computes the same outputs. With a
    W_hh too large to run both forwards at once (H = 512 in float32, CpuBackend::forwards_at_once), backward
    still does. Gradients agree to rounding, not to the bit: the whole-sequence GEMMs of backward (x's
    gradient, [N, 4H] x [4H, I], and the weights') are MKL's, which splits long sums over the threads it has,
    one thread in each direction's task against two for a direction alone."""
    torch.set_num_threads(2)
    dtype = torch.float32 if float32 else torch.float64
    for steps, batch, hidden in [(20, 16, 96), (40, 1, 128), (3, 2, 512)]:
        torch.manual_seed(batch)
        make = lambda *shape: (torch.randn(*shape, dtype=dtype) * 0.3).requires_grad_()  # noqa: E731
        x = make(steps, batch, 24)
        forward, reverse = [(make(batch, hidden), make(batch, hidden), make(4 * hidden, 24), make(4 * hidden, hidden),
                             make(4 * hidden), make(4 * hidden), None) for _ in range(2)]  # fmt: skip
        expected, expected_grads = results_and_gradients(directions_one_after_the_other, x, None, forward, reverse)
        actual, grads = results_and_gradients(lstm_bidirectional_layer, x, None, forward, reverse)
        for e, a in zip(expected, actual, strict=True):
            assert torch.equal(e, a)
        rounding = 1e-6 if float32 else 1e-13  # of each gradient's scale
        for e, a in zip(expected_grads, grads, strict=True):
            assert (a - e).abs().max() <= rounding * e.abs().max()


def test_gates_and_cells_are_not_differentiable():
    """Of the forward op's ten results, both directions' gates and cells (3, 4, 8, 9) have no gradient."""
    x, batch_sizes, forward, reverse = bidirectional_inputs(True, True, True)
    results = torch.ops.fused_lstm.lstm_bidirectional_layer_forward(x, *forward, *reverse, batch_sizes)
    assert [t.requires_grad for t in results] == [True, True, True, False, False] * 2


@pytest.mark.parametrize("frozen", ["x", "forward direction", "reverse weights", "everything but w_hh_reverse",
                                    "x and the reverse direction"])
def test_asks_only_for_the_gradients_its_inputs_need(frozen):
    x, batch_sizes, forward, reverse = bidirectional_inputs(True, True, False)
    detach = lambda ts, keep=(): tuple(t if i in keep else t.detach() for i, t in enumerate(ts))  # noqa: E731
    if frozen == "x":
        x = x.detach()
    elif frozen == "forward direction":
        forward = detach(forward)
    elif frozen == "reverse weights":
        reverse = detach(reverse, keep=(0, 1))
    elif frozen == "x and the reverse direction":  # nothing to compute there: an all-false mask
        x, reverse = x.detach(), detach(reverse)
    else:
        x, forward, reverse = x.detach(), detach(forward), detach(reverse, keep=(3,))
    _, expected = results_and_gradients(directions_one_after_the_other, x, batch_sizes, forward, reverse)
    with OpCalls() as calls:
        _, grads = results_and_gradients(lstm_bidirectional_layer, x, batch_sizes, forward, reverse)
    for e, a in zip(expected, grads, strict=True):
        assert torch.equal(e, a)
    backward = torch.ops.fused_lstm.lstm_bidirectional_layer_backward.default
    given = lambda args, i: list(args[i]) if len(args) > i else [True] * 7  # noqa: E731  (defaults go unrecorded)
    masks = [(given(args, 26), given(args, 27)) for func, args, _ in calls.calls if func is backward]

    def mask(direction):  # x, h0, c0, w_ih, w_hh, the bias, w_hr
        needs = [t.requires_grad for t in direction]
        return [x.requires_grad, *needs[:4], needs[4] or needs[5], needs[6]]

    assert masks == [(mask(forward), mask(reverse))]


@pytest.mark.parametrize("bias,proj,packed", [(True, False, False), (False, True, True), (True, True, True)])
def test_gradcheck(bias, proj, packed):
    x, batch_sizes, forward, reverse = bidirectional_inputs(bias, proj, packed)
    inputs = leaves(x, forward, reverse)

    def layer(*tensors):
        values = iter(tensors)
        x_, forward_, reverse_ = [tuple(None if t is None else next(values) for t in ts) for ts in ((x,), forward, reverse)]
        return [t for direction in lstm_bidirectional_layer(x_[0], forward_, reverse_, batch_sizes) for t in direction]

    assert torch.autograd.gradcheck(layer, inputs)
    if packed and proj and bias:
        assert torch.autograd.gradgradcheck(layer, inputs)


def test_under_torch_func_transforms():
    """torch.func refuses the C++ autograd node: the directions then run one at a time. torch.func.grad runs
    backward with create_graph, so through the recomputation of double backward: equal to rounding."""
    x, batch_sizes, forward, reverse = bidirectional_inputs(True, False, True)
    _, expected = results_and_gradients(directions_one_after_the_other, x, batch_sizes, forward, reverse)

    def loss(w_hh_reverse):
        reverse_ = (*reverse[:3], w_hh_reverse, *reverse[4:])
        (out, _, _), (out_r, _, _) = lstm_bidirectional_layer(x, forward, reverse_, batch_sizes)
        return (out * out_r).sum()

    w = reverse[3].detach()
    grad = torch.func.grad(loss)(w)
    w.requires_grad_()
    (expected,) = torch.autograd.grad(loss(w), [w])
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10)


def bidirectional_args(reverse_overrides=(), **forward_overrides):
    """The raw forward op's arguments: good_args (test_op_errors.py) for the forward direction, a copy for the
    reverse one, each with its overrides."""
    forward = good_args(**forward_overrides)
    reverse = good_args(**dict(reverse_overrides))
    return [forward["x"], *(forward[n] for n in DIRECTION_ARGS), *(reverse[n] for n in DIRECTION_ARGS),
            forward["batch_sizes"]]


ERROR_CASES = {
    "forward w_hh": (bidirectional_args(w_hh=torch.randn(20, 6)), "expected w_hh of shape [20, 5], got [20, 6]", False),
    "reverse w_hh": (bidirectional_args({"w_hh": torch.randn(20, 6)}), "expected w_hh of shape [20, 5], got [20, 6]", True),
    "reverse h0 dtype": (bidirectional_args({"h0": torch.randn(2, 5, dtype=torch.float64)}), "h0 has dtype Double but x has dtype Float", True),
    "both directions": (bidirectional_args({"c0": torch.randn(2, 6)}, w_ih=torch.randn(20, 4)), "expected w_ih of shape [20, 3], got [20, 4]", False),
}  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", ERROR_CASES)
def test_forward_rejects_and_names_the_direction(case, device, threads, restore_threads):
    """The forward direction's error first; one in the reverse direction's arguments says so. On the CPU the
    directions may run on two threads, and an error thrown on either reaches the caller."""
    torch.set_num_threads(threads)
    args, message, in_reverse = ERROR_CASES[case]
    if device == "meta":
        args = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in args]
    with pytest.raises(RuntimeError, match=re.escape(message)) as error:
        torch.ops.fused_lstm.lstm_bidirectional_layer_forward(*args)
    context = " (fused_lstm: in the reverse direction's arguments)"
    assert str(error.value).splitlines()[0] == f"fused_lstm: {message}{context if in_reverse else ''}"


def bidirectional_backward_args(**reverse_overrides):
    args = bidirectional_args()
    results = torch.ops.fused_lstm.lstm_bidirectional_layer_forward(*args)
    x, forward, reverse, batch_sizes = args[0], args[1:8], args[8:15], args[15]
    backward = dict(
        grad_output=torch.ones_like(results[0]), grad_h_n=torch.ones_like(results[1]), grad_c_n=torch.ones_like(results[2]),
        grad_output_reverse=torch.ones_like(results[5]), grad_h_n_reverse=torch.ones_like(results[6]),
        grad_c_n_reverse=torch.ones_like(results[7]), x=x, h0=forward[0], c0=forward[1], w_ih=forward[2], w_hh=forward[3],
        w_hr=forward[6], h0_reverse=reverse[0], c0_reverse=reverse[1], w_ih_reverse=reverse[2], w_hh_reverse=reverse[3],
        w_hr_reverse=reverse[6], batch_sizes=batch_sizes, has_bias=True, has_bias_reverse=True, output=results[0],
        gates=results[3], cells=results[4], output_reverse=results[5], gates_reverse=results[8], cells_reverse=results[9],
    )  # fmt: skip
    backward.update(reverse_overrides)
    return backward


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_rejects_and_names_the_direction(device):
    args = bidirectional_backward_args(gates_reverse=torch.ones(7, 20))
    if device == "meta":
        args = on_meta(args)
    with pytest.raises(RuntimeError, match=re.escape("expected gates of shape [8, 20], got [7, 20]")) as error:
        torch.ops.fused_lstm.lstm_bidirectional_layer_backward(**args)
    assert "in the reverse direction's arguments" in str(error.value)


def test_good_backward_args_are_accepted():
    """The backward error case above differs from these arguments only in the named way."""
    results = torch.ops.fused_lstm.lstm_bidirectional_layer_backward(**bidirectional_backward_args())
    assert [tuple(t.shape) for t in results[:7]] == [(4, 2, 3), (2, 5), (2, 5), (20, 3), (20, 5), (20,), (0,)]
    assert [tuple(t.shape) for t in results[7:]] == [tuple(t.shape) for t in results[:7]]
