"""KerasRuntime: the shared half of every Keras (TensorFlow) model runtime.

ArtifactRuntime.load() has the subclass read its store version; place() then imports TF with the worker's thread
count, loads the saved Keras model onto the device and wraps it in one tf.function with a fixed input signature,
which the warm-up batch traces once. forward() runs a whole batch through that function: no retrace per batch size,
and none of model.predict's per-call overhead (50-65 ms against ~3 ms for a small batch, ../shared/ENVIRONMENT.md).

TensorFlow and Keras are imported inside functions only: importing this module loads no framework.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from service.runtimes.base import ArtifactRuntime, Output, Prepared

log = logging.getLogger(__name__)

__all__ = ["KerasRuntime", "configure_tensorflow", "tf_device"]


class KerasRuntime(ArtifactRuntime[Prepared, Output]):
    """A Keras model saved as one file in a store version directory (`manifest["files"]["model"]`), served through
    one tf.function whose input signature input_spec() gives. Subclasses implement read_artifact, input_spec and
    warm_up_batch, and call forward() from predict_batch."""

    platform = "tensorflow_keras"

    def __init__(self) -> None:
        super().__init__()
        self._forward: Any = None

    @abstractmethod
    def input_spec(self) -> tuple[tuple[int, ...], str]:
        """The shape of one input row (no batch dimension) and its dtype name ("float32", "int32", ...)."""

    def place(self, path: Path, device: str, threads: int) -> str:
        tf = configure_tensorflow(threads)
        import keras

        placement = tf_device(tf, device)
        with tf.device(placement):
            model = keras.saving.load_model(path / self.manifest["files"]["model"], compile=False)
        model.trainable = False
        self._forward = _fixed_signature(tf, model, placement, *self.input_spec())
        return placement

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the model on a whole batch `x` [n, *input row shape] of the input dtype; return its output as numpy.
        Raises RuntimeError before load()."""
        if self._forward is None:
            raise RuntimeError(f"{type(self).__name__}.load() first")
        out: np.ndarray = self._forward(x).numpy()
        return out


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
