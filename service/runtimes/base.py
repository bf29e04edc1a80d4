"""The Runtime contract: one model in one worker process.

load() once; then per batch: preprocess each item (may raise InputError, failing only that item),
predict_batch once for the whole batch, postprocess each item. Task routes (/classify-image,
/forecast, /sentiment) and the Open Inference Protocol (/v2/.../infer) share predict_batch: only the
decode and encode steps differ. No web framework is imported here or in any runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from service.errors import InputError

Prepared = TypeVar("Prepared")
Output = TypeVar("Output")

__all__ = ["InputError", "Runtime", "TaskRequest", "TensorSpec", "split_rows"]


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


def split_rows(stacked: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Split a batch-major array back into per-request pieces of the given row counts."""
    bounds = np.cumsum(sizes)[:-1]
    return list(np.split(stacked, bounds))
