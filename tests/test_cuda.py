"""The CUDA backend (skipped without a GPU): parity with nn.LSTM on CUDA and with fused_lstm on the CPU on
every dtype, packed input, device checks, streams, CUDA graph capture and autocast."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm.ops import lstm_layer
from module_cases import TOLERANCE, Config, assert_same, make_inputs, make_pair
from test_layer_op import OpCalls, gradcheck_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Against float64 on the CPU: the storage and GEMM rounding of each dtype (the cell math runs in float).
DTYPE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN's RNN and cuBLAS may use TF32 for float32 by default; the parity tolerances assume float32.
    (Not cudnn.flags(): its `enabled` defaults to False, which would take cuDNN out of every reference.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# nn.LSTM on CUDA runs cuDNN, or its native path where cuDNN is disabled: both are references.
CUDNN = pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "native"])


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=str)  # ids "torch.float32": gpu_check.sh picks by them
@pytest.mark.parametrize("proj,packed,reverse", list(itertools.product([False, True], repeat=3)))
def test_layer_matches_cpu_float64(dtype, proj, packed, reverse):
    # The reference starts from the inputs rounded to `dtype`, so only the arithmetic's rounding is compared.
    kwargs = {k: (v.detach().to(dtype).double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in gradcheck_inputs(True, proj, packed).items()}  # fmt: skip
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    expected_out = lstm_layer(**kwargs, reverse=reverse)
    expected_grads = torch.autograd.grad(sum(t.sum() for t in expected_out), [kwargs[n] for n in names])
    on_gpu = {k: (v.detach().to("cuda", dtype).requires_grad_() if k in names else v) for k, v in kwargs.items()}
    actual_out = lstm_layer(**on_gpu, reverse=reverse)
    actual_grads = torch.autograd.grad(sum(t.float().sum() for t in actual_out), [on_gpu[n] for n in names])
    tol = DTYPE_TOLERANCE[dtype]
    for e, a in zip([*expected_out, *expected_grads], [*actual_out, *actual_grads], strict=True):
        assert a.device.type == "cuda" and a.dtype == dtype
        # Scaled: a gradient summed over many steps and rows is as large as its terms' sum, not as one term.
        torch.testing.assert_close(a.double().cpu(), e, atol=tol * max(1.0, e.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("cfg", [
    Config(device="cuda", dtype=torch.float64, num_layers=2, bidirectional=True, kind=kind, proj_size=proj)
    for kind, proj in itertools.product(["dense", "unbatched", "packed", "packed_unsorted"], [0, 2])
] + [Config(device="cuda", dtype=torch.float32, num_layers=2, batch_first=True, bidirectional=True)], ids=str)  # fmt: skip
@CUDNN
def test_module_matches_nn_lstm_on_cuda(cfg, cudnn):
    tolerance = dict(atol=1e-4, rtol=1e-4) if cfg.dtype == torch.float32 else None  # cuDNN's own float32 order
    with torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=False):
        assert_same(cfg, tolerance=tolerance)


def test_device_mismatch_errors_match_nn_lstm():
    torch.manual_seed(0)
    ref, ours = nn.LSTM(3, 5).cuda(), fused_lstm.LSTM(3, 5).cuda()
    x = torch.randn(4, 2, 3, device="cuda")
    hx = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))  # on the CPU
    messages = []
    for m in (ref, ours):
        with pytest.raises(RuntimeError) as error:
            m(x, hx)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    with pytest.raises(RuntimeError, match="is on device cpu but x is on device cuda"):
        lstm_layer(x[:, :, :3], hx[0][0], hx[1][0], *[w.cuda() for w in (torch.randn(20, 3), torch.randn(20, 5))])


def test_non_default_stream_gives_the_same_result():
    torch.manual_seed(0)
    m = fused_lstm.LSTM(8, 16, num_layers=2).cuda()
    x = torch.randn(20, 4, 8, device="cuda")
    expected, _ = m(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual, _ = m(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_cuda_graph_capture_and_replay(packed):
    torch.manual_seed(0)
    m = fused_lstm.LSTM(8, 16, bidirectional=True).cuda().eval()
    static_x = torch.randn(10, 3, 8, device="cuda")
    lengths = [10, 7, 2]

    def run():
        inp = torch.nn.utils.rnn.pack_padded_sequence(static_x, lengths) if packed else static_x
        out, (h, _) = m(inp)
        return (out.data if packed else out), h

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        run()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out, static_h = run()
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    with torch.no_grad():
        expected_out, expected_h = run()
    torch.testing.assert_close(static_out, expected_out)
    torch.testing.assert_close(static_h, expected_h)


@CUDNN
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_autocast_dtypes_match_nn_lstm(cudnn, autocast_dtype, model_dtype):
    torch.manual_seed(0)
    ref = nn.LSTM(8, 16, dtype=model_dtype, device="cuda")
    ours = fused_lstm.LSTM(8, 16, dtype=model_dtype, device="cuda")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 8, device="cuda", dtype=model_dtype)
    with torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=False), torch.autocast("cuda", dtype=autocast_dtype):
        expected, (eh, ec) = ref(x)
        actual, (ah, ac) = ours(x)
    assert (actual.dtype, ah.dtype, ac.dtype) == (expected.dtype, eh.dtype, ec.dtype)
    # bfloat16 keeps 8 bits of mantissa (~4e-3 relative a rounding), and the two sides round at different
    # points; float16 alone would pass 1e-2.
    torch.testing.assert_close(actual.double(), expected.double(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hx_dtype", [None, torch.float32], ids=["no hx", "float32 hx"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16], ids=str)
def test_autocast_lstm_cell_dtypes_match_nn_lstm_cell(input_dtype, hx_dtype, autocast_dtype):
    """CUDA autocast casts lstm_cell's every floating argument but float64, hx included, to its dtype: the
    results come back in that dtype, even from float32 input and a float32 hx (the CPU's rule promotes to c_0's
    dtype, and once did here too)."""
    torch.manual_seed(0)
    ref = nn.LSTMCell(8, 16, device="cuda")
    ours = fused_lstm.LSTMCell(8, 16, device="cuda")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, device="cuda", dtype=input_dtype)
    hx = None if hx_dtype is None else tuple(torch.randn(2, 16, device="cuda", dtype=hx_dtype) for _ in range(2))
    with torch.autocast("cuda", dtype=autocast_dtype):
        expected, actual = ref(x, hx), ours(x, hx)
    assert expected[0].dtype == autocast_dtype  # the premise: nn.LSTMCell's results are autocast's dtype
    for e, a in zip(expected, actual):
        assert a.dtype == e.dtype
        # One step from the same rounded inputs: a few roundings of bfloat16 (~4e-3 each) at most.
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_input_device_not_the_current_one():
    torch.manual_seed(0)
    m = fused_lstm.LSTM(8, 16).to("cuda:1")
    x = torch.randn(5, 2, 8, device="cuda:1")
    with torch.cuda.device(0):
        actual, (h, _) = m(x)
    expected, _ = m.cpu()(x.cpu())
    assert actual.device == h.device == torch.device("cuda:1")
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("proj,packed", [(False, False), (True, True)])
def test_gradcheck_on_cuda(proj, packed):
    kwargs = {k: (v.detach().cuda().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in gradcheck_inputs(True, proj, packed).items()}  # fmt: skip
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def layer(*tensors):
        return lstm_layer(**{**kwargs, **dict(zip(names, tensors))}, reverse=packed)

    assert torch.autograd.gradcheck(layer, [kwargs[n] for n in names])


# What the tests above miss. Each is small: they run first in benchmarks/gpu_check.sh, on a GPU held for minutes.

INFERENCE_OPS = {torch.ops.fused_lstm.lstm_layer_inference.default,
                 torch.ops.fused_lstm.lstm_bidirectional_layer_inference.default}  # fmt: skip
FORWARD_OPS = {torch.ops.fused_lstm.lstm_layer_forward.default,
               torch.ops.fused_lstm.lstm_bidirectional_layer_forward.default}  # fmt: skip


def outputs(result, packed):
    """output (a PackedSequence's data), h_n and c_n of a module's result."""
    output, (h_n, c_n) = result
    return [output.data if packed else output, h_n, c_n]


@pytest.mark.parametrize("cfg", [
    Config(device="cuda", num_layers=2, bidirectional=True, proj_size=2),
    Config(device="cuda", num_layers=2, kind="packed_unsorted"),
    Config(device="cuda", bias=False, bidirectional=True),
], ids=str)  # fmt: skip
@CUDNN
def test_inference_op_matches_nn_lstm_under_no_grad(cfg, cudnn):
    """Under no_grad the module runs the inference ops, whose CUDA input projection (AtenInputProjection, an
    addmm_out or mm_out into a reused buffer) is not the forward op's; the graph-capture test compares it only
    with itself. Float64, so the two agree to rounding."""
    ref, ours = make_pair(cfg)
    inp, _, hx = make_inputs(cfg)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=False):
        expected = ref(inp, hx)
        with OpCalls() as calls:
            actual = ours(inp, hx)
    ran = {func for func, _, _ in calls.calls}
    assert ran & INFERENCE_OPS and not ran & FORWARD_OPS, ran
    packed = cfg.kind.startswith("packed")
    for name, e, a in zip(["output", "h_n", "c_n"], outputs(expected, packed), outputs(actual, packed)):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float64], msg=lambda m: f"{name}: {m}")


def test_grid_of_more_than_one_pass_matches_cpu_float64():
    """A step's grid is capped at 8 blocks of 256 threads per multiprocessor (kernels.cu blocks_for); past that
    each thread takes more than one element (grid-stride). B = 512 at H = 257 is one pass on an H100 (132 SMs:
    270,336 threads for 131,584 elements), so B is chosen from this GPU for at least two passes. H = 257 is
    odd (rows start unaligned), with projection; forward and backward against the CPU in float64."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    steps, inputs, hidden, proj = 2, 16, 257, 100
    batch = 2 * (sms * 8 * 256) // hidden + 1
    assert batch * hidden > 2 * sms * 8 * 256
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape, scale=1.0: (torch.randn(shape, generator=generator, dtype=torch.float64) * scale)  # noqa: E731
    args = dict(x=randn(steps, batch, inputs), h0=randn(batch, proj), c0=randn(batch, hidden),
                w_ih=randn(4 * hidden, inputs, scale=0.3), w_hh=randn(4 * hidden, proj, scale=0.1),
                b_ih=randn(4 * hidden, scale=0.1), b_hh=randn(4 * hidden, scale=0.1),
                w_hr=randn(proj, hidden, scale=0.1))  # fmt: skip
    on_cpu = {k: v.requires_grad_() for k, v in args.items()}
    on_gpu = {k: v.detach().cuda().requires_grad_() for k, v in args.items()}
    expected_out = lstm_layer(**on_cpu)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in expected_out]
    expected = [*expected_out, *torch.autograd.grad(expected_out, list(on_cpu.values()), cotangents)]
    actual_out = lstm_layer(**on_gpu)
    actual = [*actual_out, *torch.autograd.grad(actual_out, list(on_gpu.values()), [c.cuda() for c in cotangents])]
    names = ["output", "h_n", "c_n", *(f"grad_{k}" for k in args)]
    for name, e, a in zip(names, expected, actual, strict=True):
        # float64 both sides: rounding alone, scaled for the gradients' sums over thousands of rows.
        torch.testing.assert_close(a.detach().cpu(), e.detach(), atol=1e-10 * max(1.0, e.abs().max().item()),
                                   rtol=1e-10, msg=lambda m: f"{name}: {m}")  # fmt: skip


