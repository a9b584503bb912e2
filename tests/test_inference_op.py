"""The inference ops (lstm_layer_inference, lstm_bidirectional_layer_inference): the forward ops' output, h_n and
c_n without what backward needs, for calls that need no gradient; which calls use them; and their refusal of a
call that autograd would record."""

import itertools

import pytest
import torch

import fused_lstm
from fused_lstm.ops import lstm_bidirectional_layer, lstm_layer
from test_bidirectional_op import other_values
from test_layer_op import OpCalls

FORWARD = torch.ops.fused_lstm.lstm_layer_forward.default
INFERENCE = torch.ops.fused_lstm.lstm_layer_inference.default
BIDIRECTIONAL_FORWARD = torch.ops.fused_lstm.lstm_bidirectional_layer_forward.default
BIDIRECTIONAL_INFERENCE = torch.ops.fused_lstm.lstm_bidirectional_layer_inference.default

# On the CPU a float32 call with MKL's packed GEMM (cpu_gemm() "mkl-packed") and gates [N, 4H] of at least four
# windows projects its inputs a window of steps at a time: windows of at least 256 rows and 1 MB of gates
# (CpuBackend::window_rows). At H = 256 a row of gates is 4 KiB, so each window is 256 rows, and the 1600 rows
# here (1240 packed) make several. float64 (and everything without MKL's packing) runs one window however
# large, which runs the forward op's code to the same bits, as does the other shape.
WINDOWS = torch.ops.fused_lstm.cpu_gemm() == "mkl-packed"
needs_windows = pytest.mark.skipif(not WINDOWS, reason="windows need MKL's packed GEMM")
SEVERAL_WINDOWS = dict(steps=100, batch=16, input=24, hidden=256)
ONE_WINDOW = dict(steps=7, batch=3, input=5, hidden=8)


def layer_args(steps, batch, input, hidden, dtype=torch.float32, bias=True, proj=0, packed=False, seed=0):
    """lstm_layer_forward's arguments but `reverse`: x (dense [T, B, I], or packed with lengths from T down),
    h0, c0, the weights and batch_sizes."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: torch.randn(shape, generator=generator, dtype=dtype) * scale  # noqa: E731
    out_size = proj or hidden
    if packed:
        lengths = [max(1, steps - 3 * b) for b in range(batch)]
        batch_sizes = torch.tensor([sum(length > t for length in lengths) for t in range(steps)])
        x = randn(int(batch_sizes.sum()), input)
    else:
        batch_sizes, x = None, randn(steps, batch, input)
    weights = [randn(4 * hidden, input, scale=0.3), randn(4 * hidden, out_size, scale=0.3),
               randn(4 * hidden, scale=0.1) if bias else None, randn(4 * hidden, scale=0.1) if bias else None,
               randn(out_size, hidden, scale=0.3) if proj else None]  # fmt: skip
    return [x, randn(batch, out_size), randn(batch, hidden), *weights, batch_sizes]


def runs_one_window(shape, dtype):
    return shape == "one window" or dtype != torch.float32 or not WINDOWS


def assert_same_results(expected, actual, exact):
    """exact: to the bit. Otherwise to rounding: with several windows, the input projection's GEMM runs in
    other blocks (per window, on packed weights) than the whole sequence's, and sums in another order."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        if exact:
            assert torch.equal(e, a)
        else:
            tolerance = dict(atol=1e-12, rtol=1e-12) if e.dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, e, **tolerance)


GRID = list(itertools.product([torch.float32, torch.float64], [True, False], [0, 96], [False, True], [False, True]))


@pytest.mark.parametrize("dtype,bias,proj,packed,reverse", GRID)
@pytest.mark.parametrize("shape", ["several windows", "one window"])
def test_inference_matches_the_forward_op(dtype, bias, proj, packed, reverse, shape):
    sizes = SEVERAL_WINDOWS if shape == "several windows" else ONE_WINDOW
    args = layer_args(**sizes, dtype=dtype, bias=bias, proj=min(proj, sizes["hidden"] - 1), packed=packed)
    expected = FORWARD(*args, reverse)[:3]
    assert_same_results(expected, INFERENCE(*args, reverse), exact=runs_one_window(shape, dtype))


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_reduced_precision_inference_matches_the_forward_op(dtype, tolerance):
    """float16 and bfloat16 run ATen's GEMMs (AtenInputProjection, one window): the same GEMM as forward's,
    but written into a buffer of its own, which may round the bias addition differently."""
    args = layer_args(**SEVERAL_WINDOWS, dtype=dtype, packed=True)
    for e, a in zip(FORWARD(*args, True)[:3], INFERENCE(*args, True)):
        torch.testing.assert_close(a.float(), e.float(), atol=tolerance, rtol=tolerance)


@needs_windows
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,packed", [(1, False), (2, True)])
@pytest.mark.parametrize("reverse", [False, True])
def test_small_batches_split_over_threads_across_windows(threads, batch, packed, reverse, restore_threads):
    """At B <= 2 and 2 threads the steps of each window run in one parallel region (run_split), which must start
    each window from the state the previous one left, and a sequence that starts mid-window from h0."""
    torch.set_num_threads(threads)
    args = layer_args(steps=1100, batch=batch, input=4, hidden=256, packed=packed)  # 4.3 MiB of gates or more
    assert_same_results(FORWARD(*args, reverse)[:3], INFERENCE(*args, reverse), exact=False)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_inference_does_not_depend_on_the_thread_count(threads, packed, restore_threads):
    x, *forward, batch_sizes = layer_args(**SEVERAL_WINDOWS, packed=packed)
    reverse = [other_values(t, requires_grad=False) for t in forward]
    calls = [lambda: INFERENCE(x, *forward, batch_sizes, False),
             lambda: BIDIRECTIONAL_INFERENCE(x, *forward, *reverse, batch_sizes)]  # both directions at once on 2 threads
    torch.set_num_threads(1)
    expected = [call() for call in calls]
    torch.set_num_threads(threads)
    for call, results in zip(calls, expected):
        assert_same_results(results, call(), exact=True)


