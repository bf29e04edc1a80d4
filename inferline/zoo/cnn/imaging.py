"""Image <-> array conversions shared by training and serving, so both see exactly the same pixels.

Training turns each 8x8 digits sample into a Pillow image and runs it through `image_to_array`; serving decodes the
uploaded file into a Pillow image and runs the same function. Pure Pillow + numpy (no framework).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

DIGITS_MAX = 16.0          # load_digits() pixel values are 0..16
RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class ImageFormat:
    """How the network wants its pixels: size, channels, scale, and whether light backgrounds are inverted."""

    height: int = 28
    width: int = 28
    channels: int = 1
    scale: float = 1.0 / 255.0
    # The digits are light ink on a dark background; a photo or scan of a digit is usually the reverse.
    invert_light_background: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "channels": self.channels, "scale": self.scale,
                "invert_light_background": self.invert_light_background, "resample": "bilinear"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageFormat:
        return cls(int(data["height"]), int(data["width"]), int(data["channels"]), float(data["scale"]),
                   bool(data["invert_light_background"]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


def digit_image(sample: np.ndarray) -> Image.Image:
    """An 8x8 digits sample (values 0..16) as an 8-bit grayscale image, rounded the way a PNG stores it."""
    pixels = np.clip(np.rint(np.asarray(sample, dtype=np.float64).reshape(8, 8) * (255.0 / DIGITS_MAX)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


def digit_png(sample: np.ndarray, size: int | None = None) -> bytes:
    """PNG file bytes of a digits sample (8x8, or resized to size x size), for tests and benchmarks."""
    image = digit_image(sample)
    if size is not None:
        image = image.resize((size, size), RESAMPLE)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_to_array(image: Image.Image, fmt: ImageFormat) -> np.ndarray:
    """A Pillow image as one float32 [H, W, C] network input: grayscale/RGB, resized, scaled."""
    mode = "L" if fmt.channels == 1 else "RGB"
    image = image.convert(mode)
    if image.size != (fmt.width, fmt.height):
        image = image.resize((fmt.width, fmt.height), RESAMPLE)
    pixels = np.asarray(image, dtype=np.float32).reshape(fmt.shape) * np.float32(fmt.scale)
    if fmt.invert_light_background and _border_mean(pixels) > 0.5 * 255.0 * fmt.scale:
        pixels = np.float32(255.0 * fmt.scale) - pixels
    return pixels


def _border_mean(pixels: np.ndarray) -> float:
    edges = [pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]
    return float(np.mean([e.mean() for e in edges]))