@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference op", "forward op"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_long_sequence_as_accurate_as_cudnn(dtype, needs_grad):
    """200 steps in float16 / bfloat16 against float64 from the same rounded inputs and weights, beside cuDNN's
    own error. fused_lstm stores x W_ih^T + b in the gates buffer in x's dtype, so each step's pre-activation is
    rounded twice (before and after h W_hh^T is added), and c_t is stored in that dtype between steps: it may
    be less accurate than a kernel that keeps float32 inside. Run on the CPU (same path: ATen GEMMs on per-step
    views, the cell in float), this size measured 1.1-2.0x the error of float32 all through (only the final
    rounding, the best any half-precision LSTM can do; cuDNN's is at least that): 3x cuDNN's error allows
    that and no more. Alone, the error must also stay within 4 eps of the dtype: the values are below 1, and a
    wrong gate or step is off by 0.1 or more, against 0.4 eps measured."""
    torch.manual_seed(0)
    steps, batch, size = 200, 8, 64
    cudnn_lstm = nn.LSTM(size, size, device="cuda", dtype=dtype)
    ours = fused_lstm.LSTM(size, size, device="cuda", dtype=dtype)
    ours.load_state_dict(cudnn_lstm.state_dict())
    truth = nn.LSTM(size, size, dtype=torch.float64)
    truth.load_state_dict(cudnn_lstm.state_dict())  # the rounded weights, exactly
    x = torch.randn(steps, batch, size, device="cuda").to(dtype)
    with torch.set_grad_enabled(needs_grad), torch.backends.cudnn.flags(enabled=True):
        theirs, actual = outputs(cudnn_lstm(x), False), outputs(ours(x), False)
    with torch.no_grad():
        expected = outputs(truth(x.double().cpu()), False)
    eps = torch.finfo(dtype).eps
    for name, e, c, a in zip(["output", "h_n", "c_n"], expected, theirs, actual):
        assert a.dtype == dtype and a.requires_grad == needs_grad, name
        error_cudnn = (c.detach().double().cpu() - e).abs().max().item()
        error = (a.detach().double().cpu() - e).abs().max().item()
        assert error <= 3 * error_cudnn and error <= 4 * eps, f"{name}: {error:.2e} against cuDNN's {error_cudnn:.2e}"