@pytest.mark.parametrize("proj,packed", [(0, False), (96, True)])
@pytest.mark.parametrize("shape", ["several windows", "one window"])
def test_bidirectional_inference_matches_the_forward_op(proj, packed, shape):
    sizes = SEVERAL_WINDOWS if shape == "several windows" else ONE_WINDOW
    x, *forward, batch_sizes = layer_args(**sizes, proj=min(proj, sizes["hidden"] - 1), packed=packed)
    reverse = [other_values(t, requires_grad=False) for t in forward]
    expected = BIDIRECTIONAL_FORWARD(x, *forward, *reverse, batch_sizes)
    actual = BIDIRECTIONAL_INFERENCE(x, *forward, *reverse, batch_sizes)
    assert_same_results(expected[0:3] + expected[5:8], actual, exact=runs_one_window(shape, torch.float32))


def test_empty_sequences():
    """No rows (a batch of 0) or no steps: no windows, and the state comes back as given."""
    for x, batch in ((torch.randn(4, 0, 3), 0), (torch.randn(0, 2, 3), 2)):
        h0, c0 = torch.randn(batch, 5), torch.randn(batch, 5)
        args = [x, h0, c0, torch.randn(20, 3), torch.randn(20, 5), None, None, None, None, False]
        assert_same_results(FORWARD(*args)[:3], INFERENCE(*args), exact=True)


def layer_op_calls(module, x, grad):
    with torch.set_grad_enabled(grad), OpCalls() as calls:
        module(x)
    return {func for func, _, _ in calls.calls if func.namespace == "fused_lstm"}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_modules_use_the_inference_op_where_no_gradient_is_needed(bidirectional):
    lstm = fused_lstm.LSTM(3, 5, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(4, 2, 3)
    forward, inference = (BIDIRECTIONAL_FORWARD, BIDIRECTIONAL_INFERENCE) if bidirectional else (FORWARD, INFERENCE)
    assert layer_op_calls(lstm, x, grad=False) == {inference}  # under no_grad
    assert layer_op_calls(lstm, x, grad=True) == {forward}  # the parameters require grad
    lstm.requires_grad_(False)
    assert layer_op_calls(lstm, x, grad=True) == {inference}  # frozen, and x needs no gradient
    assert layer_op_calls(lstm, x.requires_grad_(), grad=True) == {forward}


def test_layer_functions_choose_by_need():
    x, *weights, batch_sizes = layer_args(**ONE_WINDOW)
    with OpCalls() as calls:
        lstm_layer(x, *weights)
        with torch.no_grad():
            lstm_layer(x, *weights[:3], weights[3].detach().requires_grad_(), *weights[4:])
        lstm_bidirectional_layer(x, weights, weights)
        lstm_layer(x.requires_grad_(), *weights)
    assert [func for func, _, _ in calls.calls if func.namespace == "fused_lstm"] == [
        INFERENCE, INFERENCE, BIDIRECTIONAL_INFERENCE, FORWARD
    ]


@pytest.mark.parametrize("op", [INFERENCE, BIDIRECTIONAL_INFERENCE])
def test_a_call_autograd_would_record_is_refused(op):
    x, *weights, batch_sizes = layer_args(**ONE_WINDOW)
    args = [x, *weights, batch_sizes, False] if op is INFERENCE else [x, *weights, *weights, batch_sizes]
    weights[1].requires_grad_()
    with pytest.raises(RuntimeError, match="keeps nothing for backward, but an argument requires grad"):
        op(*args)
    with torch.no_grad():
        assert op(*args)[0].shape == (ONE_WINDOW["steps"], ONE_WINDOW["batch"], ONE_WINDOW["hidden"])


def test_inference_argument_errors_match_the_forward_op():
    args = layer_args(**ONE_WINDOW)
    args[4] = args[4][:, 1:]  # w_hh one column short
    messages = []
    for op in (FORWARD, INFERENCE):
        with pytest.raises(RuntimeError, match="expected w_hh of shape") as error:
            op(*args, False)
        messages.append(str(error.value).splitlines()[0])
    assert messages[0] == messages[1]


def test_forward_mode_ad_takes_the_forward_op():
    """Dual tensors need not require grad, and forward-mode AD runs under no_grad too: lstm_layer must not take
    the inference op, which would drop the tangents, but the forward op, which refuses them (as a C++ autograd
    Function does); the inference op refuses them as well."""
    import torch.autograd.forward_ad as fwAD

    x, *weights, batch_sizes = layer_args(**ONE_WINDOW)
    with fwAD.dual_level(), torch.no_grad():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            lstm_layer(dual, *weights)
        with pytest.raises(RuntimeError, match="does not carry forward-mode AD tangents"):
            INFERENCE(dual, *weights, batch_sizes, False)
