"""fused_lstm.LSTM and fused_lstm.LSTMCell: torch.nn.LSTM / torch.nn.LSTMCell with a fused forward.

They subclass the torch classes, so the constructor, validation, parameters, initialisation, state_dict and
repr are torch's own, and ``isinstance(m, nn.LSTM)`` holds (deploy.py: how they deploy as torch's). Only
``forward`` is new: it takes the same inputs, makes the same checks with the same messages (nn.LSTM's and
ATen's, in their order) and runs each layer through the fused ops (ops.lstm_layer;
ops.lstm_bidirectional_layer for both directions at once).
Stacking, dropout between layers and the PackedSequence sort / unsort stay here in Python.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .deploy import DeploysAsTorch, exporting_to_onnx, runs_as_torch
from .ops import _aten_name, lstm_bidirectional_layer, lstm_layer

__all__ = ["LSTM", "LSTMCell", "convert"]


class LSTM(DeploysAsTorch, nn.LSTM):
    """Drop-in for :class:`torch.nn.LSTM` (same arguments, parameters, inputs, outputs and errors)."""

    torch_class = nn.LSTM

    def torch_constructor_args(self, device: str) -> tuple:
        return (self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first, 0.0,
                self.bidirectional, self.proj_size, device)  # fmt: skip

    def forward(self, input, hx=None):
        if runs_as_torch():
            if self.proj_size > 0 and exporting_to_onnx():  # torch's own exporters fail unclearly or late here
                raise torch.onnx.errors.OnnxExporterError(
                    f"fused_lstm.LSTM: ONNX's LSTM operator has no projection, so an LSTM with proj_size="
                    f"{self.proj_size} cannot be exported to ONNX"
                )
            return super().forward(input, hx)
        # nn.LSTM stores bidirectional unchecked; its C++ op then refuses a non-bool. Checked in eager calls only:
        # Dynamo 2.15 cannot trace a test of this attribute's type (a graph break with allow_rnn, and without
        # it the test runs before Dynamo's refusal of the module, which it delays to the module's first use).
        if not torch.compiler.is_compiling() and not isinstance(self.bidirectional, bool):
            raise TypeError(f"lstm() received an invalid combination of arguments - bidirectional must be a bool, "
                            f"got {type(self.bidirectional).__name__}")
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, self._weights())
        return self._forward_dense(input, hx, self._weights())

    def _weights(self) -> list[Tensor]:
        """The current weights in nn.LSTM's _flat_weights order. nn.LSTM refreshes _flat_weights when a weight
        object changed, checking each against a weak reference (17 us a call for one layer, measured); reading
        them is cheaper."""
        return _parameters_named(self, self._flat_weights_names)

    def _forward_dense(self, input: Tensor, hx, weights: list[Tensor]):
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:  # zeros, made in _run_layers: nothing to check
            self.check_input(input, None)
        else:
            hx = _batched_state(hx, is_batched)
            self.check_forward_args(input, hx, None)
        autocast = _autocast_dtype(input)
        self._check_state_and_parameters(input, hx, weights, autocast)
        if input.size(1 - batch_dim) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        time_major = input.transpose(0, 1) if self.batch_first else input
        output, h_n, c_n = self._run_layers(time_major, None, hx, weights, autocast, time_major.size(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _forward_packed(self, input: PackedSequence, hx, weights: list[Tensor]):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        # Read once: under torch.compile the batch is a data-dependent (unbacked) size, and one symbol for it
        # lets the compiler see that the zero state and the op's outputs agree.
        batch = int(batch_sizes[0])
        hx = None if hx is None else self.permute_hidden(hx, sorted_indices)  # None: zeros, made in _run_layers
        autocast = _autocast_dtype(data)
        self._check_packed(data, batch, hx, weights[0], autocast)
        self._check_state_and_parameters(data, hx, weights, autocast)
        output, h_n, c_n = self._run_layers(data, batch_sizes, hx, weights, autocast, batch)
        if autocast is not None and data.device.type == "cpu":  # nn.LSTM's packed CPU path runs op by op
            c_0 = data if hx is None else hx[1]  # (zeros would have data's dtype)
            output, h_n, c_n = _promoted_to_cell_state((output, h_n, c_n), autocast, c_0)
        packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return packed, self.permute_hidden((h_n, c_n), unsorted_indices)

    def _check_packed(self, data: Tensor, batch: int, hx, w_ih: Tensor, autocast: torch.dtype | None) -> None:
        """nn.LSTM makes no Python checks on packed input; these give the errors its C++ path gives, in its
        order: projection sizes (inferred from hx[0].size(2) != hx[1].size(2)), layer count, the input GEMM,
        then the batch size. hx None (zeros, made alike) has nothing to check."""
        states = () if hx is None else (hx[0], hx[1])
        if states:
            h, c = states
            if h.size(2) != (self.proj_size or self.hidden_size) or c.size(2) != self.hidden_size:
                raise RuntimeError("got an incorrect number of RNN parameters")
            if h.size(0) < self.num_layers * (2 if self.bidirectional else 1):
                raise RuntimeError("Expected more hidden states in stacked_rnn")
        if data.size(-1) != self.input_size:  # nn.LSTM's first GEMM, linear(data, w_ih, b_ih), refuses it
            _raise_torch_error(F.linear, data, w_ih, w_ih[:, 0] if self.bias else None)
        _check_first_gemm_dtypes(data, w_ih, autocast)
        for state in states:
            if torch.compiler.is_compiling():
                # The batch is data-dependent there: a graph cannot branch on it, but can assert it at run time.
                torch._check(state.size(1) == batch)
            elif state.size(1) != batch:
                raise RuntimeError(
                    f"The size of tensor a ({state.size(1)}) must match the size of tensor b ({batch}) "
                    "at non-singleton dimension 0"
                )

    def _check_state_and_parameters(self, input: Tensor, hx, weights: list[Tensor], autocast: torch.dtype | None) -> None:
        """What nn.LSTM's C++ checks, with its messages; and the dtype of hx (None: zeros, made alike), where its
        messages are accidents of the backend (oneDNN's, the native path's), with one that names the tensor."""
        if hx is None:
            hx = ()
        elif len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        for state in hx:
            if state.device != input.device:
                raise RuntimeError(
                    "Input and hidden tensors are not at the same device, found input tensor at "
                    f"{input.device} and hidden tensor at {state.device}"
                )
        for weight in weights:
            if weight.device != input.device:
                raise RuntimeError(
                    "Input and parameter tensors are not at the same device, found input tensor at "
                    f"{input.device} and parameter tensor at {weight.device}"
                )
        if autocast is not None:  # autocast casts what it may; the first GEMM meets the rest
            _check_first_gemm_dtypes(input, weights[0], autocast)
            return
        for name, state in zip(("hx[0] (h_0)", "hx[1] (c_0)"), hx):
            if state.dtype != input.dtype:
                raise RuntimeError(f"LSTM: {name} has dtype {state.dtype} but the input has dtype {input.dtype}")

    def _layer_weights(self, weights: list[Tensor], index: int, dtype: torch.dtype | None) -> list[Tensor | None]:
        """w_ih, w_hh, b_ih, b_hh, w_hr of the layer-direction `index` (layer * D + direction) among `weights`,
        cast to `dtype` if given."""
        per_layer = len(weights) // (self.num_layers * (2 if self.bidirectional else 1))
        w_ih, w_hh, *rest = weights[index * per_layer : (index + 1) * per_layer]
        b_ih, b_hh = rest[:2] if self.bias else (None, None)
        w_hr = rest[-1] if self.proj_size > 0 else None
        return [_cast(w, dtype) for w in (w_ih, w_hh, b_ih, b_hh, w_hr)]

    def _run_layers(
        self, x: Tensor, batch_sizes: Tensor | None, hx, weights: list[Tensor], dtype: torch.dtype | None, batch
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [T, B, I] or packed [N, I]; hx: ([L*D, B, Hout], [L*D, B, H]), or None for zeros; weights:
        _weights(); dtype: autocast's, or None; batch: B -> output, h_n, c_n.

        Dropout follows every layer but the last, in training, drawn as F.dropout draws it (so a seed gives
        nn.LSTM's masks); h_n and c_n are taken before it.
        """
        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        layer_input = _cast(x, dtype)
        if hx is None:  # one zero state for every layer (the op copies its h0 and c0): a small call's saving
            h_zeros = layer_input.new_zeros(batch, self.proj_size or self.hidden_size)
            c_zeros = h_zeros if not self.proj_size else layer_input.new_zeros(batch, self.hidden_size)
            initial_state = lambda index: (h_zeros, c_zeros)  # noqa: E731
        else:
            h0, c0 = _cast(hx[0], dtype), _cast(hx[1], dtype)
            initial_state = lambda index: (h0[index], c0[index])  # noqa: E731
        for layer in range(self.num_layers):
            directions_args = [(*initial_state(index), *self._layer_weights(weights, index, dtype))
                               for index in range(layer * directions, (layer + 1) * directions)]  # fmt: skip
            if directions == 1:
                results = [lstm_layer(layer_input, *directions_args[0], batch_sizes=batch_sizes)]
            else:
                results = lstm_bidirectional_layer(layer_input, *directions_args, batch_sizes=batch_sizes)
            outputs = [output for output, _, _ in results]
            h_n += [h for _, h, _ in results]
            c_n += [c for _, _, c in results]
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout != 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        if len(h_n) == 1:  # cheaper than a stack of one
            return layer_input, h_n[0].unsqueeze(0), c_n[0].unsqueeze(0)
        return layer_input, torch.stack(h_n), torch.stack(c_n)


