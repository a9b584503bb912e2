"""fused_lstm: a fused LSTM for PyTorch, C++ on the CPU and CUDA on NVIDIA GPUs.

``fused_lstm.LSTM`` and ``fused_lstm.LSTMCell`` are drop-ins for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell``;
``fused_lstm.convert(model)`` swaps them into an existing model in place; ``fused_lstm.compile(model)`` is
torch.compile for models with LSTMs (see compiler.py); ``fused_lstm.lstm_layer`` is the
differentiable fused op for one layer and one direction.
"""

import torch  # noqa: F401  (loads libtorch before our extension)

from . import ops
from .compiler import compile
from .modules import LSTM, LSTMCell, convert
from .ops import lstm_layer

__all__ = ["LSTM", "LSTMCell", "compile", "convert", "lstm_layer", "ops"]
__version__ = "0.1.0"
