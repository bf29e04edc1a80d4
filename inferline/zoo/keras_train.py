"""What the Keras training recipes (cnn, sentiment) share: a seeded, deterministic TensorFlow, a plain batched forward
pass for evaluation, and saving the model as a new store version with the manifest fields every Keras artifact has.

TensorFlow is imported inside functions only, as in the runtimes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferline.server.runtimes.keras_rt import configure_tensorflow
from inferline.zoo.build import allocate_version


def start(threads: int, seed: int) -> tuple[Any, Any]:
    """Import TF with `threads` threads (first: TF reads its log level and thread counts at import/first op), then
    Keras, seeded and with deterministic ops so a rebuild from the same data gives the same model. Returns (tf, keras).
    """
    tf = configure_tensorflow(threads)
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return tf, keras


def evaluate(tf: Any, model: Any, x: np.ndarray, chunk: int) -> np.ndarray:
    """model(x) in inference mode, `chunk` rows at a time through one tf.function: model.predict adds seconds of
    overhead for nothing here."""
    forward = tf.function(lambda rows: model(rows, training=False))
    return np.concatenate([forward(tf.constant(x[i:i + chunk])).numpy() for i in range(0, len(x), chunk)])


def save_version(store: Path, name: str, runtime: str, model: Any, files: dict[str, str]
                 ) -> tuple[Path, dict[str, Any]]:
    """Save `model` as files["model"] in a new version directory of `name`; return the directory and the start of its
    manifest (name, version, runtime, framework, format, files, keras_version). The caller adds its own fields and
    writes the manifest last, after any other file in `files`."""
    import keras

    version, path = allocate_version(store, name)
    model.save(path / files["model"])
    head: dict[str, Any] = {"name": name, "version": version, "runtime": runtime, "framework": "tensorflow",
                            "format": "keras", "files": files, "keras_version": keras.__version__}
    return path, head
