"""The CUDA backend (skipped without a GPU): parity with nn.LSTM on CUDA and with fused_lstm on the CPU on
every dtype, packed input, device checks, streams, CUDA graph capture and autocast."""

import itertools

import pytest
import torch
from torch import nn

import fused_lstm
from fused_lstm.ops import lstm_layer
from module_cases import Config, assert_same
from test_layer_op import gradcheck_inputs

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


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE))
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
