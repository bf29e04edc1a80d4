"""Open Inference Protocol (KServe v2) for every served model. Infer bodies go to the worker as raw
bytes (JSON, or JSON + binary tensors per the binary-data extension) and are parsed there, once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.responses import Response

from inferline import server
from inferline.server.errors import BadRequest, NotFound, Unavailable
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.openapi import READ_ERRORS, TASK_ERRORS, doc
from inferline.server.gateway.routes.common import Body, answer, build, json_answer
from inferline.server.gateway.routes.health import readiness
from inferline.server.protocol import OP_V2, ModelInfo
from inferline.server.schemas import responses as wire

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

NOT_READY = {503: {"model": wire.V2Ready, "description": "Not ready", "content": {"application/json": {
    "example": {"ready": False}}}}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": wire.V2InferRequest.model_json_schema(), "example": {
        "id": "q-1", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}]}},
    "application/octet-stream": {"schema": {"contentMediaType": "application/octet-stream", "description": (
        "binary-data extension: the JSON request (Inference-Header-Content-Length bytes, each binary input with "
        "parameters.binary_data_size) followed by the tensors' raw little-endian bytes")}}}},
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0}, "description": "length of the JSON header"}]}
INFER_ANSWER = doc(wire.V2InferResponse, {"model_name": "echo", "model_version": "1", "id": "q-1", "outputs": [
    {"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 3.0]}]}, family="kserve", errors=TASK_ERRORS)
METADATA = doc(wire.V2Metadata, {"name": "echo", "versions": ["1"], "platform": "inferline", "inputs": [
    {"name": "x", "datatype": "FP32", "shape": [-1, -1]}], "outputs": [{"name": "y", "datatype": "FP32",
                                                                        "shape": [-1, -1]}]},
               family="kserve", errors=READ_ERRORS)
MODEL_READY = doc(wire.V2ModelReady, {"name": "echo", "ready": True}, family="kserve", errors=READ_ERRORS,
                  more={503: {"model": wire.V2ModelReady, "description": "No live worker", "content": {
                      "application/json": {"example": {"name": "echo", "ready": False}}}}})


SERVER_DOCS = dict(summary="Server metadata", **doc(wire.V2Server, {
    "name": "inferline", "version": "0.1.0", "extensions": ["binary_tensor_data", "model_repository"]},
    family="kserve", errors=()))
LIVE_DOCS = doc(wire.V2Live, {"live": True}, family="kserve", errors=())
READY_DOCS = doc(wire.V2Ready, {"ready": True}, family="kserve", errors=(), more=NOT_READY)
INFER_DOCS = dict(summary="Run inference (JSON or binary tensors)", openapi_extra=INFER_BODY, **INFER_ANSWER)
VERSION_INFER_DOCS = dict(summary="Run inference on a named version", openapi_extra=INFER_BODY, **INFER_ANSWER)


SERVER = build(wire.V2Server, {"name": "inferline", "version": server.__version__,
                                "extensions": ["binary_tensor_data", "model_repository"]})
LIVE = build(wire.V2Live, {"live": True})


async def server_metadata(gw: Gateway, request: Request) -> Response:
    return json_answer(SERVER)


async def live(gw: Gateway, request: Request) -> Response:
    return json_answer(LIVE)


async def ready(gw: Gateway, request: Request) -> Response:
    ok = (await readiness(gw)).ready
    return json_answer(build(wire.V2Ready, {"ready": ok}), status_code=200 if ok else 503)


async def model_info(gw: Gateway, model: str, version: str | None) -> ModelInfo:
    gw.dispatcher.spec(model)   # 404 for a model this gateway does not serve
    info = await gw.registry.info(model)
    if info is None:
        raise Unavailable(f"model {model} has no worker that has published its metadata yet")
    if version is not None and version != info.version:
        raise NotFound(f"model {model} has no version {version!r}; serving {info.version!r}", field="version")
    return info


async def metadata(gw: Gateway, request: Request) -> Response:
    model = request.path_params["model"]
    return json_answer(metadata_of(model, await model_info(gw, model, request.path_params.get("version"))))


def metadata_of(model: str, info: ModelInfo) -> wire.V2Metadata:
    """A model's v2 metadata from what its workers published (tensors as {"name", "datatype", "shape"})."""
    return build(wire.V2Metadata, {"name": model, "versions": [info.version], "platform": info.platform,
                                   "inputs": info.inputs, "outputs": info.outputs})


async def model_ready(gw: Gateway, request: Request) -> Response:
    model = request.path_params["model"]
    await model_info(gw, model, request.path_params.get("version"))
    ok = (await gw.registry.status(model)).live_replicas > 0
    return json_answer(build(wire.V2ModelReady, {"name": model, "ready": ok}), status_code=200 if ok else 503)


async def infer(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
                query: str) -> bytes:
    header_length = None
    raw = headers.get("inference-header-content-length")
    if raw is not None:
        if not raw.isdigit() or int(raw) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {raw!r} must be an integer within the body's "
                             f"{len(body)} bytes", field="Inference-Header-Content-Length")
        header_length = int(raw)
    if not body:
        raise BadRequest("empty body: expected a JSON inference request", field="body")
    reply = await d.call(path["model"], OP_V2, {"header_length": header_length}, body, request_id=rid)
    return reply.body


async def infer_version(gw: Gateway, request: Request) -> Response:
    await model_info(gw, request.path_params["model"], request.path_params["version"])
    return await answer(gw.dispatcher, request, infer)
