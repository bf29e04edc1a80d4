"""The digit CNN on the model contract: image files (a `decode` hook for /classify-image and raw-byte predicts) or
FP32 tensors [n, 28, 28, 1] (Open Inference Protocol). predict stacks every row and runs one forward pass."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from inferline import InputError, Model, Tensor, keras_forward
from inferline.zoo.cnn.imaging import ImageFormat, image_to_array

# Checked from the header before Pillow decodes a single pixel: far above any digit photo, far below the cost of
# decoding a 4096x4096 upload per request.
MAX_PIXELS = 1024 * 1024


class DigitRow(BaseModel):
    input: Tensor[np.float32, 28, 28, 1]
    top_k: int = Field(5, ge=1, strict=True)


class Prediction(BaseModel):
    label: str
    score: float


class DigitAnswer(BaseModel):
    predictions: list[Prediction]
    probabilities: Tensor[np.float32, -1] = Field(exclude=True)   # the v2 output; JSON answers carry predictions


class DigitClassifier(Model):
    platform = "tensorflow_keras"
    max_batch_size = 32

    def setup(self, device: str) -> None:
        if self.artifact is None:
            raise FileNotFoundError("DigitClassifier needs its artifact (a cnn store version)")
        self.fmt = ImageFormat.from_json(self.manifest["image"])
        if self.fmt.shape != (28, 28, 1):
            raise ValueError(f"this class serves 28x28x1 digits; the artifact takes {self.fmt.shape}")
        self.labels = [str(label) for label in self.manifest["labels"]]
        self.forward = keras_forward(self.artifact / self.manifest["files"]["model"], device, self.threads,
                                     self.fmt.shape, "float32")
        self.predict([DigitRow(input=np.zeros(self.fmt.shape, np.float32), top_k=1)])   # trace once, now

    def decode(self, data: bytes, options: dict[str, Any]) -> DigitRow:
        return DigitRow(input=self._pixels(data), top_k=options.get("top_k", 5))

    def predict(self, batch: list[DigitRow]) -> list[DigitAnswer]:
        for row in batch:
            if row.top_k > len(self.labels):
                raise InputError(f"`top_k` must be an integer between 1 and {len(self.labels)}. Given: {row.top_k}",
                                 field="top_k")
        probs = self.forward(np.stack([row.input for row in batch]))
        answers = []
        for row, p in zip(batch, probs, strict=True):
            order = np.argsort(-p, kind="stable")[:row.top_k]   # stable: ties keep label order
            answers.append(DigitAnswer(predictions=[Prediction(label=self.labels[i], score=float(p[i]))
                                                    for i in order], probabilities=p))
        return answers

    def _pixels(self, blob: bytes) -> np.ndarray:
        if not blob:
            raise InputError("`file` must be an image file (PNG, JPEG, ...). Given: 0 bytes", field="file")
        try:
            with warnings.catch_warnings():
                # Pillow only warns about decompression bombs below 2x its limit; refuse them outright.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(blob)) as image:
                    width, height = image.size
                    limit = int(self.options.get("max_pixels", MAX_PIXELS))
                    if width * height > limit:
                        raise InputError(f"`file` must have at most {limit} pixels (max_pixels). Given: "
                                         f"{width}x{height}", field="file")
                    image.load()
                    return image_to_array(image, self.fmt)
        except InputError:
            raise
        # Pillow's decoders raise many types for bad files (OSError, SyntaxError, ValueError, EOFError, struct.error,
        # ...); any of them means "not a readable image", and must not fail the batch.
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"`file` is not a readable image ({type(exc).__name__}). Given: {len(blob)} bytes",
                             field="file") from None
