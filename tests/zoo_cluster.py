"""The classic zoo served by real processes, and the same models loaded in the test process exactly like a worker
loads them and run through the worker's own codec on a batch of one, so tests can compare what the gateway answers
with what the model itself predicts."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from inferline.server.broker.delivery import Delivery
from inferline.server.config import ModelSpec
from inferline.server.model import Model, Signature, signature
from inferline.server.protocol import OP_PREDICT, OP_V2, Envelope, Reply, encode_payload, now_ms
from inferline.server.tensors import datatype_of
from inferline.server.worker.batching import Executor
from inferline.server.worker.loading import load_model
from inferline.server.worker.rows import RowCodec
from tests.conftest import Cluster

MODELS = ("cnn", "lstm", "sentiment")
TASKS = {"cnn": "classify-image", "lstm": "forecast", "sentiment": "sentiment", "transformer": "classify-text"}

TEXTS = ["I love this, what a wonderful day", "this is awful and I hate it", "great game tonight, so happy",
         "worst service ever, never again", "thanks so much, you are the best", "so sad and tired of everything",
         "not bad at all", "the movie was boring"]


def start_zoo(redis_url: str, store: Path, tmp: Path, models: tuple[str, ...] = MODELS,
              gateway: dict[str, Any] | None = None, **spec: Any) -> Cluster:
    """A gateway and one worker per model (loading in parallel), returned once /readyz says all are live.
    The caller closes it."""
    cluster = Cluster(redis_url, tmp)
    cluster.client.flushdb()
    for name in models:
        cluster.spec(name, artifact=str(store / name), task=TASKS[name], **spec)
    cluster.start_all(gateway, 180)
    return cluster


@dataclass
class Direct:
    """A model loaded in this process as a worker loads it, run through the worker's codec one request at a time."""

    name: str
    model: Model
    executor: Executor

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def manifest(self) -> dict[str, Any]:
        return self.model.manifest

    @property
    def platform(self) -> str:
        return self.model.platform

    @property
    def signature(self) -> Signature:
        return signature(type(self.model))

    def replies(self, requests: list[tuple[str, dict[str, Any], bytes]]) -> list[Reply]:
        """One batch of (op, params, blob) requests, as the worker runs it."""
        deadline = now_ms() + 60_000
        return self.executor.run([
            Delivery(f"0-{i}".encode(), Envelope(f"direct-{i}", "nowhere", deadline, op), encode_payload(params, blob))
            for i, (op, params, blob) in enumerate(requests)])

    def call(self, op: str, params: dict[str, Any], blob: bytes = b"") -> dict[str, Any]:
        (reply,) = self.replies([(op, params, blob)])
        assert reply.ok, reply.body
        body: dict[str, Any] = orjson.loads(reply.body)
        return body


@functools.cache
def direct(store: Path, name: str) -> Direct:
    """The model `name` loaded in this process the way service.worker.main loads it (cached per process)."""
    model = load_model(ModelSpec(name=name, artifact=store / name), "cpu")
    return Direct(name, model, Executor(model, RowCodec(model, name), name))


def task_payload(params: dict[str, Any], blob: bytes = b"") -> dict[str, Any]:
    """What a task route sends the worker: image bytes with options, one row per text for {"texts", "single"}, else
    one row."""
    if blob:
        return {"options": params}
    if "texts" in params:
        rows = [{"text": t} for t in params["texts"]]
        return {"row": rows[0]} if params.get("single") else {"rows": rows}
    return {"row": params}


def predict_task(runtime: Direct, params: dict[str, Any], blob: bytes = b"") -> dict[str, Any]:
    return runtime.call(OP_PREDICT, task_payload(params, blob), blob)


def v2_request(tensors: dict[str, np.ndarray], parameters: dict[str, Any] | None = None) -> bytes:
    """A v2 infer body carrying `tensors` as JSON data."""
    inputs = [{"name": n, "shape": list(a.shape), "datatype": datatype_of(a),
               "data": [x.decode() if isinstance(x, bytes) else x for x in a.reshape(-1).tolist()]}
              for n, a in tensors.items()]
    return orjson.dumps({"inputs": inputs, "parameters": parameters or {}})


def predict_v2(runtime: Direct, tensors: dict[str, np.ndarray], parameters: dict[str, Any] | None = None
               ) -> dict[str, np.ndarray]:
    """The output tensors of one v2 request carrying `tensors` (JSON data), as arrays."""
    answer = runtime.call(OP_V2, {"header_length": None}, v2_request(tensors, parameters))
    return {o["name"]: np.array([x.encode() for x in o["data"]], dtype=object).reshape(o["shape"])
            if o["datatype"] == "BYTES" else np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
            for o in answer["outputs"]}


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
