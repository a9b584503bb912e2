"""torch.compile and torch.export of models with fused_lstm modules: no graph breaks, eager's results, no
recompiles when only sizes change, and Dynamo's RNN refusal lifted only where fused_lstm.compile says.

Most tests compile with the "aot_eager" backend: Dynamo's tracing and AOTAutograd (which run our fake kernels
and autograd registration) are the parts that concern us, and it compiles in a fraction of Inductor's time.
One test runs Inductor end to end.
"""

import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils.rnn import pack_sequence

import fused_lstm
from module_cases import Config, make_pair, run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# One configuration for each kind of input and each feature of the drop-in modules (dropout is tested
# separately: compiled graphs draw their own random masks).
CONFIGS = [
    Config(num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
    Config(bias=False, given_state=False),
    Config(kind="unbatched", num_layers=2),
    Config(kind="packed", num_layers=2, bidirectional=True),
    Config(kind="packed_unsorted", proj_size=2, given_state=False),
    Config(kind="packed", bidirectional=True, training=False, dtype=torch.float32),
]


def compiled(module, **kwargs):
    """fused_lstm.compile with a frame counter as the backend; returns (compiled module, counter)."""
    counter = CompileCounterWithBackend("aot_eager")
    return fused_lstm.compile(module, backend=counter, fullgraph=True, **kwargs), counter


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_compiled_lstm_matches_eager(cfg):
    _, eager = make_pair(cfg)
    _, ours = make_pair(cfg)
    model, counter = compiled(ours)
    expected, actual = run(eager, cfg), run(model, cfg)
    assert counter.frame_count == 1
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12 if cfg.dtype == torch.float64 else 1e-6, rtol=1e-6)


def test_compiled_lstm_cell_matches_eager():
    torch.manual_seed(0)
    eager = fused_lstm.LSTMCell(3, 4, dtype=torch.float64)
    ours = fused_lstm.LSTMCell(3, 4, dtype=torch.float64)
    ours.load_state_dict(eager.state_dict())
    model, counter = compiled(ours)
    x = torch.randn(2, 3, dtype=torch.float64)
    results = []
    for module in (eager, model):
        h, c = module(x)
        results.append([h, c, *torch.autograd.grad((h * 2 + c).sum(), list(module.parameters()))])
    assert counter.frame_count == 1
    for e, a in zip(*results, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)


def test_compiled_dropout_has_no_graph_break():
    cfg = Config(num_layers=3, dropout=0.5)
    _, ours = make_pair(cfg)
    model, counter = compiled(ours)
    out, h_n, c_n, *grads = run(model, cfg)
    assert counter.frame_count == 1
    assert all(torch.isfinite(g).all() for g in grads)
    model.eval()  # without dropout the compiled model computes the eager one's results
    torch.testing.assert_close(run(model, cfg), run(ours.eval(), cfg), atol=1e-12, rtol=0)


def test_inductor_training_matches_eager():
    cfg = Config(num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float32)
    _, eager = make_pair(cfg)
    _, ours = make_pair(cfg)
    model = fused_lstm.compile(ours, fullgraph=True)  # the default backend, Inductor
    for e, a in zip(run(eager, cfg), run(model, cfg), strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


# The input size is unlike every batch and length below: Dynamo gives dimensions of equal size one symbol
# ("duck sizing"), so a batch of 3 next to an input size of 3 would be specialised with it.
INPUT = 7


def dense_input(steps, batch, size=INPUT):
    return torch.randn(steps, batch, size, dtype=torch.float64)


def packed_input(lengths, size=INPUT):
    return pack_sequence([torch.randn(n, size, dtype=torch.float64) for n in lengths], enforce_sorted=False)


SIZES = {
    "dense": [dense_input(5, 3), dense_input(8, 4), dense_input(3, 6)],
    "packed": [packed_input([5, 2, 4]), packed_input([7, 6, 2, 3]), packed_input([3, 2])],
}


@pytest.mark.parametrize("kind", SIZES)
def test_dynamic_compile_does_not_recompile_for_new_sizes(kind):
    model, counter = compiled(fused_lstm.LSTM(INPUT, 4, num_layers=2, dtype=torch.float64), dynamic=True)
    frames = []
    for inp in SIZES[kind]:
        output, _ = model(inp)
        (output.data if kind == "packed" else output).sum().backward()
        frames.append(counter.frame_count)
    # Compiled by the first call, and never again. (That compile may call the backend twice: Dynamo restarts
    # its analysis once when it cannot turn a symbolic float, the module's dropout, into a tensor.)
    assert frames[0] in (1, 2) and frames == frames[:1] * len(frames)


@pytest.mark.parametrize("cell", [False, True])
def test_dynamic_backward_with_unused_outputs(cell):
    """Inside the graph the op's h_n and c_n (LSTMCell: its h_n) get no gradient: backward makes their zeros
    with symbolic sizes under dynamic shapes."""
    torch.manual_seed(0)
    module = (fused_lstm.LSTMCell if cell else fused_lstm.LSTM)(INPUT, 4, dtype=torch.float64)
    loss, counter = compiled(_FirstOutputLoss(module), dynamic=True)
    weight = module.weight_hh if cell else module.weight_hh_l0
    frames = []
    for batch in (3, 5, 6):
        x = torch.randn(batch, INPUT, dtype=torch.float64) if cell else dense_input(4, batch)
        (compiled_grad,) = torch.autograd.grad(loss(x), [weight])
        frames.append(counter.frame_count)
        (eager_grad,) = torch.autograd.grad(module(x)[0].pow(2).sum(), [weight])
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-12, rtol=0)
    # No recompile for new batch sizes (zeros of concrete sizes in backward specialised them). The first
    # compile may call the backend twice, as in test_dynamic_compile_does_not_recompile_for_new_sizes.
    assert frames[0] in (1, 2) and frames == frames[:1] * len(frames)


