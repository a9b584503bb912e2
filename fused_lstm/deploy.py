"""How a fused module deploys: as the torch module it replaces, wherever torch's deployment paths need it.

The fused ops are custom ops that only this package can run. Where a model leaves the process (a TorchScript
file, an ONNX graph, a checkpoint), a fused module is written as its torch class, so that what is deployed
is what nn.LSTM / nn.LSTMCell would deploy and loads wherever theirs loads, without fused_lstm:

- torch.jit.script scripts the torch class (``__prepare_scriptable__``: a copy sharing the parameters);
- torch.jit.trace and both ONNX exporters record the torch class's forward (``runs_as_torch``): aten::lstm,
  which the exporters turn into ONNX's LSTM operator;
- torch.save pickles the torch class (``__reduce_ex__``); pickle.dumps and copy.deepcopy keep the fused one.
  ``convert`` turns a loaded model's torch modules back into fused ones.
- torch.ao.quantization matches modules by exact class and leaves a fused module in float: it warns so when
  quantization gives one a qconfig. ``unconvert`` turns fused modules back into torch's first.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn


class DeploysAsTorch:
    """Mixed into a fused class ahead of its torch class (``torch_class``), which it deploys as."""

    torch_class: type[nn.Module]

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script scripts: a shallow copy of the torch class, sharing parameters and buffers."""
        scriptable = copy.copy(self)
        scriptable.__class__ = self.torch_class
        return scriptable

    def __reduce_ex__(self, protocol):
        """For torch.save, the torch class, so that a checkpoint loads where the torch class's does, torch.load's
        weights_only=True included (with the torch class among its safe globals); this class for every other
        pickler (pickle, deepcopy, multiprocessing). The pickle calls the torch class's constructor on the meta
        device (no memory, no draw from the random generator), then sets the state: the pickler refuses
        __newobj__ of a class other than the object's, and weights_only allows calls of safe globals only."""
        reduced = super().__reduce_ex__(protocol)
        if not _pickled_by_torch_save():
            return reduced
        _, _, state, *rest = reduced
        return (self.torch_class, self.torch_constructor_args("meta"), state, *rest)

    def torch_constructor_args(self, device: str) -> tuple:
        """The torch class's positional constructor arguments that make this module's shapes on `device`."""
        raise NotImplementedError

    def __setattr__(self, name: str, value) -> None:
        if name == "qconfig":  # torch.ao.quantization's propagate_qconfig_ is preparing this model
            warnings.warn(
                f"torch.ao.quantization leaves fused_lstm.{type(self).__name__} in float: it matches modules by "
                f"exact class. Call fused_lstm.unconvert(model) first to quantize it as nn.{self.torch_class.__name__}.",
                stacklevel=2,
            )
        super().__setattr__(name, value)


def runs_as_torch() -> bool:
    """Whether a forward must run the torch class's own: under torch.jit.trace (whose file must load without
    fused_lstm) and ONNX export (whose exporters know aten::lstm, not the fused ops)."""
    return torch.jit.is_tracing() or exporting_to_onnx()


def exporting_to_onnx() -> bool:
    """torch.onnx.is_in_onnx_export(), also where Dynamo traces for the ONNX exporter (torch.export with
    strict=True, its second try): Dynamo folds is_in_onnx_export() to False, but reads the exporter's flag."""
    return torch.onnx.is_in_onnx_export() or getattr(_onnx_export_flags, "_is_onnx_exporting", False)


try:  # the dynamo exporter's flag, set while it exports
    from torch.onnx._internal.exporter import _flags as _onnx_export_flags
except ImportError:
    _onnx_export_flags = None


def _pickled_by_torch_save() -> bool:
    """Whether torch.save's pickler is asking: the C pickler calls __reduce_ex__ straight from torch.serialization's
    save function, with no Python frame between (the caller of __reduce_ex__ is two frames up from here)."""
    return sys._getframe(2).f_globals.get("__name__") == "torch.serialization"


def unconvert(module: nn.Module) -> nn.Module:
    """Makes every fused module in `module` (itself included) its torch class again, in place: the inverse of
    ``convert``. Parameters, buffers and hooks stay the very same objects. Returns `module`."""
    for submodule in module.modules():
        if isinstance(submodule, DeploysAsTorch):
            object.__setattr__(submodule, "__class__", submodule.torch_class)
    return module
