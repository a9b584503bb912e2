"""The model test_deploy.py deploys, in a module of its own: the processes that load the deployed model import
it, and must not import fused_lstm."""

from torch import nn


class Tagger(nn.Module):
    """An LSTM (of the given nn.LSTM arguments) and an LSTMCell, as users hold them."""

    def __init__(self, **lstm_kwargs):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, **lstm_kwargs)
        self.cell = nn.LSTMCell(3, 4)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        h1, c1 = self.cell(x[:, 0] if self.lstm.batch_first else x[0])
        return out, h, c, h1, c1
