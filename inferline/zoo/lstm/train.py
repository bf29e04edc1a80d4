"""Train the LSTM forecaster on yearly sunspots, evaluate on the held-out tail, write a versioned artifact.

Artifact: <store>/lstm/<version>/model.pt (state_dict) + manifest.json (window, normalisation, max_horizon, network
size, v2 schema, held-out metrics against the naive last-value forecast).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferline.zoo.build import allocate_version
from inferline.zoo.lstm import data
from inferline.zoo.store import write_manifest

log = logging.getLogger(__name__)

NAME = "lstm"
RUNTIME = "inferline.zoo.lstm.serve:Forecaster"
MODEL_FILE = "model.pt"
WINDOW = 24                 # two solar cycles (~11 years each)
MAX_HORIZON = 64
EVAL_HORIZON = 5            # also report a multi-step error: the runtime forecasts autoregressively
VAL_FRACTION = 0.15         # the last training windows pick the epoch; the test tail is never looked at
SEED = 0


def train(store: Path, quick: bool = False, threads: int = 1) -> Path:
    """Train, pick the epoch with the best validation error, evaluate on the held-out tail, write the artifact."""
    import torch

    from inferline.zoo.lstm.model import LstmForecaster, forecast

    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    series = data.load_sunspots()
    mean, std = float(series.train.mean()), float(series.train.std())
    z = (series.values - mean) / std

    n_fit_end = series.split - int(round((series.split - WINDOW) * VAL_FRACTION))
    x_fit, y_fit = data.windows(z, WINDOW, 0, n_fit_end)
    x_val, y_val = data.windows(z, WINDOW, n_fit_end, series.split)
    x_test, y_test = data.windows(z, WINDOW, series.split, len(z))

    hidden, epochs, patience = (16, 30, 30) if quick else (32, 300, 60)
    model = LstmForecaster(hidden=hidden, layers=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    fit_x, fit_y = torch.tensor(x_fit, dtype=torch.float32), torch.tensor(y_fit, dtype=torch.float32)
    val_x, val_y = torch.tensor(x_val, dtype=torch.float32), torch.tensor(y_val, dtype=torch.float32)
    shuffle = torch.Generator().manual_seed(SEED)
    best_val, best_epoch, best_state = float("inf"), 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(fit_x), generator=shuffle)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            optimiser.zero_grad()
            loss = torch.nn.functional.mse_loss(model(fit_x[idx]), fit_y[idx])
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.inference_mode():
            val = float(torch.mean(torch.abs(model(val_x) - val_y)))
        if val < best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()

    with torch.inference_mode():
        pred = model(torch.tensor(x_test, dtype=torch.float32)).numpy().astype(np.float64)
    actual = y_test * std + mean
    one_step = pred * std + mean
    naive = series.values[series.split - 1: -1]            # last value before each held-out target
    metrics: dict[str, Any] = {
        "mae": _mae(one_step, actual), "naive_mae": _mae(naive, actual),
        "rmse": _rmse(one_step, actual), "naive_rmse": _rmse(naive, actual),
        "baseline": "naive last-value forecast",
        "val_mae": best_val * std, "best_epoch": best_epoch,
        "n_train": int(len(x_fit)), "n_val": int(len(x_val)), "n_test": int(len(x_test)),
    }
    metrics.update(_multi_step(model, forecast, z, series.split, mean, std))
    metrics["train_seconds"] = round(time.perf_counter() - started, 2)

    version, path = allocate_version(store, NAME)
    torch.save(model.state_dict(), path / MODEL_FILE)
    manifest: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "runtime": RUNTIME,
        "framework": "pytorch",
        "format": "state_dict",
        "files": {"model": MODEL_FILE},
        "task": "time-series-forecasting",
        "network": {"class": "inferline.zoo.lstm.model:LstmForecaster", "hidden": hidden, "layers": 1},
        "inputs": [{"name": "series", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "forecast", "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {"horizon": {"type": "int", "default": 1, "min": 1, "max": MAX_HORIZON}},
        "window": WINDOW,
        "max_horizon": MAX_HORIZON,
        "normalisation": {"mean": mean, "std": std},
        "data": {"source": data.SOURCE, "frequency": "yearly", "test_fraction": data.TEST_FRACTION,
                 "first_test_year": int(series.years[series.split]), "seed": SEED},
        "metrics": metrics,
        "quick": quick,
        "torch_version": torch.__version__,
    }
    write_manifest(path, manifest)
    log.info("trained model=%s version=%s mae=%.2f naive_mae=%.2f s=%.1f", NAME, version, metrics["mae"],
             metrics["naive_mae"], metrics["train_seconds"])
    return path


def _multi_step(model: Any, forecast: Any, z: np.ndarray, split: int, mean: float, std: float) -> dict[str, float]:
    """Mean error over steps 1..EVAL_HORIZON of autoregressive forecasts from every held-out origin."""
    import torch

    origins = np.arange(split, len(z) - EVAL_HORIZON + 1)
    windows = np.stack([z[t - WINDOW: t] for t in origins])
    truth = np.stack([z[t: t + EVAL_HORIZON] for t in origins]) * std + mean
    with torch.inference_mode():
        pred = forecast(model, torch.tensor(windows, dtype=torch.float32), EVAL_HORIZON).numpy() * std + mean
    naive = np.repeat((z[origins - 1] * std + mean)[:, None], EVAL_HORIZON, axis=1)
    return {f"mae_h{EVAL_HORIZON}": _mae(pred, truth), f"naive_mae_h{EVAL_HORIZON}": _mae(naive, truth)}


def _mae(pred: np.ndarray, actual: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - actual)))


def _rmse(pred: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - actual) ** 2)))
