"""Device strings: "cpu" | "cuda" | "cuda:N" | "auto". "auto" spreads replicas round-robin over the
visible GPUs, falling back to the CPU. GPUs are counted without importing torch (the supervisor decides
placement before any framework loads)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def visible_gpus() -> int:
    """How many CUDA devices this process may use: CUDA_VISIBLE_DEVICES if set, else the driver's count."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return len(list(gpus.iterdir()))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return 0


def resolve(device: str, replica: int = 0, gpus: int | None = None) -> str:
    """The concrete device for one replica. Raises ValueError for a GPU that is not there."""
    n = visible_gpus() if gpus is None else gpus
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return f"cuda:{replica % n}" if n else "cpu"
    index = 0 if device == "cuda" else int(device.split(":", 1)[1])
    if index >= n:
        raise ValueError(f"device {device!r} asked for, but {n} GPU(s) are visible")
    return f"cuda:{index}"
