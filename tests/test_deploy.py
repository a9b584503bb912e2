"""A model holding fused modules deploys as the same model holding nn.LSTM / nn.LSTMCell deploys: ONNX through
both exporters (ONNX's own LSTM operator, run in onnxruntime), TorchScript (script and trace, saved and loaded in
a new process that does not import fused_lstm), whole-model checkpoints read by torch.load's defaults, and
dynamic quantization (which leaves fused modules in float, with a warning, until fused_lstm.unconvert).

Written as the fused class's torch class is what makes these work: nothing here asks the deployed model to know
fused_lstm, and the child processes check that they never imported it."""

import copy
import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_lstm
from deploy_model import Tagger

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# onnxruntime runs float32 through its own kernels, which round differently from torch's: nn.LSTM's own
# export is within about 1e-7 of eager here, and 1e-5 (the float32 parity standard) still fails a wrong gate.
ONNX_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def fused_and_torch(**lstm_kwargs):
    torch.manual_seed(0)
    ref = Tagger(**lstm_kwargs).eval()
    return fused_lstm.convert(copy.deepcopy(ref)), ref


def onnx_bytes(model, x, dynamo: bool) -> bytes:
    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    return buffer.getvalue()


EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])


@EXPORTERS
@pytest.mark.parametrize("lstm_kwargs", [{}, dict(num_layers=2, bidirectional=True, batch_first=True)], ids=str)
def test_onnx_export_runs_in_onnxruntime_with_onnx_lstm(dynamo, lstm_kwargs):
    ours, ref = fused_and_torch(**lstm_kwargs)
    x = torch.randn(2, 4, 3)
    model = onnx_bytes(ours, x, dynamo)
    nodes = onnx.load_from_string(model).graph.node
    assert "LSTM" in {node.op_type for node in nodes}
    assert {node.domain for node in nodes} <= {"", "ai.onnx"}  # standard operators only
    session = onnxruntime.InferenceSession(model)
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = ref(x)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), e, **ONNX_TOLERANCE)


class PackedTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fused_lstm.LSTM(3, 5, bidirectional=True)

    def forward(self, x, lengths):
        out, (h, _) = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out)[0], h


def test_onnx_export_of_packed_input_passes_the_lengths_to_onnx_lstm():
    """The TorchScript exporter gives ONNX's LSTM the lengths (its sequence_lens input), as for nn.LSTM. (The
    dynamo exporter cannot export packed input, nn.LSTM's included.)"""
    torch.manual_seed(0)
    model = PackedTagger().eval()
    x, lengths = torch.randn(4, 2, 3), torch.tensor([4, 2])
    buffer = io.BytesIO()
    torch.onnx.export(model, (x, lengths), buffer, dynamo=False)
    lstm = [node for node in onnx.load_from_string(buffer.getvalue()).graph.node if node.op_type == "LSTM"]
    assert len(lstm) == 1 and len(lstm[0].input) > 4 and lstm[0].input[4] != ""  # sequence_lens
    session = onnxruntime.InferenceSession(buffer.getvalue())
    names = [i.name for i in session.get_inputs()]
    actual = session.run(None, dict(zip(names, (x.numpy(), lengths.numpy()), strict=True)))
    with torch.no_grad():
        expected = fused_lstm.unconvert(copy.deepcopy(model))(x, lengths)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), e, **ONNX_TOLERANCE)


@EXPORTERS
def test_onnx_export_of_a_projection_names_the_option(dynamo):
    """ONNX's LSTM has no projection: both exporters fail with a message that says so (nn.LSTM's own export
    fails in the TorchScript exporter, and writes a model onnxruntime cannot run with the dynamo one)."""
    ours, _ = fused_and_torch(proj_size=2)
    with pytest.raises(Exception) as error:
        onnx_bytes(ours, torch.randn(4, 2, 3), dynamo)
    assert "proj_size=2 cannot be exported to ONNX" in "".join(str(e) for e in _chain(error.value))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


CHILD_WITHOUT_FUSED_LSTM = """
import sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from deploy_model import Tagger
x, expected = torch.load({inputs!r})
{load}
assert "fused_lstm" not in sys.modules, "the deployed model imported fused_lstm"
actual = model(x)
for a, e in zip(actual, expected, strict=True):
    torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
print("ok", type(model).__name__)
"""


