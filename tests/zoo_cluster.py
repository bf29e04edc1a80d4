"""The classic zoo served by real processes, and the same models loaded in the test process exactly like a worker
loads them, so tests can compare what the gateway answers with what the model itself predicts."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.config import ModelSpec
from service.runtimes.base import Runtime, TaskRequest
from tests.conftest import Cluster, wait_for

MODELS = ("cnn", "lstm", "sentiment")

TEXTS = ["I love this, what a wonderful day", "this is awful and I hate it", "great game tonight, so happy",
         "worst service ever, never again", "thanks so much, you are the best", "so sad and tired of everything",
         "not bad at all", "the movie was boring"]


def start_zoo(redis_url: str, store: Path, tmp: Path, models: tuple[str, ...] = MODELS,
              gateway: dict[str, Any] | None = None, **spec: Any) -> Cluster:
    """A gateway and one worker per model (loading in parallel), returned once /readyz says all are live.
    The caller closes it."""
    cluster = Cluster(redis_url, tmp)
    cluster.client.flushdb()
    try:
        for name in models:
            cluster.spec(name, artifact=str(store / name), **spec)
        cluster.start_gateway(gateway)
        for name in models:
            cluster.start_worker(name, wait=False)

        def ready() -> bool:
            for i, proc in enumerate(cluster.workers):
                log = (tmp / f"worker-{models[i]}-{i}.log").read_text()[-3000:] if proc.poll() is not None else ""
                assert not log, f"worker {models[i]} exited with {proc.returncode}:\n{log}"
            return httpx.get(cluster.url + "/readyz", timeout=5).status_code == 200

        wait_for(ready, 180, "every worker live")
    except BaseException:
        cluster.close()
        raise
    return cluster


@functools.cache
def direct(store: Path, name: str) -> Runtime[Any, Any]:
    """The model `name` loaded in this process the way service.worker.main loads it (cached per process)."""
    from service.worker.main import import_object, locate

    runtime_path, version_dir, _ = locate(ModelSpec(name=name, artifact=store / name))
    runtime: Runtime[Any, Any] = import_object(runtime_path)()
    runtime.load(version_dir, "cpu", 1)
    return runtime


def predict_task(runtime: Runtime[Any, Any], params: dict[str, Any], blob: bytes = b"") -> dict[str, Any]:
    """One task request through the runtime alone, as a batch of one."""
    request = TaskRequest(params=params, blob=blob)
    (output,) = runtime.predict_batch([runtime.preprocess(request)])
    return runtime.postprocess(output, request)


def predict_v2(runtime: Runtime[Any, Any], tensors: dict[str, np.ndarray], parameters: dict[str, Any] | None = None
               ) -> dict[str, np.ndarray]:
    (output,) = runtime.predict_batch([runtime.v2_preprocess(tensors, parameters or {})])
    return runtime.v2_postprocess(output)


def assert_close(got: Any, want: Any, path: str = "$") -> None:
    """Equal structure and values; floats equal to float32 rounding (a batch of 64 may take another kernel path
    than a batch of one)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), \
            f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def v2_expected(model: str, version: str, outputs: dict[str, np.ndarray], request_id: str | None = None
                ) -> dict[str, Any]:
    """The v2 response body the runtime's own outputs call for (JSON tensors)."""
    tensors = []
    for name, array in outputs.items():
        if array.dtype == object:
            data: list[Any] = [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
            datatype = "BYTES"
        else:
            data = [float(x) for x in array.reshape(-1)]
            datatype = {"float32": "FP32", "float64": "FP64"}[array.dtype.name]
        tensors.append({"name": name, "datatype": datatype, "shape": list(array.shape), "data": data})
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    return body
