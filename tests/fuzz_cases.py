"""Random, mostly malformed argument sets for every op; run as a child process by test_fuzz.py.

    python tests/fuzz_cases.py TARGET SEED COUNT [--abort-at K]

TARGET is forward | backward | lstm | cell. Case i of a seed is built from its own generators, seeded by
(SEED, i), so one case replays alone: `python tests/fuzz_cases.py forward 3 1 --first 417`. Before each case the
child prints `case i` and then the arguments (flushed), so that a crash leaves the culprit last; a call
may raise any Exception or return a result of the right structure, and anything else fails the run. At the
end it prints `done: N returned, M raised`.

Sizes stay tiny, except "huge" dimensions (2^40, 2^62) that only ever appear on tensors with no elements or
as zero-stride expansions, so no case can need real memory beyond what the op refuses to allocate; the child
also caps its address space (see cap_memory) so a mistake there fails an allocation instead of the machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import resource
import sys

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
          torch.complex64]  # fmt: skip
SMALL = [0, 1, 2, 3, 4, 5, 8]
HUGE = [2**31 + 1, 2**40, 2**62]
# How much address space the child may add after start-up: enough for every tiny case, far below any huge one.
HEADROOM_BYTES = 4 << 30


class Case:
    """One case's generators: Python's for structure, torch's for values."""

    def __init__(self, seed: int, index: int):
        self.rng = random.Random(f"{seed}:{index}")
        self.gen = torch.Generator().manual_seed(self.rng.getrandbits(63))

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64).to(dtype)

    def tensor(self, shape, dtype=torch.float32) -> torch.Tensor:
        """A tensor of `shape`, of any dtype, with values (or none: zero elements, zero strides for huge)."""
        if any(s >= 2**31 for s in shape):
            return torch.empty(shape, dtype=dtype) if 0 in shape else self._huge_expanded(shape, dtype)
        if dtype.is_floating_point or dtype.is_complex:
            return self.randn(tuple(shape), dtype=dtype)
        return torch.randint(0, 3, tuple(shape), generator=self.gen).to(dtype)

    def _huge_expanded(self, shape, dtype):
        """Huge sizes without memory: a tensor of ones along every huge dimension, expanded (stride 0)."""
        base = [1 if s >= 2**31 else s for s in shape]
        if 0 in base:
            return torch.empty(shape, dtype=dtype)
        return torch.zeros(base, dtype=dtype).expand(*shape)

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """The same tensor, or a view of it with other strides: transposed, strided, expanded or offset."""
        if t.dim() == 0 or t.numel() == 0 or self.chance(0.6):
            return t
        kind = self.rng.choice(["transpose", "step", "expand", "offset"])
        if kind == "transpose" and t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if kind == "step":
            return torch.stack([t, t], -1).select(-1, 0)
        if kind == "expand" and t.size(0) >= 1:
            return t[:1].expand(t.shape)
        return torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:].view(t.shape)

    def device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("meta") if self.chance(0.05) else t

    def mutate(self, t: torch.Tensor | None, optional: bool) -> torch.Tensor | None:
        """A malformed replacement: None, another rank, other sizes (small or huge), another dtype or device."""
        what = self.rng.choice(["none", "rank", "size", "dtype", "device", "huge"])
        if what == "none":
            return None if optional or self.chance(0.3) else t
        shape = list(t.shape) if t is not None else [3, 4]
        dtype = t.dtype if t is not None else torch.float32
        if what == "rank":
            shape = [self.rng.choice(SMALL) for _ in range(self.rng.randint(0, 4))]
        elif what == "size" and shape:
            shape[self.rng.randrange(len(shape))] = self.rng.choice(SMALL)
        elif what == "huge" and shape:
            shape[self.rng.randrange(len(shape))] = self.rng.choice(HUGE)
            if self.chance(0.5):
                shape[self.rng.randrange(len(shape))] = 0
        elif what == "dtype":
            dtype = self.rng.choice(DTYPES)
        elif what == "device" and t is not None:
            return t.to("meta")
        return self.tensor(shape, dtype)

    def batch_sizes(self, lengths: list[int]) -> torch.Tensor:
        """The batch sizes of sorted lengths, or a malformed variant."""
        sizes = [sum(1 for n in lengths if n > t) for t in range(max(lengths, default=0))]
        if self.chance(0.75):
            return torch.tensor(sizes, dtype=torch.long)
        what = self.rng.choice(["shuffle", "zero", "negative", "sum", "huge", "overflow", "empty", "dtype", "rank",
                                "meta", "strided"])  # fmt: skip
        if what == "shuffle" and sizes:
            self.rng.shuffle(sizes)
        elif what == "zero":
            sizes.append(0)
        elif what == "negative":
            sizes.append(-1)
        elif what == "sum":
            sizes[-1:] = [max(1, sizes[-1] + self.rng.choice([-1, 1]))] if sizes else [1]
        elif what == "huge":
            sizes = [2**40] + sizes
        elif what == "overflow":
            sizes = [2**62] * 4 + sizes
        elif what == "empty":
            sizes = []
        t = torch.tensor(sizes, dtype=torch.long)
        if what == "dtype":
            t = t.to(self.rng.choice([torch.int32, torch.float32, torch.uint8]))
        elif what == "rank":
            t = t.unsqueeze(0)
        elif what == "meta":
            t = t.to("meta")
        elif what == "strided":
            t = torch.stack([t, t], -1).select(-1, 0)
        return t


