"""fused_lstm: a fused LSTM for PyTorch, C++ on the CPU and CUDA on NVIDIA GPUs."""

import torch  # noqa: F401  (loads libtorch before our extension)

from . import ops
from .ops import lstm_layer

__all__ = ["lstm_layer", "ops"]
__version__ = "0.1.0"
