from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from service.config import Settings
from service.gateway.directory import Directory
from service.metrics import GatewayMetrics

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The gateway process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readiness(request: Request) -> tuple[bool, list[str]]:
    """Ready when Redis answers and every configured model with replicas has a live worker."""
    settings: Settings = request.app.state.settings
    directory: Directory = request.app.state.directory
    missing: list[str] = []
    try:
        await request.app.state.redis.ping()
        for name, spec in settings.models.items():
            if spec.replicas > 0 and (await directory.status(name))["live_replicas"] == 0:
                missing.append(f"model {name} has no live worker")
    except (RedisError, OSError) as exc:
        missing.append(f"redis unreachable: {type(exc).__name__}")
    return not missing, missing


@router.get("/readyz", summary="Redis reachable and every configured model has a live worker")
async def readyz(request: Request) -> Response:
    ok, missing = await readiness(request)
    body: dict[str, Any] = {"ready": ok} if ok else {"ready": False, "error": "; ".join(missing),
                                                     "error_type": "unavailable", "missing": missing}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    directory: Directory = request.app.state.directory
    m: GatewayMetrics = request.app.state.metrics
    for name in settings.models:
        try:
            status = await directory.status(name)
        except (RedisError, OSError):
            break
        m.queue_depth.labels(name).set(status["queue_depth"])
        m.live_workers.labels(name).set(status["live_replicas"])
        m.worker_batches.labels(name).set(status["batches"])
        m.worker_items.labels(name).set(status["items"])
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