def test_backward_on_a_side_stream_waits_for_its_inputs():
    """Forward and backward with a side stream current, each after a sleep of tens of milliseconds queued on
    it: every kernel (ours and the GEMMs) must run on the current stream, since one on another stream would
    read x or the incoming gradient before the side stream has written them (autograd runs each backward on
    its forward's stream). Compared with the same computation on the default stream."""
    torch.manual_seed(0)
    m = fused_lstm.LSTM(8, 16, num_layers=2, proj_size=4).cuda()
    x = torch.randn(30, 4, 8, device="cuda")
    weights = torch.randn(30, 4, 4, device="cuda")

    def output_and_grads(sleep_cycles):
        torch.cuda._sleep(sleep_cycles)
        inp = (x * 1).requires_grad_()  # written on the current stream, after the sleep
        out, (h, c) = m(inp)
        torch.cuda._sleep(sleep_cycles)
        loss = (out * weights).sum() + h.sum() + c.sum()
        return [out, *torch.autograd.grad(loss, [inp, *m.parameters()])]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        actual = output_and_grads(50_000_000)  # cycles: tens of milliseconds
    torch.cuda.current_stream().wait_stream(side)
    expected = output_and_grads(0)
    for e, a in zip(expected, actual, strict=True):
        # Not to the bit: cuBLAS may pick other kernels while two streams are active (its reproducibility
        # note). A kernel that raced the sleep would be off by the values' own size.
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    Config(device="cuda", bias=False, num_layers=2, bidirectional=True, proj_size=2),
    Config(device="cuda", bias=False, kind="packed"),
], ids=str)  # fmt: skip
@CUDNN
def test_bias_false_matches_nn_lstm(cfg, cudnn):
    """Without biases the input projection is an mm (aten_input_gates) and backward sums no grad_bias: forward
    and every gradient in float64 (the inference op's no-bias path is in the inference test above)."""
    with torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=False):
        assert_same(cfg)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_no_host_sync_in_a_training_step_or_inference(packed):
    """Under torch.cuda.set_sync_debug_mode("error") any call that waits for the GPU raises (.item(), a
    device-to-host copy, a stream synchronize): a training step (dropout, projection, both directions), an
    inference call and an LSTMCell step must only queue work, with no sync per step. The inputs are made
    before (packing copies indices to the GPU); the mode is restored after, and the results are those of the
    same calls outside it."""
    m = fused_lstm.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4, dropout=0.5).cuda()
    cell = fused_lstm.LSTMCell(8, 16).cuda()
    x = torch.randn(12, 3, 8, device="cuda", requires_grad=True)
    inp = pack_padded_sequence(x, [12, 7, 2]) if packed else x

    def run():
        torch.manual_seed(1)  # the same dropout masks each time
        out, (h, c) = m(inp)
        loss = (out.data if packed else out).sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [x, *m.parameters()])
        with torch.no_grad():
            inference = outputs(m(inp), packed)
        return [*grads, *inference, *cell(x[0])]

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
            x.sum().item()  # the mode is on
        actual = run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.cuda.get_sync_debug_mode() == previous
    for e, a in zip(run(), actual, strict=True):
        torch.testing.assert_close(a, e)
