"""The fleet's admin routes: rollouts (start, status, promote) and run-time scaling. The work is server/rollout.py's;
these parse the bodies and build the answers (schemas/fleet.py). Declared in the route table with `admin=True`: the
security layer lets only keys with the `admin` scope through."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from starlette.responses import Response

from inferline.server import rollout
from inferline.server.errors import NotFound
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import build, json_answer, json_body, parse_json
from inferline.server.schemas import fleet as bodies
from inferline.server.schemas import responses as wire

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

ADMIN_ERRORS = (401, 403, 404, 409, 422, 503)
STATE_EXAMPLE = {
    "model": "echo", "state": "canary", "from_version": "1", "to_version": "2", "canary_percent": 20,
    "weights": {"1": 80, "2": 20}, "live_replicas": {"1": 1, "2": 1}, "requests": {"1": 0, "2": 41},
    "failures": {"1": 0, "2": 0}, "dead_lettered": {"1": 0, "2": 0},
    "window": {"requests": 200, "seconds": 60.0, "max_failure_rate": 0.05, "closed": False},
    "automatic_rollback": False, "retired_version_may_stop": False, "reason": None, "started_ms": 1765000000000,
    "finished_ms": None}
ROLLOUT_DOCS = dict(summary="Roll a model out to another store version (canary optional); 202 with its state",
                    status_code=202, openapi_extra=json_body(bodies.RolloutRequest, {"version": "2",
                                                                                   "canary_percent": 20}),
                    **doc(wire.RolloutState, STATE_EXAMPLE, family="tgi", errors=ADMIN_ERRORS))
STATUS_DOCS = dict(summary="The model's current or last rollout",
                   **doc(wire.RolloutState, STATE_EXAMPLE, family="tgi", errors=ADMIN_ERRORS))
PROMOTE_DOCS = dict(summary="Finish a canary: all traffic to the new version",
                    **doc(wire.RolloutState, {**STATE_EXAMPLE, "state": "rolling", "canary_percent": 100,
                                              "weights": {"1": 0, "2": 100}}, family="tgi", errors=ADMIN_ERRORS))
SCALE_DOCS = dict(summary="Set a model's replicas at run time (the supervisor of `inferline up` / `serve` acts)",
                  openapi_extra=json_body(bodies.ScaleRequest, {"replicas": 3}),
                  **doc(wire.ScaleAnswer, {"model": "echo", "version": "1", "replicas": 3, "live_replicas": 1},
                        family="tgi", errors=ADMIN_ERRORS))


async def state(gw: Gateway, model: str, status_code: int = 200) -> Response:
    found = await rollout.status(gw.redis, gw.registry, model)
    if found is None:
        raise NotFound(f"model {model} has had no rollout", field="model")
    return json_answer(build(wire.RolloutState, found), status_code)


async def start_rollout(gw: Gateway, request: Request) -> Response:
    spec = gw.dispatcher.spec(request.path_params["model"])
    body = parse_json(await request.body(), bodies.RolloutRequest)
    await rollout.begin(gw.redis, gw.registry, spec, body.model_dump())
    return await state(gw, spec.name, 202)


async def rollout_status(gw: Gateway, request: Request) -> Response:
    return await state(gw, gw.dispatcher.spec(request.path_params["model"]).name)


async def promote(gw: Gateway, request: Request) -> Response:
    spec = gw.dispatcher.spec(request.path_params["model"])
    await rollout.promote(gw.redis, spec.name)
    return await state(gw, spec.name)


async def scale(gw: Gateway, request: Request) -> Response:
    spec = gw.dispatcher.spec(request.path_params["model"])
    body = parse_json(await request.body(), bodies.ScaleRequest)
    version = await rollout.scale(gw.redis, gw.registry, spec.name, body.replicas)
    live = sum(1 for w in await gw.registry.live_workers(spec.name) if not version or w.version == version)
    return json_answer(build(wire.ScaleAnswer, {"model": spec.name, "version": version, "replicas": body.replicas,
                                                "live_replicas": live}))