class LSTMCell(DeploysAsTorch, nn.LSTMCell):
    """Drop-in for :class:`torch.nn.LSTMCell`: one step, run by the same fused op as a one-step sequence."""

    torch_class = nn.LSTMCell

    def torch_constructor_args(self, device: str) -> tuple:
        return (self.input_size, self.hidden_size, self.bias, device)

    def forward(self, input: Tensor, hx=None) -> tuple[Tensor, Tensor]:
        if runs_as_torch():
            return super().forward(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if isinstance(hx, Tensor):
            raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not Tensor")
        dtype = _cell_autocast_dtype(input)
        weights = _parameters_named(self, _CELL_WEIGHTS)
        self._check_cell_args(input, hx, *weights[:2], check_dtypes=dtype is None)
        args = (input.unsqueeze(0), hx[0], hx[1], *weights)  # a sequence of one step
        output, _, c_1 = lstm_layer(*(args if dtype is None else (_cast(t, dtype) for t in args)))
        h_1 = output.squeeze(0)
        if dtype is not None and not input.is_cuda:
            # The CPU's lstm_cell runs op by op, its GEMMs autocast: the cell update promotes to c_0's dtype. On
            # CUDA autocast casts lstm_cell itself, hx included, so its results stay in the dtype computed in.
            h_1, c_1 = _promoted_to_cell_state((h_1, c_1), dtype, hx[1])
        if not is_batched:
            return h_1.squeeze(0), c_1.squeeze(0)
        return h_1, c_1

    @staticmethod
    def _check_cell_args(input: Tensor, hx, w_ih: Tensor, w_hh: Tensor, check_dtypes: bool) -> None:
        """The checks of ATen's lstm_cell, in its order and with its messages: its shape checks by torch's own
        lstm_cell on stand-ins, then its dtype checks (only outside autocast, which casts first)."""
        if len(hx) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        hidden, (batch, features) = w_hh.size(1), input.shape
        h, c = hx
        # The usual call passes every check: settle it in one comparison (the checks below cost microseconds,
        # a good part of a small cell's call).
        dtype = input.dtype
        if (features == w_ih.size(1) and w_ih.shape[0] == w_hh.shape[0] == 4 * hidden
                and h.shape == c.shape == (batch, hidden)
                and (not check_dtypes or dtype == w_ih.dtype == w_hh.dtype == h.dtype == c.dtype)):  # fmt: skip
            return
        # A shape torch refuses: its own lstm_cell refuses it first, with the message of the torch at hand.
        _raise_torch_error(torch.lstm_cell, input, [h, c], w_ih, w_hh)
        if not check_dtypes:
            return
        for mat1, mat2 in ((input, w_ih), (h, w_hh)):
            _check_matmul_dtypes(mat1.dtype, mat2.dtype)
        if c.dtype != dtype:
            raise RuntimeError(f"LSTMCell: hx[1] (c_0) has dtype {c.dtype} but the input has dtype {dtype}")


def _batched_state(hx, is_batched: bool):
    """A given hx of dense input, checked against the input's rank (nn.LSTM's messages); with a batch
    dimension of 1 added for unbatched input."""
    rank = 3 if is_batched else 2
    if hx[0].dim() != rank or hx[1].dim() != rank:
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        raise RuntimeError(
            f"For {kind} input, hx and cx should also be {rank}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
        )
    return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _raise_torch_error(op, *args) -> None:
    """Calls torch's own `op` on stand-ins for the tensors among `args` (a list of tensors stands for itself):
    zero-stride float32 tensors of their shapes on the first one's device, which hold no memory. So the error
    `op` raises for these shapes, and only for them, is raised with the message of the torch at hand (messages
    change between releases: 2.15 put "addmm: " before GEMM shape errors). Returns where `op` raises nothing."""
    device = args[0].device

    def stand_in(t):
        if isinstance(t, (list, tuple)):
            return [stand_in(x) for x in t]
        return t if t is None else torch.zeros((), device=device).expand(t.shape)

    # Autocast would cast the stand-ins, making full-size copies of them (there is none on other devices).
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()
    with torch.no_grad(), no_autocast:
        op(*(stand_in(t) for t in args))


def _parameters_named(module: nn.Module, names) -> list[Tensor | None]:
    """module's parameters of these names, read from _parameters: nn.Module's __getattr__ costs about a
    microsecond each, a good part of a small call. A parametrized weight (torch.nn.utils.parametrize) is not in
    _parameters, and is computed by its getattr."""
    params = module._parameters
    return [params[name] if name in params else getattr(module, name) for name in names]


def _autocast_dtype(input: Tensor) -> torch.dtype | None:
    """The dtype autocast runs nn.LSTM in on this input's device (its op is on autocast's lower-precision
    list), or None outside autocast. On CUDA, nn.LSTM's cuDNN path casts to float16 whatever autocast's dtype."""
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if device_type == "cuda" and torch.backends.cudnn.is_acceptable(input):
        return torch.float16
    return torch.get_autocast_dtype(device_type)


def _cell_autocast_dtype(input: Tensor) -> torch.dtype | None:
    """The dtype nn.LSTMCell computes in under autocast, or None. Its op is on CUDA autocast's lower-precision
    list, which casts every floating argument but float64 (input, both hx and the weights) to autocast's dtype
    and so returns that dtype. On the CPU it is not, but its GEMMs are: lower-precision input then runs in its
    own dtype, and float32 input gets float32 results (fused_lstm computes those in float32 throughout)."""
    if input.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if input.device.type == "cpu" and torch.is_autocast_enabled("cpu") and input.dtype in (torch.float16, torch.bfloat16):
        return input.dtype
    return None


def _autocast_target(dtype: torch.dtype, autocast: torch.dtype) -> torch.dtype:
    """What autocast makes of a tensor of `dtype`: floating types but float64 become `autocast`."""
    return autocast if dtype.is_floating_point and dtype != torch.float64 else dtype


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """t as autocast to `dtype` casts it (unchanged if dtype is None)."""
    return t if t is None or dtype is None else t.to(_autocast_target(t.dtype, dtype))


def _check_matmul_dtypes(mat1: torch.dtype, mat2: torch.dtype) -> None:
    """ATen's matmul refusal of operands of different dtypes, with its message (Float, Half, Long, ...)."""
    if mat1 != mat2:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_aten_name(mat1)} and {_aten_name(mat2)}")


