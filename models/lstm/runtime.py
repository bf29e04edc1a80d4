"""Serve the LSTM forecaster: {"series", "horizon"} (task route /forecast) or FP32 rows (Open Inference Protocol).

Each item is reduced to its last `window` values, normalised. predict_batch stacks every row of every item and
forecasts autoregressively to the batch's largest horizon, one forward pass per step for the whole batch; each item
then keeps its own horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import store as model_store
from models.lstm.model import LstmForecaster, forecast
from service.runtimes.base import InputError, TaskRequest, TensorSpec, only_input, split_rows, stack_rows
from service.runtimes.torch_rt import TorchRuntime

INPUT = "series"
OUTPUT = "forecast"
DEFAULT_HORIZON = 1
_FP32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class LstmItem:
    """One request, decoded: its input windows [n, window], normalised with the artifact's mean and std, and how many
    steps ahead to forecast."""

    windows: np.ndarray
    horizon: int


class LstmRuntime(TorchRuntime[LstmItem, np.ndarray]):
    def __init__(self) -> None:
        super().__init__()
        self.window = 0
        self.max_horizon = 0
        self.mean = 0.0
        self.std = 1.0

    def read_artifact(self, artifact: Path) -> Path:
        path = model_store.resolve(artifact)
        self.manifest = model_store.read_manifest(path)
        self.window = int(self.manifest["window"])
        self.max_horizon = int(self.manifest["max_horizon"])
        self.mean = float(self.manifest["normalisation"]["mean"])
        self.std = float(self.manifest["normalisation"]["std"])
        return path

    def build_model(self, path: Path) -> LstmForecaster:
        net = self.manifest["network"]
        model = LstmForecaster(hidden=int(net["hidden"]), layers=int(net["layers"]))
        model.load_state_dict(torch.load(path / self.manifest["files"]["model"], map_location="cpu", weights_only=True))
        return model

    def warm_up_batch(self) -> list[LstmItem]:
        return [LstmItem(np.zeros((1, self.window), np.float32), 2)]

    # Task route ------------------------------------------------------------------------------------------------

    def preprocess(self, request: TaskRequest) -> LstmItem:
        horizon = self._horizon(request.params.get("horizon", DEFAULT_HORIZON), "horizon")
        series = request.params.get("series")
        if not isinstance(series, (list, tuple)):
            raise InputError(f"`series` must be a list of at least {self.window} numbers. "
                             f"Given: {type(series).__name__}", field="series")
        for i, value in enumerate(series):
            # bool is an int subclass, but `true` is not a measurement.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"`series[{i}]` must be a number. Given: {value!r}", field="series")
            if not math.isfinite(value) or abs(value) > _FP32_MAX:
                raise InputError(f"`series[{i}]` must be a finite number. Given: {value!r}", field="series")
        if len(series) < self.window:
            raise InputError(f"`series` must have at least {self.window} values. Given: {len(series)}",
                             field="series")
        row = np.asarray(series[-self.window:], dtype=np.float64)[None]
        return LstmItem(self._normalise(row), horizon)

    def postprocess(self, output: np.ndarray, request: TaskRequest) -> dict[str, Any]:
        return {"model": "lstm", "version": self.version, "forecast": [float(v) for v in output[0]]}

    def predict_batch(self, batch: list[LstmItem]) -> list[np.ndarray]:
        horizon = max(item.horizon for item in batch)
        z = self.forward(stack_rows([item.windows for item in batch]), lambda model, x: forecast(model, x, horizon))
        values = (z.astype(np.float64) * self.std + self.mean).astype(np.float32)
        parts = split_rows(values, [len(item.windows) for item in batch])
        return [part[:, : item.horizon] for part, item in zip(parts, batch, strict=True)]

    # Open Inference Protocol -----------------------------------------------------------------------------------

    def v2_inputs(self) -> list[TensorSpec]:
        return [TensorSpec(INPUT, "FP32", [-1, -1])]

    def v2_outputs(self) -> list[TensorSpec]:
        return [TensorSpec(OUTPUT, "FP32", [-1, -1])]

    def v2_preprocess(self, tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> LstmItem:
        given = np.asarray(only_input(tensors, INPUT, "FP32 [-1, -1]"))
        horizon = self._horizon((parameters or {}).get("horizon", DEFAULT_HORIZON), "parameters.horizon")
        x = given[None] if given.ndim == 1 else given   # one series sent without its batch dimension
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < self.window:
            raise InputError(f"`{INPUT}` must have shape [-1, -1] with at least {self.window} values per row. "
                             f"Given: {list(given.shape)}", field=INPUT)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InputError(f"`{INPUT}` must be FP32. Given: {x.dtype}", field=INPUT)
        x = x.astype(np.float64, copy=False)
        bad = ~np.isfinite(x) | (np.abs(x) > _FP32_MAX)
        if bad.any():
            row, col = (int(i[0]) for i in np.nonzero(bad))
            raise InputError(f"`{INPUT}` must hold finite numbers. Given: {x[row, col]} at [{row}, {col}]",
                             field=INPUT)
        return LstmItem(self._normalise(x[:, -self.window:]), horizon)

    def v2_postprocess(self, output: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT: output.astype(np.float32, copy=False)}

    # Helpers ---------------------------------------------------------------------------------------------------

    def _horizon(self, value: Any, field: str) -> int:
        if value is None:
            return DEFAULT_HORIZON
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= self.max_horizon:
            raise InputError(f"`{field}` must be an integer between 1 and {self.max_horizon}. Given: {value!r}",
                             field=field)
        return int(value)

    def _normalise(self, rows: np.ndarray) -> np.ndarray:
        return ((rows - self.mean) / self.std).astype(np.float32)
