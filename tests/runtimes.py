"""Tiny framework-free runtimes for broker and worker tests (like mosec's tests/services/). Loaded by
real worker processes through their dotted path, e.g. "tests.runtimes:Echo"."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InputError
from service.runtimes.base import Runtime, TaskRequest, TensorSpec


class Echo(Runtime[dict[str, Any], dict[str, Any]]):
    """Task: answers {"echo": params, "batch": size of the batch it ran in}. v2: y = 2 * x (FP32).
    params (task params or v2 request parameters):
    {"reject": true} -> InputError; {"sleep_s": s} -> the batch sleeps s; {"raise": true} -> the model
    raises; {"kill": true} -> the process dies mid-batch (a poison pill)."""

    platform = "inferline_test"

    def load(self, artifact: Path | None, device: str, threads: int) -> None:
        self.manifest = {"version": "1"}

    def preprocess(self, request: TaskRequest) -> dict[str, Any]:
        if request.params.get("reject"):
            raise InputError("`reject` was set", field="reject")
        return dict(request.params)

    def predict_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(item.get("kill") for item in batch):
            os._exit(17)
        if any(item.get("raise") for item in batch):
            raise RuntimeError("poisoned item")
        time.sleep(max((float(item.get("sleep_s", 0)) for item in batch), default=0))
        return [{"echo": item, "batch": len(batch), "pid": os.getpid()} for item in batch]

    def postprocess(self, output: dict[str, Any], request: TaskRequest) -> dict[str, Any]:
        return output

    def v2_inputs(self) -> list[TensorSpec]:
        return [TensorSpec("x", "FP32", [-1, -1])]

    def v2_outputs(self) -> list[TensorSpec]:
        return [TensorSpec("y", "FP32", [-1, -1])]

    def v2_preprocess(self, tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, Any]:
        if set(tensors) != {"x"}:
            raise InputError(f"expected one input `x`; given {sorted(tensors)}", field="inputs")
        if parameters.get("reject"):
            raise InputError("`reject` was set", field="parameters.reject")
        return {"x": tensors["x"].astype(np.float32), **parameters}

    def v2_postprocess(self, output: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"y": output["echo"]["x"] * 2}


class Noop(Echo):
    """Answers at once with a constant: the pure serving overhead (benchmarks)."""

    def predict_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"ok": True} for _ in batch]

    def postprocess(self, output: dict[str, Any], request: TaskRequest) -> dict[str, Any]:
        return output

    def v2_postprocess(self, output: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"y": np.zeros((1, 1), np.float32)}
