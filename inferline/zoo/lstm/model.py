"""The forecaster: an LSTM over a window of normalised values, predicting the next normalised value."""

from __future__ import annotations

import torch
from torch import nn


class LstmForecaster(nn.Module):
    """[B, window] float32 -> [B] float32, both in normalised units. Forecasting further is autoregressive."""

    def __init__(self, hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(-1))
        return self.head(out[:, -1]).squeeze(-1)


def forecast(model: nn.Module, window: torch.Tensor, horizon: int) -> torch.Tensor:
    """Autoregressive forecast: [B, window] -> [B, horizon], one forward pass per step for the whole batch.

    Each step slides the window by one and appends the previous prediction, so the network always sees inputs of
    exactly the length it was trained on."""
    steps = []
    x = window
    for _ in range(horizon):
        nxt = model(x)
        steps.append(nxt)
        x = torch.cat([x[:, 1:], nxt.unsqueeze(-1)], dim=1)
    return torch.stack(steps, dim=1)
