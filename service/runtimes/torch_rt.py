"""TorchRuntime: the shared half of every PyTorch model runtime.

ArtifactRuntime.load() has the subclass read its store version; place() then sets torch's thread count, checks the
device, has the subclass build the module with its weights and moves it to the device in eval mode without
gradients. forward() runs a whole batch under torch.inference_mode().

torch is imported inside functions only: importing this module loads no framework.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.runtimes.base import ArtifactRuntime, Output, Prepared

__all__ = ["TorchRuntime", "configure_torch", "torch_device"]


class TorchRuntime(ArtifactRuntime[Prepared, Output]):
    """A torch.nn.Module that build_model() makes from a store version directory. Subclasses implement read_artifact,
    build_model and warm_up_batch, and call forward() from predict_batch."""

    platform = "pytorch"

    def __init__(self) -> None:
        super().__init__()
        self.device: Any = None        # torch.device once loaded
        self.model: Any = None         # the module, on self.device, in eval mode, without gradients

    @abstractmethod
    def build_model(self, path: Path) -> Any:
        """The torch.nn.Module with its weights from version directory `path`, on the CPU (torch.load with
        map_location="cpu"); place() moves it to the device."""

    def place(self, path: Path, device: str, threads: int) -> str:
        torch = configure_torch(threads)
        self.device = torch_device(torch, device)
        model = self.build_model(path)
        model.requires_grad_(False)
        self.model = model.to(self.device).eval()
        return str(self.device)

    def forward(self, x: np.ndarray, run: Callable[[Any, Any], Any] | None = None, dtype: Any = np.float32
                ) -> np.ndarray:
        """Run the model on a whole batch `x` (sent as a `dtype` tensor on the model's device) under inference mode;
        return its output as numpy. `run(model, tensor) -> tensor` replaces a plain `model(tensor)` call (e.g. an
        autoregressive loop). Raises RuntimeError before load()."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.load() first")
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(self.device)
            y = run(self.model, tensor) if run is not None else self.model(tensor)
            out: np.ndarray = y.cpu().numpy()
        return out


def configure_torch(threads: int) -> Any:
    """Import torch with `threads` intra-op threads and return the module."""
    import torch

    torch.set_num_threads(threads)
    return torch


def torch_device(torch: Any, device: str) -> Any:
    """The torch.device for "cpu" / "cuda" / "cuda:N". Raises ValueError for a CUDA device torch cannot see (a
    CPU-only build, or an index past the visible GPUs), rather than failing later at the first tensor."""
    placed = torch.device(device)
    if placed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = placed.index if placed.index is not None else 0
        if index >= count:
            raise ValueError(f"device {device!r} asked for, but torch sees {count} CUDA device(s)")
        placed = torch.device("cuda", index)
    return placed
