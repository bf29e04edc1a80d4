"""Keras (TensorFlow) helpers for Model.setup: load a saved model onto a device and serve it through one tf.function
with a fixed input signature. A whole batch runs through that function: no retrace per batch size, and none of
model.predict's per-call overhead (50-65 ms against ~3 ms for a small batch, ../shared/ENVIRONMENT.md).

TensorFlow and Keras are imported inside functions only: importing this module loads no framework.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["configure_tensorflow", "keras_forward", "tf_device"]


def keras_forward(model_file: Path, device: str, threads: int, row_shape: tuple[int, ...], dtype: str
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Load a saved Keras model onto `device` with `threads` threads and return forward(x) -> numpy for a whole batch
    x [n, *row_shape] of `dtype`: one graph with a fixed input signature, traced once (no retrace per batch size,
    and none of model.predict's per-call overhead)."""
    tf = configure_tensorflow(threads)
    import keras

    placement = tf_device(tf, device)
    with tf.device(placement):
        model = keras.saving.load_model(model_file, compile=False)
    model.trainable = False
    graph = _fixed_signature(tf, model, placement, row_shape, dtype)
    return lambda x: graph(x).numpy()


def _fixed_signature(tf: Any, model: Any, placement: str, row_shape: tuple[int, ...], dtype: str) -> Any:
    """One graph over `model` for any batch size: traced once, never per batch size. Called as its concrete
    function on a tensor: the tf.function wrapper re-binds and re-checks its arguments on every call, ~0.15 ms
    of a 0.55 ms single-image cnn forward here."""

    @tf.function(input_signature=[tf.TensorSpec([None, *row_shape], tf.as_dtype(dtype))])
    def forward(x: Any) -> Any:
        with tf.device(placement):
            return model(x, training=False)

    concrete = forward.get_concrete_function()
    return lambda x: concrete(tf.constant(np.asarray(x, dtype=dtype)))


def configure_tensorflow(threads: int) -> Any:
    """Import TF with `threads` intra-op threads and return the module. TF fixes them at its first op: if TF already
    ran in this process (a test that trained first), keep what it has."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.debug("tensorflow already initialised; thread settings unchanged")
    return tf


def tf_device(tf: Any, device: str) -> str:
    """A TF device string for "cpu" / "cuda" / "cuda:N". tensorflow-cpu sees no GPU: serve on the CPU and say so."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index < len(tf.config.list_physical_devices("GPU")):
            return f"/GPU:{index}"
        log.warning("device=%s requested but tensorflow sees no GPU; serving on CPU", device)
    return "/CPU:0"