class _FirstOutputLoss(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0].pow(2).sum()


def test_automatic_dynamic_recompiles_once():
    model, counter = compiled(fused_lstm.LSTM(INPUT, 4, dtype=torch.float64))
    frames = []
    for steps, batch in [(5, 3), (8, 4), (3, 6), (9, 2)]:
        model(dense_input(steps, batch))[0].sum().backward()
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2, 2]  # static first, then one dynamic recompile that serves every later size


def test_compile_converts_and_leaves_the_rest_of_the_program_alone():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 3))
    model = nn.ModuleDict({"proj": inner, "lstm": nn.LSTM(3, 4)})
    reference = nn.LSTM(3, 4)
    reference.load_state_dict(model["lstm"].state_dict())

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body["lstm"](self.body["proj"](x))[0]

    counter = CompileCounterWithBackend("aot_eager")
    compiled_model = fused_lstm.compile(Model(), backend=counter, fullgraph=True)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(compiled_model(x), reference(inner(x))[0])
    assert type(model["lstm"]) is fused_lstm.LSTM and counter.frame_count == 1

    # The flag was lifted only during that call: a plain nn.LSTM is refused as before, and untouched.
    plain = nn.LSTM(3, 4)
    assert torch._dynamo.config.allow_rnn is False
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(plain, backend="aot_eager", fullgraph=True)(x)
    assert type(plain) is nn.LSTM


def test_global_flag_alternative():
    """The documented one-line alternative: set allow_rnn for the whole program, then torch.compile."""
    module = fused_lstm.LSTM(INPUT, 4, dtype=torch.float64)
    counter = CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(allow_rnn=True):  # the test's stand-in for `torch._dynamo.config.allow_rnn = True`
        model = torch.compile(module, backend=counter, fullgraph=True)
        x = dense_input(5, 2)
        torch.testing.assert_close(model(x)[0], module(x)[0], atol=1e-12, rtol=0)
    assert counter.frame_count == 1


