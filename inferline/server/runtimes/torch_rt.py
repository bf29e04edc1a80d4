"""PyTorch helpers for Model.setup and Model.predict: thread count, device checks, placement, and a whole-batch
forward under inference mode. torch is imported inside functions only: importing this module loads no framework."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["configure_torch", "place_module", "torch_device", "torch_forward"]


def configure_torch(threads: int) -> Any:
    """Import torch with `threads` intra-op threads and return the module."""
    import torch

    torch.set_num_threads(threads)
    return torch


def torch_device(device: str) -> Any:
    """The torch.device for "cpu" / "cuda" / "cuda:N". Raises ValueError for a CUDA device torch cannot see (a
    CPU-only build, or an index past the visible GPUs), rather than failing later at the first tensor."""
    import torch

    placed = torch.device(device)
    if placed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = placed.index if placed.index is not None else 0
        if index >= count:
            raise ValueError(f"device {device!r} asked for, but torch sees {count} CUDA device(s)")
        placed = torch.device("cuda", index)
    return placed


def place_module(module: Any, device: str, threads: int) -> tuple[Any, Any]:
    """(the module on the device in eval mode without gradients, the torch.device), with torch at `threads`."""
    configure_torch(threads)
    placed = torch_device(device)
    module.requires_grad_(False)
    return module.to(placed).eval(), placed


def torch_forward(module: Any, device: Any, x: np.ndarray, run: Callable[[Any, Any], Any] | None = None,
                  dtype: Any = np.float32) -> np.ndarray:
    """Run `module` on a whole batch `x` (sent as a `dtype` tensor on `device`) under inference mode; its output as
    numpy. `run(module, tensor) -> tensor` replaces a plain `module(tensor)` call (e.g. an autoregressive loop)."""
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(device)
        y = run(module, tensor) if run is not None else module(tensor)
        out: np.ndarray = y.cpu().numpy()
    return out
