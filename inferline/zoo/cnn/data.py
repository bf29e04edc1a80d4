"""Offline data for the digit CNN: sklearn's digits (default), or keras.datasets MNIST / CIFAR-10.

Every source goes through imaging.image_to_array, the same function the runtime applies to uploaded files, so
training and serving preprocess identically. MNIST and CIFAR-10 need a download (they fail on an offline machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from inferline.zoo.cnn.imaging import ImageFormat, digit_image, image_to_array

SOURCES = ("digits", "mnist", "cifar10")
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TEST_FRACTION = 0.2
QUICK_TRAIN = 400           # quick builds: a small stratified subset is enough to be better than chance


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray      # float32 [n, H, W, C]
    y_train: np.ndarray      # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    fmt: ImageFormat
    source: str


def load_split(source: str = "digits", quick: bool = False, seed: int = 0) -> Split:
    """Train/test split of `source`. Digits: a stratified 80/20 split; MNIST/CIFAR-10: their own test sets."""
    if source == "digits":
        split = _digits(seed)
    elif source == "mnist":
        split = _keras_dataset("mnist", ImageFormat(28, 28, 1), tuple(str(i) for i in range(10)))
    elif source == "cifar10":
        # Natural images: keep colour and the native size; inverting "light backgrounds" makes no sense here.
        split = _keras_dataset("cifar10", ImageFormat(32, 32, 3, invert_light_background=False), CIFAR10_LABELS)
    else:
        raise ValueError(f"unknown source {source!r}; choose from {SOURCES}")
    if quick:
        split = _subset(split, QUICK_TRAIN, seed)
    return split


def _digits(seed: int) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    fmt = ImageFormat(28, 28, 1)
    x = np.stack([image_to_array(digit_image(img), fmt) for img in digits.images])
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return Split(x_train, y_train, x_test, y_test, tuple(str(i) for i in range(10)), fmt, "digits")


def _keras_dataset(name: str, fmt: ImageFormat, labels: tuple[str, ...]) -> Split:
    import keras

    loader = {"mnist": keras.datasets.mnist, "cifar10": keras.datasets.cifar10}[name]
    (x_train, y_train), (x_test, y_test) = loader.load_data()

    def convert(images: np.ndarray) -> np.ndarray:
        return np.stack([image_to_array(Image.fromarray(img), fmt) for img in images])

    return Split(convert(x_train), y_train.reshape(-1).astype(np.int64), convert(x_test),
                 y_test.reshape(-1).astype(np.int64), labels, fmt, name)


def _subset(split: Split, n: int, seed: int) -> Split:
    """A class-balanced subset of the training rows; the test set stays whole so quick metrics stay comparable."""
    rng = np.random.default_rng(seed)
    per_class = max(1, n // len(split.labels))
    keep = np.concatenate([rng.permutation(np.flatnonzero(split.y_train == c))[:per_class]
                           for c in range(len(split.labels))])
    keep = np.sort(keep)
    return Split(split.x_train[keep], split.y_train[keep], split.x_test, split.y_test, split.labels, split.fmt,
                 split.source)