def test_compile_without_the_flag_is_refused():
    """Why fused_lstm.compile exists: plain torch.compile refuses every nn.LSTM subclass, and the same call
    compiles once allow_rnn is set. (torch 2.11-2.14 name the reason, "RNN, GRU, or LSTM", in the refusal;
    2.15 delays it to the module's first use, where its message no longer says why.)"""
    x = torch.randn(4, 2, 3)
    model = torch.compile(fused_lstm.LSTM(3, 4), backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(x)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        torch.testing.assert_close(model(x)[0], model._orig_mod(x)[0], atol=1e-6, rtol=1e-6)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fused_lstm.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True, dtype=torch.float64)
        self.head = nn.Linear(8, 2, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm._flat_weights")  # nn.LSTM's own refresh
def test_export_runs_and_matches_eager():
    torch.manual_seed(0)
    model = Tagger()
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    exported = torch.export.export(model, (torch.randn(3, 5, 3, dtype=torch.float64),),
                                   dynamic_shapes=({0: batch, 1: steps},))  # fmt: skip
    graph_ops = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.fused_lstm.lstm_bidirectional_layer_forward.default in graph_ops
    for shape in [(3, 5, 3), (6, 9, 3)]:
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("bidirectional,op", [(False, "lstm_layer"), (True, "lstm_bidirectional_layer")])
def test_compiled_backward_runs_the_fused_backward_op(bidirectional, op):
    # The autograd's backward recomputes the layer with ATen ops when grad mode is on in backward (double
    # backward); AOTAutograd traces backward without it, so the compiled backward must hold the fused op.
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = {}

    def backend(gm, example_inputs):
        def compiler(kind):
            def compile_graph(graph, _inputs):
                graphs[kind] = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
                return make_boxed_func(graph.forward)

            return compile_graph

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))

    module = fused_lstm.LSTM(4, 5, bidirectional=bidirectional)
    x = torch.randn(3, 2, 4, requires_grad=True)
    out, _ = fused_lstm.compile(module, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    assert f"fused_lstm.{op}_forward.default" in graphs["fw"]
    assert f"fused_lstm.{op}_backward.default" in graphs["bw"]


def test_func_grad_matches_autograd():
    torch.manual_seed(0)
    module = fused_lstm.LSTM(3, 4, num_layers=2, proj_size=2, dtype=torch.float64)
    params = dict(module.named_parameters())
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(p):
        return torch.func.functional_call(module, p, (x,))[0].pow(2).sum()

    grads = torch.func.grad(loss)(params)
    expected = torch.autograd.grad(loss(params), list(params.values()))
    for name, e in zip(params, expected, strict=True):
        torch.testing.assert_close(grads[name], e, atol=1e-12, rtol=0)


def test_func_vjp_and_jacrev_match_autograd():
    # Both ran the layer's gradient with torch.func tracking around it; a recomputation differentiated with
    # torch.autograd.grad inside failed there ("element 0 of tensors does not require grad").
    torch.manual_seed(0)
    module = fused_lstm.LSTM(3, 4, proj_size=2, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    w = module.weight_hh_l0.detach()

    def outputs(w_hh):
        return torch.func.functional_call(module, {"weight_hh_l0": w_hh}, (x,))[0]

    cotangent = torch.randn(5, 2, 2, dtype=torch.float64)
    (vjp,) = torch.func.vjp(outputs, w)[1](cotangent)
    jacobian = torch.func.jacrev(outputs)(w)
    w_leaf = w.clone().requires_grad_()
    out = outputs(w_leaf)
    (expected_vjp,) = torch.autograd.grad(out, w_leaf, cotangent, retain_graph=True)
    torch.testing.assert_close(vjp, expected_vjp, atol=1e-12, rtol=0)
    one_output = torch.zeros_like(out)
    one_output[4, 1, 0] = 1  # a row of the Jacobian: d out[4, 1, 0] / d w_hh
    (expected_row,) = torch.autograd.grad(out, w_leaf, one_output)
    torch.testing.assert_close(jacobian[4, 1, 0], expected_row, atol=1e-12, rtol=0)
    assert expected_row.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching")
def test_vmap_over_an_ensemble_matches_each_member():
    torch.manual_seed(0)
    members = [fused_lstm.LSTM(3, 4, dtype=torch.float64) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    skeleton = fused_lstm.LSTM(3, 4, dtype=torch.float64, device="meta")
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(p, b):
        return torch.func.functional_call(skeleton, (p, b), (x,))[0].pow(2).sum()

    losses = torch.func.vmap(loss)(params, buffers)
    grads = torch.func.vmap(torch.func.grad(loss))(params, buffers)
    for k, member in enumerate(members):
        out = member(x)[0].pow(2).sum()
        torch.testing.assert_close(losses[k], out, atol=1e-12, rtol=0)
        for (name, _), e in zip(member.named_parameters(), torch.autograd.grad(out, list(member.parameters()))):
            torch.testing.assert_close(grads[name][k], e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_compiled_inference_runs_the_inference_op(bidirectional):
    """Under no_grad the modules call the inference op (no gates kept for backward): in the compiled graph too."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    torch.manual_seed(0)
    module = fused_lstm.LSTM(4, 5, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        expected = module(x)
        actual = fused_lstm.compile(module, backend=backend, fullgraph=True)(x)
    op = "lstm_bidirectional_layer_inference" if bidirectional else "lstm_layer_inference"
    assert len(graphs) == 1 and getattr(torch.ops.fused_lstm, op).default in graphs[0]
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_export_of_a_frozen_model_holds_the_inference_op():
    torch.manual_seed(0)
    model = fused_lstm.LSTM(3, 4, num_layers=2).requires_grad_(False)
    exported = torch.export.export(model, (torch.randn(5, 2, 3),))
    graph_ops = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.fused_lstm.lstm_layer_inference.default in graph_ops
    assert torch.ops.fused_lstm.lstm_layer_forward.default not in graph_ops
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(exported.module()(x), model(x), atol=0, rtol=0)
