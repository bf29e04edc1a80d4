"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.registry import Serving
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import build, json_answer
from inferline.server.schemas import responses as wire

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

REDIS_AWAY: tuple[type[BaseException], ...] = (TimeoutError, *BROKER_ERRORS)
METRICS_EXAMPLE = ('# HELP inferline_queue_depth Requests queued or in flight per model\n'
                   '# TYPE inferline_queue_depth gauge\ninferline_queue_depth{model="cnn"} 0.0\n')


HEALTHZ_DOCS = dict(summary="The gateway process is up (liveness: never depends on Redis or workers)",
                   **doc(wire.Healthz, {"status": "ok"}, errors=()))


HEALTHZ = build(wire.Healthz, {"status": "ok"})


async def healthz(gw: Gateway, request: Request) -> Response:
    return json_answer(HEALTHZ)


async def readiness(gw: Gateway) -> wire.Readiness:
    """Whether this gateway can serve requests now, and each model's part in it (one Redis round trip, bounded by
    broker.timeout_s): see readiness_of."""
    try:   # bounded as a whole: a fresh connection to a hung Redis would otherwise cost connect + read timeouts
        serving = await asyncio.wait_for(gw.registry.serving(list(gw.settings.models)), gw.settings.broker.timeout_s)
    except REDIS_AWAY as exc:
        return readiness_of({}, f"unreachable: {type(exc).__name__}")
    return readiness_of(serving)


def readiness_of(serving: dict[str, Serving], redis_away: str | None = None) -> wire.Readiness:
    """/readyz's answer from each model's state (none when Redis is away: `redis_away` says why).

    Body: {"ready": bool, "redis": "ok" | "unreachable: <error>", "models": {name: {"ready": bool,
    "live_workers": int, "reason"?: str}}, "missing": [reasons]}, plus "error" and "error_type" when not ready.
    Ready: Redis answers and at least one model has a live worker with a consumer group to read (or no model is
    configured). A model without one answers 503 on its own routes and shows here, but does not make the gateway
    unready: one GPU-only model on a CPU cluster must not take down the CPU models' routes."""
    body: dict[str, Any] = {"ready": False, "redis": "ok", "models": {}}
    missing: list[str] = []
    if redis_away is not None:
        body["redis"] = redis_away
        missing.append(f"redis {redis_away}")
    for name, seen in serving.items():
        entry: dict[str, Any] = {"ready": seen.ready, "live_workers": seen.live_workers}
        if not seen.live_workers:
            entry["reason"] = "no live worker"
        elif not seen.group:
            entry["reason"] = "its consumer group is missing (Redis lost it; a live worker recreates it)"
        if not seen.ready:
            missing.append(f"model {name}: {entry['reason']}")
        body["models"][name] = entry
    body["ready"] = body["redis"] == "ok" and (not serving or any(e["ready"] for e in body["models"].values()))
    if not body["ready"]:
        body.update(error="; ".join(missing), error_type="unavailable")
    body["missing"] = missing
    return build(wire.Readiness, body)


READYZ_DOCS = dict(
    summary="Redis reachable and some model servable; each model's state in the body",
    **doc(wire.Readiness, {"ready": True, "redis": "ok", "missing": ["model gpt2: no live worker"],
                           "models": {"cnn": {"ready": True, "live_workers": 1},
                                      "gpt2": {"ready": False, "live_workers": 0, "reason": "no live worker"}}},
          errors=(), more={503: {
              "model": wire.Readiness, "description": "Not ready: what is missing", "content": {"application/json": {
                  "example": {"ready": False, "redis": "unreachable: TimeoutError", "models": {},
                              "error": "redis unreachable: TimeoutError", "error_type": "unavailable",
                              "missing": ["redis unreachable: TimeoutError"]}}}}}))


async def readyz(gw: Gateway, request: Request) -> Response:
    body = await readiness(gw)
    return json_answer(body, status_code=200 if body.ready else 503)


METRICS_DOCS = dict(summary="Prometheus metrics (text exposition format)",
                   **doc(None, METRICS_EXAMPLE, errors=(), media="text/plain", schema={"type": "string"},
                         description="Prometheus text format 0.0.4"))


async def metrics(gw: Gateway, request: Request) -> Response:
    """The gateway's registry with the broker's health read now. Redis unreachable: inferline_redis_up 0 and no
    broker or worker value at all (a stale one would read as current, and hide that no replica can be reached)."""
    try:
        gw.metrics.broker.update(await gw.registry.health(gw.settings.models))
    except BROKER_ERRORS:
        gw.metrics.broker.unreachable()
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