def run_without_fused_lstm(tmp_path, x, expected, load: str) -> str:
    """Runs `load` (which defines `model` from files in tmp_path) in a new process that does not import
    fused_lstm, and checks the model's results there against `expected`."""
    inputs = tmp_path / "inputs.pt"
    torch.save((x, [t.detach() for t in expected]), inputs)
    code = CHILD_WITHOUT_FUSED_LSTM.format(tests=str(Path(__file__).parent), inputs=str(inputs), load=load)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert child.returncode == 0, child.stderr
    return child.stdout


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file_loads_and_runs_without_fused_lstm(tmp_path, how):
    """torch.jit.trace with its default check_trace (which re-runs the model and compares the graphs)."""
    ours, _ = fused_and_torch(num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 4, 3)
    expected = ours(x)
    scripted = torch.jit.script(ours) if how == "script" else torch.jit.trace(ours, (x,))
    for a, e in zip(scripted(x), expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    # torch.jit.script puts what __prepare_scriptable__ gives (nn.LSTM sharing the parameters) in the place of
    # each fused module of the model it is given (README: Deploying); convert makes them fused again.
    swapped = (nn.LSTM, nn.LSTMCell) if how == "script" else (fused_lstm.LSTM, fused_lstm.LSTMCell)
    assert (type(ours.lstm), type(ours.cell)) == swapped
    fused_lstm.convert(ours)
    scripted.save(str(tmp_path / "model.pt"))
    assert run_without_fused_lstm(tmp_path, x, expected, "model = torch.jit.load('model.pt')").startswith("ok")


def test_whole_model_checkpoint_loads_with_torch_load_defaults_without_fused_lstm(tmp_path):
    """torch.save(model) of a converted model, read back with torch.load's defaults (weights_only=True) and nn's
    classes among the safe globals, as pytorch/examples' word_language_model/generate.py reads its checkpoints."""
    ours, _ = fused_and_torch()
    x = torch.randn(4, 2, 3)
    torch.save(ours, tmp_path / "model.pt")
    load = ("with torch.serialization.safe_globals([Tagger, nn.LSTM, nn.LSTMCell]):\n"
            "    model = torch.load('model.pt')\n"
            "assert type(model.lstm) is nn.LSTM and type(model.cell) is nn.LSTMCell")
    assert run_without_fused_lstm(tmp_path, x, ours(x), load) == "ok Tagger\n"


def test_checkpoint_loads_back_fused_with_convert(tmp_path):
    ours, _ = fused_and_torch()
    torch.save(ours, tmp_path / "model.pt")
    with torch.serialization.safe_globals([Tagger, nn.LSTM, nn.LSTMCell]):
        loaded = fused_lstm.convert(torch.load(tmp_path / "model.pt"))
    assert (type(loaded.lstm), type(loaded.cell)) == (fused_lstm.LSTM, fused_lstm.LSTMCell)
    x = torch.randn(4, 2, 3)
    for a, e in zip(loaded(x), ours(x), strict=True):
        assert torch.equal(a, e)


def test_checkpoint_holding_the_fused_classes_loads_with_weights_only(tmp_path, monkeypatch):
    """A checkpoint that pickled the fused classes themselves (as fused_lstm did before torch.save wrote torch's
    classes) loads with torch.load's default weights_only=True where fused_lstm is imported, fused."""
    monkeypatch.setattr(fused_lstm.deploy, "_caller", lambda: None)  # as if no pickler were torch.save's
    ours, _ = fused_and_torch()
    torch.save(ours, tmp_path / "model.pt")
    with torch.serialization.safe_globals([Tagger]):
        loaded = torch.load(tmp_path / "model.pt")
    assert (type(loaded.lstm), type(loaded.cell)) == (fused_lstm.LSTM, fused_lstm.LSTMCell)


def test_pickle_and_deepcopy_keep_the_fused_class():
    ours, _ = fused_and_torch()
    for copied in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert (type(copied.lstm), type(copied.cell)) == (fused_lstm.LSTM, fused_lstm.LSTMCell)


def test_dynamic_quantization_of_other_modules_does_not_warn():
    ours, _ = fused_and_torch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused_lstm")
        quantized = torch.ao.quantization.quantize_dynamic(ours, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.lstm) is fused_lstm.LSTM


def test_dynamic_quantization_warns_and_quantizes_after_unconvert():
    ours, ref = fused_and_torch()
    with pytest.warns(UserWarning, match=r"leaves fused_lstm\.LSTM in float.*fused_lstm\.unconvert"):
        left_alone = torch.ao.quantization.quantize_dynamic(ours, {nn.LSTM, nn.LSTMCell}, dtype=torch.qint8)
    assert type(left_alone.lstm) is fused_lstm.LSTM
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused_lstm")  # none of ours once the modules are torch's
        quantized = torch.ao.quantization.quantize_dynamic(fused_lstm.unconvert(ours), {nn.LSTM}, dtype=torch.qint8)
    expected = torch.ao.quantization.quantize_dynamic(ref, {nn.LSTM}, dtype=torch.qint8)
    assert type(quantized.lstm) is type(expected.lstm) is torch.ao.nn.quantized.dynamic.LSTM
    x = torch.randn(4, 2, 3)
    for a, e in zip(quantized(x), expected(x), strict=True):
        assert torch.equal(a, e)


def test_unconvert_undoes_convert_in_place():
    ours, ref = fused_and_torch()
    params = list(ours.parameters())
    assert fused_lstm.unconvert(ours) is ours
    assert (type(ours.lstm), type(ours.cell)) == (nn.LSTM, nn.LSTMCell)
    assert all(p is q for p, q in zip(params, ours.parameters(), strict=True))


class MyLSTM(fused_lstm.LSTM):
    """A user's subclass, which may override forward: it deploys as itself."""


def test_subclasses_of_fused_classes_deploy_as_themselves():
    torch.manual_seed(0)
    ours = MyLSTM(3, 5)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is MyLSTM
    assert type(fused_lstm.unconvert(ours)) is MyLSTM
    assert ours.__prepare_scriptable__() is ours


def test_dynamo_export_strategy_records_nn_lstm_while_exporting_to_onnx(monkeypatch):
    """The dynamo exporter's second try traces with Dynamo (torch.export strict=True), which folds
    torch.onnx.is_in_onnx_export() to False: the fused module reads the exporter's own flag there."""
    ours, _ = fused_and_torch()
    monkeypatch.setattr(fused_lstm.deploy._onnx_flags, "_is_onnx_exporting", True)
    graph = torch.export.export(ours.lstm, (torch.randn(4, 2, 3),), strict=True).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert any("aten.lstm" in t for t in targets) and not any("fused_lstm" in t for t in targets), targets