def layer_args(case: Case) -> dict:
    """A valid set of lstm_layer_forward arguments, then up to three of them malformed, any of them re-laid out."""
    dtype = case.rng.choice([torch.float32, torch.float64, torch.float32, torch.bfloat16])
    steps, batch, inp, hidden = (case.rng.choice(SMALL[1:6]) for _ in range(4))
    proj = case.rng.randint(1, hidden) if case.chance(0.3) else 0
    out = proj or hidden
    packed = case.chance(0.4)
    if packed:
        lengths = sorted((case.rng.randint(1, steps) for _ in range(batch)), reverse=True)
        batch_sizes = case.batch_sizes(lengths)
        x = case.tensor([sum(lengths), inp], dtype)
    else:
        batch = case.rng.choice([0, batch, batch])
        batch_sizes, x = None, case.tensor([steps, batch, inp], dtype)
    bias = case.chance(0.7)
    args = dict(
        x=x, h0=case.tensor([batch, out], dtype), c0=case.tensor([batch, hidden], dtype),
        w_ih=case.tensor([4 * hidden, inp], dtype), w_hh=case.tensor([4 * hidden, out], dtype),
        b_ih=case.tensor([4 * hidden], dtype) if bias else None, b_hh=case.tensor([4 * hidden], dtype) if bias else None,
        w_hr=case.tensor([proj, hidden], dtype) if proj else None, batch_sizes=batch_sizes,
    )  # fmt: skip
    optional = {"b_ih", "b_hh", "w_hr", "batch_sizes"}
    for name in case.rng.sample(sorted(args), case.rng.choice([0, 0, 1, 1, 2, 3])):
        if name == "batch_sizes":
            args[name] = case.batch_sizes([steps] * batch) if args[name] is None else None
        else:
            args[name] = case.mutate(args[name], name in optional)
    return {k: case.layout(v) if isinstance(v, torch.Tensor) and k != "batch_sizes" else v for k, v in args.items()}


def describe(args: dict) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{v.dtype}{list(v.shape)}{v.stride()}{'' if v.device.type == 'cpu' else v.device.type}"
        if isinstance(v, (tuple, list)):
            return f"{type(v).__name__}({', '.join(one(t) for t in v)})"
        return repr(v)

    return ", ".join(f"{k}={one(v)}" for k, v in args.items())


def check_forward_result(args: dict, result) -> None:
    out, h_n, c_n, gates, cells = result
    assert h_n.shape == args["h0"].shape and c_n.shape == args["c0"].shape, "state shapes"
    assert out.shape[:-1] == args["x"].shape[:-1] and gates.shape[1] == 4 * cells.shape[1], "output shapes"


def run_forward(case: Case):
    args = layer_args(case)
    reverse = case.chance(0.5)
    print(describe(args), f"reverse={reverse}", flush=True)
    result = torch.ops.fused_lstm.lstm_layer_forward(*args.values(), reverse)
    check_forward_result(args, result)


def run_backward(case: Case):
    """Backward on the saved tensors of a real forward call, or (malformed) arbitrary ones."""
    args = layer_args(case)
    reverse = case.chance(0.5)
    try:
        out, h_n, c_n, gates, cells = torch.ops.fused_lstm.lstm_layer_forward(*args.values(), reverse)
    except Exception:  # noqa: BLE001 - an invalid forward: backward gets arbitrary tensors instead
        out, h_n, c_n = (case.tensor([2, 3, 4]) for _ in range(3))
        gates, cells = case.tensor([6, 8]), case.tensor([6, 2])
    grads = dict(grad_output=torch.ones_like(out), grad_h_n=torch.ones_like(h_n), grad_c_n=torch.ones_like(c_n))
    saved = dict(output=out, gates=gates, cells=cells)
    everything = {**grads, **saved}
    for name in case.rng.sample(sorted(everything), case.rng.choice([0, 1, 1, 2])):
        everything[name] = case.mutate(everything[name], optional=False)
    everything = {k: case.layout(v) if isinstance(v, torch.Tensor) else v for k, v in everything.items()}
    has_bias = args["b_ih"] is not None if case.chance(0.8) else case.chance(0.5)
    call = dict(
        **{k: everything[k] for k in grads}, x=args["x"], h0=args["h0"], c0=args["c0"], w_ih=args["w_ih"],
        w_hh=args["w_hh"], w_hr=args["w_hr"], batch_sizes=args["batch_sizes"], reverse=reverse, has_bias=has_bias,
        **{k: everything[k] for k in saved},
    )  # fmt: skip
    print(describe(call), flush=True)
    result = torch.ops.fused_lstm.lstm_layer_backward(**call)
    assert result[0].shape == call["x"].shape and result[3].shape == call["w_ih"].shape, "gradient shapes"


