"""Everything that works on an nn.LSTM / nn.LSTMCell keeps working on the fused classes."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import fused_lstm
from module_cases import TOLERANCE

KW = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)


def pair(**kwargs):
    kwargs = {**KW, **kwargs}
    torch.manual_seed(0)
    ref = nn.LSTM(**kwargs)
    torch.manual_seed(0)
    ours = fused_lstm.LSTM(**kwargs)
    return ref, ours


def assert_outputs_equal(a, b, x=None, hx=None):
    x = torch.randn(4, 2, a.input_size, dtype=a.weight_ih_l0.dtype) if x is None else x
    out_a, (h_a, c_a) = a(x, hx)
    out_b, (h_b, c_b) = b(x, hx)
    for e, actual in ((out_a, out_b), (h_a, h_b), (c_a, c_b)):
        torch.testing.assert_close(actual, e, **TOLERANCE[x.dtype])


def test_is_an_nn_lstm_with_identical_init_parameters_and_repr():
    ref, ours = pair()
    assert isinstance(ours, nn.LSTM) and isinstance(fused_lstm.LSTMCell(3, 4), nn.LSTMCell)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(p, q)  # same RNG draws in the same order
    assert repr(ours) == repr(ref)
    assert ours._flat_weights_names == ref._flat_weights_names


def test_state_dict_both_ways_and_assign():
    ref, ours = pair()
    ours.load_state_dict(ref.state_dict())
    assert_outputs_equal(ref, ours)
    ref2 = nn.LSTM(**KW)
    ref2.load_state_dict(ours.state_dict())
    assert_outputs_equal(ref2, ours)
    fresh = fused_lstm.LSTM(**KW)
    fresh.load_state_dict(ref.state_dict(), assign=True)
    assert fresh._flat_weights[0] is fresh.weight_ih_l0
    assert_outputs_equal(ref, fresh)
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "bias_ih_l0"'):
        fused_lstm.LSTM(3, 5, bias=False).load_state_dict(nn.LSTM(3, 5).state_dict())


def test_pickle_deepcopy_and_torch_save():
    """pickle and deepcopy keep the fused class; torch.save writes nn.LSTM (test_deploy.py says why), which
    fused_lstm.convert makes fused again."""
    _, ours = pair()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert type(saved) is nn.LSTM
    for copied in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), fused_lstm.convert(saved)):
        assert type(copied) is fused_lstm.LSTM
        assert_outputs_equal(ours, copied)
        assert copied._flat_weights[0] is copied.weight_ih_l0


def test_dtype_conversion_and_meta_construction():
    ref, ours = pair()
    ref.double()
    ours.double()
    assert ours._flat_weights[0].dtype == torch.float64
    assert_outputs_equal(ref, ours)
    meta = fused_lstm.LSTM(**KW, device="meta")
    out, (h, c) = meta(torch.randn(4, 2, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 2, 4) and h.shape == (4, 2, 2) and c.shape == (4, 2, 5)


def test_functional_call_uses_the_given_parameters():
    _, ours = pair()
    zeros = {name: torch.zeros_like(p) for name, p in ours.named_parameters()}
    out, (h, c) = functional_call(ours, zeros, (torch.randn(4, 2, 3),))
    assert out.abs().max() == 0 and h.abs().max() == 0 and c.abs().max() == 0
    out_again, _ = ours(torch.ones(4, 2, 3))
    assert out_again.abs().max() > 0


def test_weight_norm_and_parametrization():
    ref, ours = pair(num_layers=1, bidirectional=False, proj_size=0)
    for m in (ref, ours):
        torch.nn.utils.weight_norm(m, name="weight_ih_l0")
    ours.load_state_dict(ref.state_dict())
    assert_outputs_equal(ref, ours)
    for m in (ref, ours):
        torch.nn.utils.remove_weight_norm(m, name="weight_ih_l0")
        parametrize.register_parametrization(m, "weight_hh_l0", _Doubled())
    assert_outputs_equal(ref, ours)
    x = torch.randn(4, 2, 3)
    ours(x)[0].sum().backward()
    assert ours.parametrizations.weight_hh_l0.original.grad is not None


def test_cell_reads_parametrized_and_functional_weights():
    """LSTMCell reads its weights from _parameters where they are there: a parametrization (computed by
    getattr) and functional_call (swapped in) must still reach the op."""
    torch.manual_seed(0)
    ref, ours = nn.LSTMCell(3, 5), fused_lstm.LSTMCell(3, 5)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight_hh", _Doubled())
    x, hx = torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5))
    for expected, actual in zip(ref(x, hx), ours(x, hx)):
        torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    zeros = {name: torch.zeros_like(p) for name, p in ours.named_parameters()}
    h, c = functional_call(ours, zeros, (x,))
    assert h.abs().max() == 0 and c.abs().max() == 0


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_dropout_and_training_changed_after_construction():
    ref, ours = pair(proj_size=0)
    x = torch.randn(4, 2, 3)
    for dropout, training in [(0.5, True), (0.5, False), (0.0, True), (1.0, True)]:
        for m in (ref, ours):
            m.dropout = dropout
            m.train(training)
        torch.manual_seed(3)
        expected = ref(x)[0]
        torch.manual_seed(3)
        torch.testing.assert_close(ours(x)[0], expected, **TOLERANCE[torch.float32])


def test_backward_in_eval_and_under_no_grad():
    _, ours = pair()
    ours.eval()
    x = torch.randn(4, 2, 3, requires_grad=True)
    out, (h, c) = ours(x)
    h.sum().backward()  # through h_n alone
    assert x.grad is not None and ours.weight_hh_l1.grad is not None
    with torch.no_grad():
        out, (h, c) = ours(x)
    assert not (out.requires_grad or h.requires_grad or c.requires_grad)
    for p in ours.parameters():
        p.requires_grad_(False)
    out, (h, c) = ours(x)
    assert out.requires_grad and h.requires_grad and c.requires_grad


def test_zero_batch():
    ref, ours = pair()
    x = torch.randn(4, 0, 3, requires_grad=True)
    out, (h, c) = ours(x)
    assert out.shape == (4, 0, 4) and h.shape == (4, 0, 2) and c.shape == (4, 0, 5)
    (out.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj", [0, 2])
def test_gradcheck_and_gradgradcheck_lstm(bias, proj):
    torch.manual_seed(0)
    m = fused_lstm.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=proj, bias=bias, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, proj or 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *params):
        out, (h, c) = functional_call(m, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    inputs = (x, h0, c0, *[p.detach().requires_grad_() for p in m.parameters()])
    assert torch.autograd.gradcheck(f, inputs)
    # fast_mode checks random projections of the second-order Jacobian instead of all of it: 5x faster
    # here (30 s -> 6 s per case), and a wrong second derivative still fails it.
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_gradcheck_and_gradgradcheck_lstm_cell():
    torch.manual_seed(0)
    m = fused_lstm.LSTMCell(2, 3, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    hx = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def f(x, h0, c0, *params):
        return functional_call(m, dict(zip(names, params)), (x, (h0, c0)))

    inputs = (x, *hx, *[p.detach().requires_grad_() for p in m.parameters()])
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_double_backward_matches_nn_lstm():
    ref, ours = pair()
    ref.double()
    ours.double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def second_order(m):
        out, _ = m(x)
        (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [x, *m.parameters()])

    for e, a in zip(second_order(ref), second_order(ours), strict=True):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("wanted", ["weight_hr_l0_reverse", "weight_hh_l1", "weight_ih_l0"])
def test_double_backward_of_one_parameter_without_biases_matches_nn_lstm(wanted):
    # The C++ autograd numbers only the tensors a call was given (here no biases) when it asks which inputs
    # need gradients; a miscount would differentiate the wrong weight or none.
    ref, ours = pair(bias=False)
    ref.double()
    ours.double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def second_order(m):
        for name, p in m.named_parameters():
            p.requires_grad_(name == wanted)
        w = getattr(m, wanted)
        out, _ = m(x)
        (g,) = torch.autograd.grad(out.pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), w)

    (expected,), (actual,) = second_order(ref), second_order(ours)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("mode", ["checkpoint", "checkpoint-reentrant", "save_on_cpu"])
def test_activation_checkpointing_and_saved_tensor_hooks_match_nn_lstm(mode):
    # Both act on what the autograd saves (saved-tensor hooks; a reentrant checkpoint reruns the forward).
    ref, ours = pair()
    ref.double()
    ours.double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def gradients(m):
        x.grad = None
        m.zero_grad()
        if mode == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                out = m(x)[0]
        else:
            out = torch.utils.checkpoint.checkpoint(lambda t: m(t)[0], x, use_reentrant=mode.endswith("reentrant"))
        out.pow(2).sum().backward()
        return [x.grad, *(p.grad for p in m.parameters())]

    for e, a in zip(gradients(ref), gradients(ours), strict=True):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float64])


def test_convert_swaps_in_place_and_keeps_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4), nn.ModuleList([nn.LSTMCell(4, 4)]))
    params_before = list(model.parameters())
    lstm_before = model[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fused_lstm.convert(model) is model
    assert type(model[1]) is fused_lstm.LSTM and model[1] is lstm_before
    assert type(model[2][0]) is fused_lstm.LSTMCell
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    out, _ = model[1](model[0](torch.randn(5, 2, 3)))
    out.sum().backward()
    before = model[1].weight_hh_l0.detach().clone()
    optimizer.step()
    assert not torch.equal(model[1].weight_hh_l0, before)


def test_convert_leaves_subclasses_alone():
    class Custom(nn.LSTM):
        pass

    model = nn.Sequential(Custom(3, 4))
    fused_lstm.convert(model)
    assert type(model[0]) is Custom


def nn_lstm_where_it_runs(ref: nn.LSTM, x: torch.Tensor):
    """nn.LSTM's results on its default CPU path (oneDNN), and True; or on its native path where oneDNN
    refuses the case on this CPU, and False. oneDNN has no bfloat16 LSTM for CPUs without AVX-512 (AMD Zen 3
    raises "could not create a primitive descriptor for the LSTM forward propagation primitive"), where
    fused_lstm runs all the same."""
    try:
        return ref(x), True
    except RuntimeError as error:
        if "could not create a primitive descriptor" not in str(error):
            raise
        with torch.backends.mkldnn.flags(enabled=False):
            return ref(x), False


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_dtypes_match_nn_lstm(input_dtype):
    """Without projections nn.LSTM's oneDNN path returns everything in bfloat16, and so does fused_lstm, on
    every CPU. Where oneDNN cannot run it, the values are compared with nn.LSTM's native path, whose dtypes
    are an accident of that path (its float32 zero c0 promotes the cell update to float32), as they are with
    projections, where fused_lstm returns bfloat16 too."""
    ref, ours = pair(proj_size=0)
    x = torch.randn(4, 2, 3, dtype=input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (expected, (eh, ec)), on_onednn = nn_lstm_where_it_runs(ref, x)
        actual, (ah, ac) = ours(x)
    assert (actual.dtype, ah.dtype, ac.dtype) == (torch.bfloat16,) * 3
    if on_onednn:
        assert (expected.dtype, eh.dtype, ec.dtype) == (torch.bfloat16,) * 3
    # Both sides compute in bfloat16 (one ulp is 2e-3 at these outputs' scale, 0.25-0.5) and round at different
    # points: measured up to 2.5e-3 apart (AMD EPYC, oneDNN and native paths). An output 5% off fails.
    torch.testing.assert_close(actual.float(), expected.float(), atol=6e-3, rtol=2e-2)
    actual.float().sum().backward()
    assert ours.weight_ih_l0.grad.dtype == torch.float32


def test_cpu_autocast_leaves_float64_alone():
    ref, ours = pair(dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = ref(x), ours(x)
    for e, a in zip([expected[0], *expected[1]], [actual[0], *actual[1]]):
        assert a.dtype == e.dtype == torch.float64
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("data_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_autocast_packed_dtypes_match_nn_lstm(data_dtype, autocast_dtype):
    """A float32 LSTM under autocast, fed packed data of any floating dtype (an earlier layer under autocast
    hands over lower precision). nn.LSTM's packed CPU path promotes its results to c_0's dtype."""
    ref, ours = pair(proj_size=0)
    packed = nn.utils.rnn.pack_sequence([torch.randn(n, 3, dtype=data_dtype) for n in (4, 2, 1)])
    with torch.autocast("cpu", dtype=autocast_dtype):
        expected, (eh, ec) = ref(packed)
        actual, (ah, ac) = ours(packed)
    assert (actual.data.dtype, ah.dtype, ac.dtype) == (expected.data.dtype, eh.dtype, ec.dtype)
    # Both compute their GEMMs in the autocast dtype (bfloat16: 8 bits of mantissa) and round at different points.
    torch.testing.assert_close(actual.data.float(), expected.data.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("input_dtype", [torch.int64, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_autocast_refuses_what_it_cannot_cast_as_nn_lstm(input_dtype, packed):
    """Autocast casts neither integers nor float64: a float32 model's cast weights then meet them."""
    ref, ours = pair(proj_size=0)
    x = torch.ones(4, 2, 3, dtype=input_dtype)
    inp = nn.utils.rnn.pack_padded_sequence(x, [4, 3]) if packed else x
    messages = []
    for module in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as error:
            module(inp)
        messages.append(str(error.value))
    assert messages[1] == messages[0]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_lstm_cell_dtypes_match_nn_lstm_cell(input_dtype):
    torch.manual_seed(0)
    ref = nn.LSTMCell(3, 5)
    ours = fused_lstm.LSTMCell(3, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, dtype=input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = ref(x), ours(x)
    for e, a in zip(expected, actual):
        assert a.dtype == e.dtype == input_dtype
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2)
