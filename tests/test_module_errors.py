"""Bad input to fused_lstm.LSTM / LSTMCell fails as it fails in nn.LSTM / nn.LSTMCell: same type, same message.

Each case calls both modules with the same arguments and compares the exceptions, so the expectation is
nn.LSTM's behaviour on the installed torch, not a copy of it. The exceptions are the hx-dtype cases where
nn.LSTM's message is an accident of its backend (oneDNN, the native path and autocast each word it their own
way); there we require the same type and a message that names the tensor and both dtypes.
"""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import fused_lstm


def both(cls_ref, cls_ours, *args, **kwargs):
    torch.manual_seed(0)
    ref = cls_ref(*args, **kwargs)
    ours = cls_ours(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def raised(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as error:  # noqa: BLE001  (the point is to capture whatever is raised)
            return type(error), str(error)
    return None, None


def assert_same_error(ref, ours, *args):
    expected = raised(lambda: ref(*args))
    assert expected[0] is not None, "the case must make nn.LSTM raise"
    assert raised(lambda: ours(*args)) == expected


x = torch.randn(4, 2, 3)
h = torch.randn(2, 2, 5)
c = torch.randn(2, 2, 5)

DENSE_CASES = {
    "1-D input": (torch.randn(3),),
    "0-D input": (torch.tensor(1.0),),
    "4-D input": (torch.randn(1, 4, 2, 3),),
    "wrong input size": (torch.randn(4, 2, 7),),
    "zero input size": (torch.randn(4, 2, 0),),
    "float64 input": (x.double(),),
    "three hidden states": (x, (h, c, c)),
    "one hidden state": (x, (h,)),
    "hx a single tensor": (x, h),
    "h layers": (x, (torch.randn(1, 2, 5), c)),
    "c size": (x, (h, torch.randn(2, 2, 6))),
    "h batch": (x, (torch.randn(2, 3, 5), c)),
    "3-D hx for unbatched input": (torch.randn(4, 3), (h, c)),
    "2-D hx for batched input": (x, (h[:, 0], c[:, 0])),
    "hx on another device": (x, (h.to("meta"), c)),
    "zero-length sequence": (torch.randn(0, 2, 3),),
    "zero-length unbatched sequence": (torch.randn(0, 3),),
    "list input": ([1.0, 2.0],),
}


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_errors(case):
    ref, ours = both(nn.LSTM, fused_lstm.LSTM, 3, 5, num_layers=2)
    assert_same_error(ref, ours, *DENSE_CASES[case])


def test_projection_hidden_size_error():
    ref, ours = both(nn.LSTM, fused_lstm.LSTM, 3, 5, num_layers=2, bidirectional=True, proj_size=2)
    assert_same_error(ref, ours, x, (torch.randn(4, 2, 5), torch.randn(4, 2, 5)))


def test_batch_first_hx_is_not_batch_first():
    ref, ours = both(nn.LSTM, fused_lstm.LSTM, 3, 5, batch_first=True)
    assert_same_error(ref, ours, torch.randn(2, 4, 3), (torch.randn(2, 1, 5), torch.randn(2, 1, 5)))


def test_parameters_on_another_device():
    ref, ours = both(nn.LSTM, fused_lstm.LSTM, 3, 5)
    ref.weight_hh_l0 = nn.Parameter(ref.weight_hh_l0.to("meta"))
    ours.weight_hh_l0 = nn.Parameter(ours.weight_hh_l0.to("meta"))
    assert_same_error(ref, ours, x)


packed = pack_padded_sequence(torch.randn(4, 2, 3), [4, 2])
PACKED_CASES = {
    "hx batch": (packed, (torch.randn(2, 3, 5), torch.randn(2, 3, 5))),
    "h last dim": (packed, (torch.randn(2, 2, 6), torch.randn(2, 2, 5))),
    "c last dim": (packed, (torch.randn(2, 2, 5), torch.randn(2, 2, 4))),
    "too few layers": (packed, (torch.randn(1, 2, 5), torch.randn(1, 2, 5))),
    "input size": (pack_padded_sequence(torch.randn(4, 2, 4), [4, 2]), None),
    "data dtype": (pack_padded_sequence(torch.randn(4, 2, 3, dtype=torch.float64), [4, 2]), None),
    "2-D hx": (packed, (torch.randn(2, 5), torch.randn(2, 5))),
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_errors(case):
    ref, ours = both(nn.LSTM, fused_lstm.LSTM, 3, 5, num_layers=2)
    assert_same_error(ref, ours, *PACKED_CASES[case])


def test_packing_errors_come_from_torch():
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        fused_lstm.LSTM(3, 5)(pack_padded_sequence(torch.randn(4, 2, 3), [2, 4]))
    assert raised(lambda: pack_sequence([torch.randn(2, 3), torch.randn(3, 3)]))[0] is RuntimeError


@pytest.mark.parametrize(
    "model_dtype,h_dtype,c_dtype",
    [(torch.float32, torch.float64, torch.float32), (torch.float64, torch.float32, torch.float64),
     (torch.float64, torch.float64, torch.float32)],
)  # fmt: skip
def test_hx_dtype_mismatch_names_the_tensor(model_dtype, h_dtype, c_dtype):
    """nn.LSTM raises backend messages here (or, for a float32 c0 in a float64 model, silently promotes)."""
    m = fused_lstm.LSTM(3, 5, dtype=model_dtype)
    bad = "hx[0] (h_0)" if h_dtype != model_dtype else "hx[1] (c_0)"
    message = re.escape(f"LSTM: {bad} has dtype ") + r"torch.float(32|64) but the input has dtype " + str(model_dtype)
    with pytest.raises(RuntimeError, match=message):
        m(torch.randn(4, 2, 3, dtype=model_dtype), (torch.randn(1, 2, 5, dtype=h_dtype), torch.randn(1, 2, 5, dtype=c_dtype)))


CELL_CASES = {
    "input size": (torch.randn(3, 11),),
    "hidden0 size": (torch.randn(3, 10), (torch.randn(3, 21), torch.randn(3, 20))),
    "hidden1 size": (torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 21))),
    "hidden batch": (torch.randn(3, 10), (torch.randn(5, 20), torch.randn(5, 20))),
    "4-D hx": (torch.randn(3, 10), (torch.randn(1, 1, 3, 20), torch.randn(3, 20))),
    "3-D input": (torch.randn(1, 3, 10),),
    "batched input with 1-D hx": (torch.randn(3, 10), (torch.randn(20), torch.randn(20))),
    "unbatched input with 2-D hx": (torch.randn(10), (torch.randn(1, 20), torch.randn(1, 20))),
    "tensor hx": (torch.randn(3, 10), torch.randn(3, 20)),
    "three hidden states": (torch.randn(3, 10), (torch.randn(3, 20),) * 3),
    "one hidden state": (torch.randn(3, 10), (torch.randn(3, 20),)),
    "float64 input": (torch.randn(3, 10, dtype=torch.float64),),
    "float64 hx": (torch.randn(3, 10), (torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20))),
    # ATen names every dtype in this message (Long, Int, ComplexFloat), not only the floating ones.
    "int64 input": (torch.ones(3, 10, dtype=torch.long),),
    "complex input": (torch.randn(3, 10, dtype=torch.complex64),),
}


@pytest.mark.parametrize("case", CELL_CASES)
def test_cell_errors(case):
    ref, ours = both(nn.LSTMCell, fused_lstm.LSTMCell, 10, 20)
    assert_same_error(ref, ours, *CELL_CASES[case])


def test_cell_hx_list_and_empty_batch_work_like_nn():
    ref, ours = both(nn.LSTMCell, fused_lstm.LSTMCell, 10, 20)
    for args in [(torch.randn(3, 10), [torch.randn(3, 20), torch.randn(3, 20)]), (torch.randn(0, 10),)]:
        for e, a in zip(ref(*args), ours(*args), strict=True):
            torch.testing.assert_close(a, e)


def test_non_bool_bidirectional_fails_in_forward_like_nn():
    """nn.LSTM's message here is the C++ argument parser's list of signatures; the type is what callers see."""
    for cls in (nn.LSTM, fused_lstm.LSTM):
        m = cls(3, 5, bidirectional=1)
        assert repr(m) == "LSTM(3, 5, bidirectional=1)"
        with pytest.raises(TypeError, match="invalid combination of arguments"):
            m(torch.randn(4, 2, 3))