def module_input(case: Case, module, cell: bool):
    """An input for the module (dense of any rank, unbatched, or packed) and an hx (None, right, or wrong)."""
    weight_dtype = module.weight_ih_l0.dtype if not cell else module.weight_ih.dtype
    dtype = weight_dtype if case.chance(0.8) else case.rng.choice(DTYPES)
    size = module.input_size if case.chance(0.8) else case.rng.choice(SMALL)
    steps, batch = case.rng.choice(SMALL[1:6]), case.rng.choice(SMALL[:6])
    batched = case.chance(0.7)
    if cell:
        shape = [batch, size] if batched else [size]
    else:
        shape = [steps, batch, size] if batched else [steps, size]
        if batched and getattr(module, "batch_first", False):
            shape[:2] = shape[1::-1]
    if case.chance(0.15):
        shape = [case.rng.choice(SMALL) for _ in range(case.rng.randint(0, 4))]
    x = case.layout(case.device(case.tensor(shape, dtype)))
    packable = x.dim() == 3 and x.shape[0] > 0 and x.shape[1] > 0 and x.is_floating_point() and x.device.type == "cpu"
    if not cell and case.chance(0.25) and packable and not module.batch_first:
        lengths = [case.rng.randint(1, x.shape[0]) for _ in range(x.shape[1])]
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        if case.chance(0.2):
            x = PackedSequence(x.data, case.batch_sizes(sorted(lengths, reverse=True)), x.sorted_indices, x.unsorted_indices)
    hx = None
    if case.chance(0.6):
        states = 1 if cell else module.num_layers * (2 if module.bidirectional else 1)
        out = module.hidden_size if cell or not module.proj_size else module.proj_size
        state_batch = batch if case.chance(0.8) else case.rng.choice(SMALL)
        lead = [] if cell else [states]
        rows = [state_batch] if batched else []
        hx = [case.tensor(lead + rows + [out], dtype), case.tensor(lead + rows + [module.hidden_size], dtype)]
        if case.chance(0.3):
            i = case.rng.randrange(2)
            hx[i] = case.mutate(hx[i], optional=False)
        hx = tuple(case.layout(h) if isinstance(h, torch.Tensor) else h for h in hx)
        if case.chance(0.1):
            hx = hx[:1] if case.chance(0.5) else hx[0]
    return x, hx


def run_module(case: Case, cell: bool):
    hidden = case.rng.randint(1, 5)
    if cell:
        module = fused_lstm.LSTMCell(case.rng.randint(1, 4), hidden, bias=case.chance(0.7))
    else:
        module = fused_lstm.LSTM(
            case.rng.randint(1, 4), hidden, num_layers=case.rng.randint(1, 2), bias=case.chance(0.7),
            batch_first=case.chance(0.3), bidirectional=case.chance(0.5),
            proj_size=case.rng.randint(0, hidden - 1) if case.chance(0.3) else 0,
        )  # fmt: skip
    if case.chance(0.2):
        module = module.to(case.rng.choice([torch.float64, torch.float16, torch.bfloat16]))
    x, hx = module_input(case, module, cell)
    print(module, describe({"input": x.data if isinstance(x, PackedSequence) else x, "hx": hx}), flush=True)
    result = module(x, hx)
    assert isinstance(result, tuple) and len(result) == 2, "result structure"


TARGETS = {
    "forward": run_forward,
    "backward": run_backward,
    "lstm": lambda case: run_module(case, cell=False),
    "cell": lambda case: run_module(case, cell=True),
}


def cap_memory() -> None:
    """Limits the address space to what the process has now plus HEADROOM_BYTES, so that an allocation a case
    should never make fails with an exception instead of exhausting the machine. Not under AddressSanitizer,
    which reserves terabytes of shadow memory up front (make sanitize sets allocator_may_return_null instead)."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return
    with open("/proc/self/status") as status:
        vm_size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm_size_kb * 1024 + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("seed", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--first", type=int, default=0, help="the first case's index (to replay one)")
    parser.add_argument("--abort-at", type=int, default=-1, help="abort the process at this case (tests the harness)")
    parser.add_argument("--summary", action="store_true", help="print the commonest exceptions at the end")
    options = parser.parse_args(argv)
    cap_memory()
    returned = raised = 0
    exceptions = collections.Counter()
    for index in range(options.first, options.first + options.count):
        print(f"case {index}", flush=True)
        if index == options.abort_at:
            os.abort()
        try:
            TARGETS[options.target](Case(options.seed, index))
            returned += 1
        except AssertionError:
            raise  # a result of the wrong structure: not an acceptable outcome
        except Exception as e:  # noqa: BLE001 - any Python exception is an acceptable outcome
            raised += 1
            exceptions[f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"] += 1
    if options.summary:
        for message, count in exceptions.most_common(40):
            print(f"{count:5d} {message}")
    print(f"done: {returned} returned, {raised} raised", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
