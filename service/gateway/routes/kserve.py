"""Open Inference Protocol (KServe v2) for every served model. Infer bodies go to the worker as raw
bytes (JSON, or JSON + binary tensors per the binary-data extension) and are parsed there, once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

import service
from service.broker.registry import Registry
from service.errors import BadRequest, NotFound, Unavailable
from service.gateway.dispatch import Dispatcher
from service.gateway.routes.common import Body, answer, dispatcher
from service.gateway.routes.health import readiness
from service.protocol import OP_V2, ModelInfo

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "inferline", "version": service.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    ok, _ = await readiness(request)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def model_info(request: Request, model: str, version: str | None) -> ModelInfo:
    dispatcher(request).spec(model)   # 404 for a model this gateway does not serve
    registry: Registry = request.app.state.registry
    info = await registry.info(model)
    if info is None:
        raise Unavailable(f"model {model} has no worker that has published its metadata yet")
    if version is not None and version != info.version:
        raise NotFound(f"model {model} has no version {version!r}; serving {info.version!r}", field="version")
    return info


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def metadata(model: str, request: Request, version: str | None = None) -> dict[str, Any]:
    info = await model_info(request, model, version)
    return {"name": model, "versions": [info.version], "platform": info.platform, "inputs": info.inputs,
            "outputs": info.outputs}


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(model: str, request: Request, version: str | None = None) -> Response:
    await model_info(request, model, version)
    status = await request.app.state.registry.status(model)
    ok = status.live_replicas > 0
    return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)


async def handle_infer(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
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


@router.post("/models/{model}/infer", summary="Run inference (JSON or binary tensors)")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    if version is not None:
        await model_info(request, model, version)
    return await answer(request, handle_infer)
