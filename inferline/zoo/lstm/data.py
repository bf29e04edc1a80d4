"""Offline data for the LSTM forecaster: yearly sunspot numbers 1700-2008 shipped with statsmodels.

The held-out set is the end of the series (a forecaster is judged on the future, never on shuffled years):
targets in the last TEST_FRACTION of the years, whose input windows may reach back into the training years.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_FRACTION = 0.2
SOURCE = "statsmodels.datasets.sunspots (SUNACTIVITY, yearly 1700-2008)"


@dataclass(frozen=True)
class Series:
    values: np.ndarray   # float64 [n], original units
    years: np.ndarray    # int [n]
    split: int           # first held-out index: values[:split] train, values[split:] test

    @property
    def train(self) -> np.ndarray:
        return self.values[: self.split]


def load_sunspots() -> Series:
    """The whole series, and where the held-out tail starts."""
    from statsmodels.datasets import sunspots

    frame = sunspots.load_pandas().data
    values = frame["SUNACTIVITY"].to_numpy(dtype=np.float64)
    years = frame["YEAR"].to_numpy().astype(int)
    if not np.isfinite(values).all():
        raise ValueError("sunspots series has missing values")
    return Series(values, years, int(round(len(values) * (1 - TEST_FRACTION))))


def windows(values: np.ndarray, window: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs values[t-window:t] and targets values[t] for every t in [max(start, window), stop)."""
    ts = np.arange(max(start, window), stop)
    x = np.stack([values[t - window: t] for t in ts])
    return x, values[ts]
