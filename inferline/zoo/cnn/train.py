"""Train the digit CNN, evaluate it on held-out digits, and write a versioned artifact to the store.

Artifact: <store>/cnn/<version>/model.keras + manifest.json (labels, image format, v2 schema, held-out metrics).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferline.zoo import keras_train
from inferline.zoo.cnn import data
from inferline.zoo.store import write_manifest

log = logging.getLogger(__name__)

NAME = "cnn"
RUNTIME = "inferline.zoo.cnn.serve:DigitClassifier"
MODEL_FILE = "model.keras"
SEED = 0


def train(store: Path, quick: bool = False, source: str = "digits", threads: int = 1) -> Path:
    """Train on `source` (see data.SOURCES), evaluate on its held-out split, write the artifact; return its dir."""
    started = time.perf_counter()
    tf, keras = keras_train.start(threads, SEED)

    from inferline.zoo.cnn.model import build_cnn

    split = data.load_split(source, quick=quick, seed=SEED)
    model = build_cnn(split.fmt.shape, len(split.labels), quick=quick)
    model.compile(optimizer=keras.optimizers.Adam(1e-3 if not quick else 3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    epochs = 2 if quick else 20
    model.fit(split.x_train, split.y_train, batch_size=32, epochs=epochs, shuffle=True, verbose=0)

    probs = keras_train.evaluate(tf, model, split.x_test, 256)
    accuracy = float(np.mean(probs.argmax(axis=1) == split.y_test))
    majority = float(np.mean(split.y_test == np.bincount(split.y_train).argmax()))
    seconds = time.perf_counter() - started

    path, head = keras_train.save_version(store, NAME, RUNTIME, model, {"model": MODEL_FILE})
    h, w, c = split.fmt.shape
    manifest: dict[str, Any] = {
        **head,
        "task": "image-classification",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, h, w, c]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(split.labels)]}],
        "labels": list(split.labels),
        "image": split.fmt.to_json(),
        "data": {"source": split.source, "test_fraction": data.TEST_FRACTION if source == "digits" else None,
                 "seed": SEED},
        "train": {"epochs": epochs, "batch_size": 32, "optimizer": "adam"},
        "metrics": {"accuracy": accuracy, "baseline_accuracy": majority, "baseline": "majority class",
                    "n_train": int(len(split.y_train)), "n_test": int(len(split.y_test)),
                    "train_seconds": round(seconds, 2)},
        "quick": quick,
    }
    write_manifest(path, manifest)
    log.info("trained model=%s version=%s accuracy=%.4f n_test=%d s=%.1f", NAME, head["version"], accuracy,
             len(split.y_test), seconds)
    return path
