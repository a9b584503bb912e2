"""fused_lstm: a fused LSTM for PyTorch, C++ on the CPU and CUDA on NVIDIA GPUs.

``fused_lstm.LSTM`` and ``fused_lstm.LSTMCell`` are drop-ins for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell``;
``fused_lstm.convert(model)`` swaps them into an existing model in place (``fused_lstm.unconvert`` back);
``fused_lstm.compile(model)`` is torch.compile for models with LSTMs (see compiler.py);
``fused_lstm.lstm_layer`` is the differentiable fused op for one layer and one direction.
"""

import torch  # loads libtorch before our extension

from . import ops
from .compiler import compile
from .deploy import unconvert
from .modules import LSTM, LSTMCell, convert
from .ops import lstm_layer

__all__ = ["LSTM", "LSTMCell", "compile", "convert", "lstm_layer", "ops", "unconvert"]

# torch.save writes a fused module as its torch class (deploy.py); this lets torch.load's default
# (weights_only=True) read checkpoints that hold the fused classes themselves, where fused_lstm is imported.
torch.serialization.add_safe_globals([LSTM, LSTMCell])
__version__ = "0.1.0"
