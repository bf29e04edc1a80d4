"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from service.broker.client import BROKER_ERRORS
from service.broker.registry import Registry
from service.config import Settings
from service.gateway.openapi import doc
from service.metrics import GatewayMetrics
from service.schemas import responses as wire

router = APIRouter(tags=["operations"])
METRICS_EXAMPLE = ('# HELP inferline_queue_depth Requests queued or in flight per model\n'
                   '# TYPE inferline_queue_depth gauge\ninferline_queue_depth{model="cnn"} 0.0\n')


@router.get("/healthz", summary="The gateway process is up", **doc(wire.Healthz, {"status": "ok"}, errors=()))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readiness(request: Request) -> tuple[bool, list[str]]:
    """Ready when Redis answers and every configured model with replicas has a live worker."""
    settings: Settings = request.app.state.settings
    registry: Registry = request.app.state.registry
    missing: list[str] = []
    try:
        await registry.ping()
        for name, spec in settings.models.items():
            if spec.replicas > 0 and (await registry.status(name)).live_replicas == 0:
                missing.append(f"model {name} has no live worker")
    except BROKER_ERRORS as exc:
        missing.append(f"redis unreachable: {type(exc).__name__}")
    return not missing, missing


@router.get("/readyz", summary="Redis reachable and every configured model has a live worker",
            **doc(wire.Readiness, {"ready": True}, errors=(), more={503: {
                "model": wire.Readiness, "description": "Not ready: what is missing", "content": {"application/json": {
                    "example": {"ready": False, "error": "model cnn has no live worker", "error_type": "unavailable",
                                "missing": ["model cnn has no live worker"]}}}}}))
async def readyz(request: Request) -> Response:
    ok, missing = await readiness(request)
    body: dict[str, Any] = {"ready": ok} if ok else {"ready": False, "error": "; ".join(missing),
                                                     "error_type": "unavailable", "missing": missing}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            **doc(None, METRICS_EXAMPLE, errors=(), media="text/plain", schema={"type": "string"},
                  description="Prometheus text format 0.0.4"))
async def metrics(request: Request) -> Response:
    """The gateway's registry with the broker's health read now. Redis unreachable: inferline_redis_up 0 and no
    broker or worker value at all (a stale one would read as current, and hide that no replica can be reached)."""
    settings: Settings = request.app.state.settings
    registry: Registry = request.app.state.registry
    m: GatewayMetrics = request.app.state.metrics
    try:
        m.broker.update(await registry.health(settings.models))
    except BROKER_ERRORS:
        m.broker.unreachable()
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
