"""fused_lstm.compile: torch.compile for models with LSTMs, with Dynamo's RNN refusal lifted only for them.

Dynamo refuses to trace any module that is an nn.LSTM (fused_lstm.LSTM is one, on purpose) unless
``torch._dynamo.config.allow_rnn`` is True. Setting it globally would also make Dynamo trace the plain nn.LSTMs
of the rest of the program, which fails in training on torch 2.13-2.14 ("expected Tensor() for op:
aten.mkldnn_rnn_layer"). ``compile`` converts the model's own nn.LSTMs first and sets the flag only while the
compiled model runs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .modules import convert

__all__ = ["compile"]


def compile(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile(fused_lstm.convert(model), **compile_kwargs)``, with Dynamo's ``allow_rnn`` set only
    during the compiled model's calls (when Dynamo traces it).

    Every nn.LSTM / nn.LSTMCell in `model` becomes fused, in place, as with ``convert``. The result is
    torch.compile's module wrapper: it shares `model`'s parameters and state_dict. ``allow_rnn`` is a global
    setting, so a plain nn.LSTM that another thread compiles during one of these calls would see it too.
    """
    compiled = torch.compile(convert(model), **compile_kwargs)
    compiled.forward = _with_rnn_allowed(compiled.forward)
    return compiled


def _with_rnn_allowed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(allow_rnn=True):
            return forward(*args, **kwargs)

    return call
