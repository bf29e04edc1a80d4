"""The LSTM forecaster on the model contract: {"series", "horizon"} rows (/forecast, or v2 FP32 `series` rows with
`horizon` in the request's parameters). predict reduces every row to its last `window` values, normalised, and
forecasts the whole batch autoregressively to its largest horizon, one forward pass per step; each row then keeps
its own horizon."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inferline import InputError, Model, place_module, torch_forward
from inferline.zoo.lstm.model import LstmForecaster, forecast

_FP32_MAX = float(np.finfo(np.float32).max)


class SeriesRow(BaseModel):
    # strict: lax mode would turn `true` into 1 and "4.5" into 4.5; a series holds numbers, a horizon an integer.
    # forbid: a misspelt field (`horizn`) is an error, not silently the default
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    series: list[float] = Field(min_length=1)
    horizon: int = Field(1, ge=1)


class Forecast(BaseModel):
    forecast: list[float]


class Forecaster(Model):
    platform = "pytorch"
    max_batch_size = 64

    def setup(self, device: str) -> None:
        import torch

        if self.artifact is None:
            raise FileNotFoundError("Forecaster needs its artifact (an lstm store version)")
        m = self.manifest
        self.window, self.max_horizon = int(m["window"]), int(m["max_horizon"])
        self.mean, self.std = float(m["normalisation"]["mean"]), float(m["normalisation"]["std"])
        net = LstmForecaster(hidden=int(m["network"]["hidden"]), layers=int(m["network"]["layers"]))
        net.load_state_dict(torch.load(self.artifact / m["files"]["model"], map_location="cpu", weights_only=True))
        self.net, self.device = place_module(net, device, self.threads)
        self.predict([SeriesRow(series=[0.0] * self.window, horizon=2)])

    def predict(self, batch: list[SeriesRow]) -> list[Forecast]:
        for row in batch:
            self._check(row)
        windows = np.asarray([row.series[-self.window:] for row in batch], dtype=np.float64)
        horizon = max(row.horizon for row in batch)
        z = torch_forward(self.net, self.device, ((windows - self.mean) / self.std).astype(np.float32),
                          lambda net, x: forecast(net, x, horizon))
        values = (z.astype(np.float64) * self.std + self.mean).astype(np.float32)
        return [Forecast(forecast=[float(v) for v in values[i, :row.horizon]]) for i, row in enumerate(batch)]

    def _check(self, row: SeriesRow) -> None:
        if len(row.series) < self.window:
            raise InputError(f"`series` must have at least {self.window} values. Given: {len(row.series)}",
                             field="series")
        if row.horizon > self.max_horizon:
            raise InputError(f"`horizon` must be an integer between 1 and {self.max_horizon}. Given: {row.horizon}",
                             field="horizon")
        for i, value in enumerate(row.series):
            if not math.isfinite(value) or abs(value) > _FP32_MAX:
                raise InputError(f"`series[{i}]` must be a finite number. Given: {value!r}", field="series")
