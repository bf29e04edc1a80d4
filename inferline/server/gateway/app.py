"""The gateway: create_app(settings) -> an ASGI app. Validates, queues on Redis, awaits replies.
Never imports torch, tensorflow or any model code: those live in workers.

The layers, outermost first: the Edge (request ids, limits, metrics, the access log), the admin gate (the management
API's loopback rule and audit log; every other request passes), the security layer (keys, scopes, rate limits; absent
with security.auth = off), the hot path (the table's inference routes as bare ASGI),
then FastAPI (every route of the table, the API document and /docs). Each gets the one Gateway by its constructor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from inferline import server
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.config import Settings
from inferline.server.errors import InferlineError
from inferline.server.gateway.audit import AdminGate
from inferline.server.gateway.core import Gateway
from inferline.server.gateway.edge import Edge
from inferline.server.gateway.errors import from_validation, http_error, render
from inferline.server.gateway.hot import HotPath
from inferline.server.gateway.openapi import mount_docs, with_models
from inferline.server.gateway.record import request_id
from inferline.server.gateway.security import Security, auth_possible
from inferline.server.gateway.table import mount
from inferline.server.metrics import GatewayMetrics, autoscale_bounds, configured_replicas
from inferline.server.protocol import ModelInfo

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Any:
    """The full gateway app (FastAPI for the API surface and docs) wrapped in the Edge layer. Raises ValueError
    without settings.redis_url."""
    gateway = Gateway(settings, GatewayMetrics(configured_replicas(settings.models.values()),
                                                autoscale_bounds(settings.models.values())))
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        if guard is not None:
            await guard.start()
        log.info("gateway up id=%s models=%s", gateway.dispatcher.gateway_id, sorted(settings.models))
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="inferline", version=server.__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Model serving: gateway -> Redis Streams -> batching workers.")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Response:
        """FastAPI's document plus each served model's own predict operation (schemas its workers published)."""
        infos: dict[str, ModelInfo] = {}
        for name in settings.models:
            try:
                info = await gateway.registry.info(name)
            except BROKER_ERRORS:
                break   # Redis away: the fixed routes are still documented
            if info is not None:
                infos[name] = info
        return JSONResponse(with_models(app.openapi(), infos))

    mount_docs(app)   # Swagger UI from local files: /docs works offline

    def error_response(request: Request, exc: InferlineError) -> Response:
        status, body, headers = render(exc, request.url.path, request_id(), settings.gateway.retry_after_s)
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    async def on_inferline_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InferlineError)
        return error_response(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, from_validation(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(request, http_error(exc.status_code, str(exc.detail), request.url.path,
                                                  request.method))

    app.add_exception_handler(InferlineError, on_inferline_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    mount(app, gateway, gateway.table)
    inner: Any = HotPath(app, gateway.table, gateway.dispatcher)
    guard: Security | None = None
    if auth_possible(settings):   # off: no layer at all, the hot path exactly as without keys
        inner = guard = Security(inner, gateway)
    inner = AdminGate(inner, gateway.table, guard)
    return Edge(inner, settings.gateway.max_body_bytes, gateway.metrics, settings.gateway.retry_after_s,
                max_headers=settings.gateway.max_headers, access_log=settings.gateway.access_log)
