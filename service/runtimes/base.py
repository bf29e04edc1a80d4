"""The Runtime contract: one model in one worker process.

load() once; then per batch: preprocess each item (may raise InputError, failing only that item),
predict_batch once for the whole batch, postprocess each item. Task routes (/classify-image,
/forecast, /sentiment) and the Open Inference Protocol (/v2/.../infer) share predict_batch: only the
decode and encode steps differ. No web framework is imported here or in any runtime.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from service.errors import InputError

log = logging.getLogger(__name__)

Prepared = TypeVar("Prepared")
Output = TypeVar("Output")

__all__ = ["ArtifactRuntime", "InputError", "Output", "Prepared", "Runtime", "TaskRequest", "TensorSpec", "only_input",
           "split_rows", "stack_rows"]


@dataclass(frozen=True)
class TaskRequest:
    """What a task route hands the worker: small validated params, and a blob of raw bytes
    (an image file for /classify-image, empty otherwise)."""

    params: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""


@dataclass(frozen=True)
class TensorSpec:
    """One Open Inference Protocol tensor: name, datatype (FP32, INT64, BYTES, ...), shape (-1 = any)."""

    name: str
    datatype: str
    shape: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


class Runtime(ABC, Generic[Prepared, Output]):
    """One model in one worker process. Subclasses set `platform` and implement the abstract methods."""

    platform: str = "unknown"          # e.g. "pytorch_torchscript", "tensorflow_savedmodel" (v2 metadata)
    manifest: dict[str, Any]

    def __init__(self) -> None:
        self.manifest = {}

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "0"))

    @abstractmethod
    def load(self, artifact: Path | None, device: str, threads: int) -> None:
        """Load weights from `artifact` (a versioned store directory) onto `device` with `threads`
        intra-op threads, and set self.manifest. Called once per process."""

    @abstractmethod
    def preprocess(self, request: TaskRequest) -> Prepared:
        """Decode one task request. Raise InputError(message, field) for bad input."""

    @abstractmethod
    def predict_batch(self, batch: list[Prepared]) -> list[Output]:
        """Run the model once for the whole batch. Return exactly one output per input, in order."""

    @abstractmethod
    def postprocess(self, output: Output, request: TaskRequest) -> dict[str, Any]:
        """Encode one output as the task route's JSON response body."""

    # Open Inference Protocol (KServe v2): the same batch path, other codecs.
    @abstractmethod
    def v2_inputs(self) -> list[TensorSpec]:
        """The input tensors a v2 infer request must carry."""

    @abstractmethod
    def v2_outputs(self) -> list[TensorSpec]:
        """The output tensors a v2 infer response carries."""

    @abstractmethod
    def v2_preprocess(self, tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> Prepared:
        """Decode one v2 request's input tensors (already shaped numpy arrays; BYTES as object arrays of
        bytes). Raise InputError for a wrong shape, datatype or value."""

    @abstractmethod
    def v2_postprocess(self, output: Output) -> dict[str, np.ndarray]:
        """Encode one output as named v2 output tensors."""


class ArtifactRuntime(Runtime[Prepared, Output]):
    """A Runtime whose weights live in a store version directory. load() reads the artifact (subclass), places the
    model with its framework (keras_rt, torch_rt), runs one warm-up batch and logs how long it all took."""

    @abstractmethod
    def read_artifact(self, artifact: Path) -> Path:
        """Resolve `artifact` to its version directory, set self.manifest and the settings the model reads from it
        (labels, shapes, vocabulary, normalisation, ...); return the version directory."""

    @abstractmethod
    def place(self, path: Path, device: str, threads: int) -> str:
        """Load the model's weights from version directory `path` onto `device` with `threads` threads, ready for
        predict_batch; return the device it runs on, as the framework names it."""

    @abstractmethod
    def warm_up_batch(self) -> list[Prepared]:
        """A small valid batch, run once at load time so the first request pays no tracing or one-off setup."""

    def load(self, artifact: Path | None, device: str, threads: int) -> None:
        if artifact is None:
            raise FileNotFoundError(f"{type(self).__name__} needs a model artifact (a store version directory)")
        started = time.perf_counter()
        path = self.read_artifact(Path(artifact))
        placed = self.place(path, device, threads)
        self.predict_batch(self.warm_up_batch())
        name = self.manifest.get("name", type(self).__name__)
        log.info("loaded model=%s version=%s device=%s threads=%d ms=%.0f", name, self.version, placed, threads,
                 (time.perf_counter() - started) * 1000)


def only_input(tensors: dict[str, np.ndarray], name: str, expected: str) -> np.ndarray:
    """The one input tensor of a single-input model. Raises InputError naming an unknown tensor, or the missing
    one with what it should be (`expected`, e.g. "FP32 [-1, -1]")."""
    unknown = sorted(set(tensors) - {name})
    if unknown:
        raise InputError(f"unknown input tensor `{unknown[0]}`; this model takes `{name}`", field=unknown[0])
    if name not in tensors:
        raise InputError(f"missing input tensor `{name}` ({expected})", field=name)
    return tensors[name]


def stack_rows(parts: list[np.ndarray]) -> np.ndarray:
    """The batch-major array of every item's rows, in order (split_rows undoes it); one item is not copied."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def split_rows(stacked: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Split a batch-major array back into per-request pieces of the given row counts."""
    bounds = np.cumsum(sizes)[:-1]
    return list(np.split(stacked, bounds))