def _check_first_gemm_dtypes(input: Tensor, w_ih: Tensor, autocast: torch.dtype | None) -> None:
    """nn.LSTM's first GEMM, input W_ih^T, on the dtypes autocast (the dtype it runs in, or None) leaves them."""
    _check_matmul_dtypes(*(t.dtype if autocast is None else _autocast_target(t.dtype, autocast) for t in (input, w_ih)))


def _promoted_to_cell_state(results: tuple[Tensor, ...], dtype: torch.dtype, c_0: Tensor) -> tuple[Tensor, ...]:
    """Results computed in autocast's `dtype`, as nn.LSTM's op-by-op paths return them under autocast: their
    cell update promotes to c_0's dtype."""
    target = torch.promote_types(dtype, c_0.dtype)
    return tuple(t.to(target) for t in results)


def convert(module: nn.Module) -> nn.Module:
    """Makes every torch.nn.LSTM and torch.nn.LSTMCell in `module` (itself included) fused, in place.

    Only the class of each instance changes: its Parameters, buffers, hooks and state stay the very same
    objects, so an optimizer built before the swap keeps working. Subclasses of nn.LSTM / nn.LSTMCell are
    left alone (they may override forward). Returns `module`.
    """
    swaps = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}
    for submodule in module.modules():
        if type(submodule) in swaps:
            submodule.__class__ = swaps[type(submodule)]
    return module
