"""How a fused module deploys: as the torch module it replaces, wherever torch's deployment paths need it.

The fused ops are custom ops that only this package can run. Where a model leaves the process (a TorchScript
file, an ONNX graph, a checkpoint), fused_lstm.LSTM and LSTMCell are written as nn.LSTM and nn.LSTMCell, so
that what is deployed is what torch's modules would deploy, and loads wherever theirs loads, without fused_lstm:

- torch.jit.script scripts the torch class (``__prepare_scriptable__``: a copy sharing the parameters, which
  torch.jit.script puts in the place of the fused module in the model it is given);
- torch.jit.trace and both ONNX exporters record the torch class's forward (``runs_as_torch``): aten::lstm,
  which the exporters turn into ONNX's LSTM operator (an LSTMCell into its GEMMs and pointwise ops);
- torch.save pickles the torch class (``__reduce_ex__``); pickle.dumps and copy.deepcopy keep the fused one.
  ``convert`` turns a loaded model's torch modules back into fused ones.
- torch.ao.quantization matches modules by exact class and leaves a fused module in float: it warns so when
  quantization would have quantized the torch class. ``unconvert`` turns fused modules back into torch's.

A user's subclass of a fused class deploys as itself (it may override forward), as ``convert`` leaves
subclasses of torch's classes alone. torch offers no hooks for two of these: which pickler asks, and which
classes a quantization spec names, are read from the calling frame (``_caller``).
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

try:  # what torch.onnx.is_in_onnx_export() reads in torch 2.11 to 2.15, read here without its imports per call
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _torchscript_onnx_globals
except ImportError:  # another torch's layout: the public functions alone
    _onnx_flags = _torchscript_onnx_globals = None


class DeploysAsTorch:
    """Mixed into a fused class ahead of its torch class, which the fused class names as ``torch_class``."""

    torch_class: type[nn.Module]

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script scripts: a shallow copy of the torch class, sharing parameters and buffers."""
        if not _deploys_as_torch(self):
            return self
        scriptable = copy.copy(self)
        scriptable.__class__ = self.torch_class
        return scriptable

    def __reduce_ex__(self, protocol):
        """For torch.save, the torch class, so that a checkpoint loads where the torch class's does, torch.load's
        weights_only=True included (with the torch class among its safe globals); this class for every other
        pickler (pickle, deepcopy, multiprocessing). The pickle calls the torch class's constructor on the meta
        device (no memory, no draw from the random generator), then sets the state, which replaces everything the
        constructor made: the pickler refuses __newobj__ of a class other than the object's, and weights_only
        allows calls of safe globals only."""
        reduced = super().__reduce_ex__(protocol)
        caller = _caller()
        if not _deploys_as_torch(self) or caller is None or caller.f_globals.get("__name__") != "torch.serialization":
            return reduced
        _, _, state, *rest = reduced
        return (self.torch_class, self.torch_constructor_args("meta"), state, *rest)

    def torch_constructor_args(self, device: str) -> tuple:
        """Positional arguments of the torch class's constructor that make a module of this one's shapes on
        `device`, without warnings (its state then replaces every attribute)."""
        raise NotImplementedError

    def __setattr__(self, name: str, value) -> None:
        if name == "qconfig" and _quantization_names(self.torch_class, _caller()):
            warnings.warn(
                f"torch.ao.quantization leaves fused_lstm.{type(self).__name__} in float: it matches modules by "
                f"exact class. Call fused_lstm.unconvert(model) first to quantize it as "
                f"nn.{self.torch_class.__name__}.",
                stacklevel=2,
            )
        super().__setattr__(name, value)


def _deploys_as_torch(module: nn.Module) -> bool:
    """Whether `module` is of a fused class itself, not of a user's subclass of one."""
    return "torch_class" in type(module).__dict__


def _caller():
    """The frame that called the method that calls this (None at the bottom of the stack). The C pickler calls
    __reduce_ex__ straight from torch.serialization's save functions, with no Python frame between; quantization's
    propagate_qconfig_ sets qconfig from _propagate_qconfig_helper, which holds the spec as `qconfig_dict`."""
    return sys._getframe(1).f_back


def _quantization_names(torch_class: type, frame) -> bool:
    """Whether the quantization step in `frame` would have given torch_class's modules a qconfig."""
    spec = frame.f_locals.get("qconfig_dict") if frame is not None else None
    return isinstance(spec, dict) and spec.get(torch_class) is not None


def runs_as_torch() -> bool:
    """Whether a forward must run the torch class's own: under torch.jit.trace (whose file must load without
    fused_lstm) and ONNX export (whose exporters know aten::lstm, not the fused ops).

    In eager calls the flags behind torch.jit.is_tracing() and torch.onnx.is_in_onnx_export() are read directly
    (the latter imports two modules at every call: microseconds, much of a small LSTMCell call). Dynamo folds
    both functions to False, but reads the dynamo exporter's flag, set while it traces with strict=True."""
    if _onnx_flags is None or torch.compiler.is_compiling():
        return torch.jit.is_tracing() or exporting_to_onnx()
    return torch._C._is_tracing() or _torchscript_onnx_globals.in_onnx_export or _onnx_flags._is_onnx_exporting


def exporting_to_onnx() -> bool:
    """Whether either ONNX exporter is running, Dynamo's trace for the dynamo exporter included."""
    return torch.onnx.is_in_onnx_export() or (_onnx_flags is not None and _onnx_flags._is_onnx_exporting)


def unconvert(module: nn.Module) -> nn.Module:
    """Makes every fused module in `module` (itself included) its torch class again, in place: the inverse of
    ``convert`` (a user's subclass of a fused class is left alone). Parameters, buffers and hooks stay the very
    same objects. Returns `module`."""
    for submodule in module.modules():
        if _deploys_as_torch(submodule):
            submodule.__class__ = submodule.torch_class
    return module
