"""Serve the digit CNN: image files (task route /classify-image) or FP32 tensors (Open Inference Protocol).

One item may hold several rows (a v2 request with a batch dimension); predict_batch stacks every row of every item
and runs one forward pass through KerasRuntime.forward (a tf.function with a fixed input signature: no retrace per
batch size, and none of model.predict's per-call overhead).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models import store as model_store
from models.cnn.imaging import ImageFormat, image_to_array
from service.runtimes.base import InputError, TaskRequest, TensorSpec, only_input, split_rows, stack_rows
from service.runtimes.keras_rt import KerasRuntime

DEFAULT_TOP_K = 5
INPUT = "input"
OUTPUT = "probabilities"
# Far above any sensible upload; checked from the header before Pillow decodes a single pixel.
MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class CnnItem:
    """One request, decoded: its image rows [n, H, W, C] float32 and how many labels to return."""

    pixels: np.ndarray
    top_k: int


class CnnRuntime(KerasRuntime[CnnItem, np.ndarray]):
    def __init__(self) -> None:
        super().__init__()
        self.fmt = ImageFormat()
        self.labels: list[str] = []

    def read_artifact(self, artifact: Path) -> Path:
        path = model_store.resolve(artifact)
        self.manifest = model_store.read_manifest(path)
        self.fmt = ImageFormat.from_json(self.manifest["image"])
        self.labels = [str(label) for label in self.manifest["labels"]]
        return path

    def input_spec(self) -> tuple[tuple[int, ...], str]:
        return self.fmt.shape, "float32"

    def warm_up_batch(self) -> list[CnnItem]:
        return [CnnItem(np.zeros((1, *self.fmt.shape), np.float32), 1)]

    # Task route ------------------------------------------------------------------------------------------------

    def preprocess(self, request: TaskRequest) -> CnnItem:
        top_k = self._top_k(request.params.get("top_k", DEFAULT_TOP_K))
        return CnnItem(self._decode(request.blob)[None], top_k)

    def postprocess(self, output: np.ndarray, request: TaskRequest) -> dict[str, Any]:
        probs = output[0]
        top_k = self._top_k(request.params.get("top_k", DEFAULT_TOP_K))
        # Stable sort: ties keep label order, so the answer is deterministic.
        order = np.argsort(-probs, kind="stable")[:top_k]
        return {"model": "cnn", "version": self.version,
                "predictions": [{"label": self.labels[i], "score": float(probs[i])} for i in order]}

    def predict_batch(self, batch: list[CnnItem]) -> list[np.ndarray]:
        probs = self.forward(stack_rows([item.pixels for item in batch]))
        return split_rows(probs, [len(item.pixels) for item in batch])

    # Open Inference Protocol -----------------------------------------------------------------------------------

    def v2_inputs(self) -> list[TensorSpec]:
        return [TensorSpec(INPUT, "FP32", [-1, *self.fmt.shape])]

    def v2_outputs(self) -> list[TensorSpec]:
        return [TensorSpec(OUTPUT, "FP32", [-1, len(self.labels)])]

    def v2_preprocess(self, tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> CnnItem:
        x = np.asarray(only_input(tensors, INPUT, f"FP32 {[-1, *self.fmt.shape]}"))
        h, w, c = self.fmt.shape
        accepted = [(h, w, c), (h * w * c,)] + ([(h, w)] if c == 1 else [])
        if x.ndim < 2 or tuple(x.shape[1:]) not in accepted or x.shape[0] < 1:
            shapes = " or ".join(str([-1, *s]) for s in accepted)
            raise InputError(f"`{INPUT}` must have shape {shapes}. Given: {list(x.shape)}", field=INPUT)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InputError(f"`{INPUT}` must be FP32. Given: {x.dtype}", field=INPUT)
        x = x.astype(np.float32, copy=False).reshape(-1, h, w, c)
        if not np.isfinite(x).all():
            raise InputError(f"`{INPUT}` must hold finite numbers. Given: {_first_bad(x)}", field=INPUT)
        return CnnItem(x, DEFAULT_TOP_K)

    def v2_postprocess(self, output: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT: output.astype(np.float32, copy=False)}

    # Helpers ---------------------------------------------------------------------------------------------------

    def _top_k(self, value: Any) -> int:
        n = len(self.labels)
        if value is None:
            return DEFAULT_TOP_K
        # bool is an int subclass; `true` is not a count.
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
            raise InputError(f"`top_k` must be an integer between 1 and {n}. Given: {value!r}", field="top_k")
        return value

    def _decode(self, blob: bytes) -> np.ndarray:
        if not blob:
            raise InputError("`file` must be an image file (PNG, JPEG, ...). Given: 0 bytes", field="file")
        try:
            with warnings.catch_warnings():
                # Pillow only warns about decompression bombs below 2x its limit; refuse them outright.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(blob)) as image:
                    width, height = image.size
                    if width * height > MAX_PIXELS:
                        raise InputError(f"`file` must have at most {MAX_PIXELS} pixels. Given: {width}x{height}",
                                         field="file")
                    image.load()
                    return image_to_array(image, self.fmt)
        except InputError:
            raise
        # Pillow's decoders raise many types for bad files (OSError, SyntaxError, ValueError, EOFError, struct.error,
        # ...); any of them means "not a readable image", and must not fail the batch.
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"`file` is not a readable image ({type(exc).__name__}). Given: {len(blob)} bytes",
                             field="file") from None


def _first_bad(x: np.ndarray) -> float:
    return float(x[~np.isfinite(x)].flat[0])
