"""The Open Inference Protocol's model repository extension, as Triton defines it (protocol/extension_model_repository):
`POST /v2/repository/index` (body `{"ready": bool}`, optional) answers a JSON array of `{name, version, state,
reason}`; `POST /v2/repository/models/{name}/load` and `/unload` answer 200 with an empty body once done, and an error
`{"error": "..."}` otherwise. tritonclient.http's get_model_repository_index, load_model and unload_model work as is.

The repository is this gateway's configuration: its deployments. The index lists one entry per version its live
workers serve (READY), or one entry without a version when none is live (UNAVAILABLE, or UNLOADING while workers of an
unloaded model still drain). Unload sets the deployment's wanted replicas to 0 (broker/fleet.py): the supervisor of
`inferline up` / `serve` drains the workers it runs; where no supervisor wrote a deployment record (workers run by
hand or by Kubernetes) every live worker is also asked to drain by its flag. Each finishes what it holds and exits;
the call answers once none is live (bounded by UNLOAD_WAIT_S). Load sets the wanted replicas back to the configured
count and answers once one replica is live (bounded by LOAD_WAIT_S: the supervisor starts them; workers run by hand or
by Kubernetes are started by whoever runs them). Requests sent while a model is unloaded wait in its queue until their
deadline (or get 503 at once while no worker has ever been seen: dispatch.py)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response

from inferline.server.broker import fleet
from inferline.server.errors import BadRequest, DeadlineExceeded
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.admin import broker, served
from inferline.server.gateway.routes.common import build, encode, parse_json
from inferline.server.schemas import admin as wire

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

LOAD_WAIT_S = 120.0     # a load answers once a replica is live, or 504 after this
UNLOAD_WAIT_S = 60.0    # an unload answers once no worker is live, or 504 after this (the workers' drain is bounded
                        # by their watchdog's drain cap)
POLL_S = 0.25
ERRORS = (400, 401, 403, 404, 422, 503, 504)

INDEX_DOCS = dict(
    summary="The model repository's index (Triton): each deployment's versions and states",
    openapi_extra={"requestBody": {
        "required": False, "content": {"application/json": {"schema": wire.RepositoryIndexRequest.model_json_schema(),
                                                            "example": {"ready": False}}}}},
    **doc(list[wire.RepositoryModel], [{"name": "echo", "version": "1", "state": "READY", "reason": ""},
                                       {"name": "gpt2", "version": "", "state": "UNAVAILABLE",
                                        "reason": "unloaded: 0 replicas wanted"}], family="kserve", errors=ERRORS))
DONE = "Done (an empty body, as Triton answers)"
LOAD_DOCS = dict(
    summary="Load a model (Triton): start its configured replicas; answers once one is live",
    openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
        "schema": wire.RepositoryLoadRequest.model_json_schema(), "example": {}}}}},
    **doc(None, "", family="kserve", errors=ERRORS, description=DONE))
UNLOAD_DOCS = dict(
    summary="Unload a model (Triton): its workers drain (answer what they hold) and exit; answers once none is live",
    openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
        "schema": wire.RepositoryUnloadRequest.model_json_schema(), "example": {}}}}},
    **doc(None, "", family="kserve", errors=ERRORS, description=DONE))


async def index(gw: Gateway, request: Request) -> Response:
    body = await request.body()
    ask = parse_json(body, wire.RepositoryIndexRequest) if body.strip() else wire.RepositoryIndexRequest()
    names = list(gw.settings.models)
    records = await broker(fleet.deployments(gw.redis, names))
    rows: list[dict[str, Any]] = []
    for name in names:
        workers = await broker(gw.registry.live_workers(name))
        record = records[name]
        wanted = record.total if record is not None else gw.settings.models[name].replicas
        if workers and wanted > 0:
            rows += [{"name": name, "version": v, "state": "READY", "reason": ""}
                     for v in sorted({w.version for w in workers})]
        elif workers:
            rows.append({"name": name, "version": "", "state": "UNLOADING",
                         "reason": f"unloaded: {len(workers)} worker(s) still draining"})
        elif wanted == 0:
            rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded: 0 replicas wanted"})
        else:
            rows.append({"name": name, "version": "", "state": "UNAVAILABLE",
                         "reason": f"no live worker (0 of {wanted} replicas wanted)"})
    if ask.ready:
        rows = [r for r in rows if r["state"] == "READY"]
    answer = b"[" + b",".join(encode(build(wire.RepositoryModel, r)) for r in rows) + b"]"
    return Response(answer, media_type="application/json")


async def load(gw: Gateway, request: Request) -> Response:
    model = served(gw, request)
    body = await request.body()
    ask = parse_json(body, wire.RepositoryLoadRequest) if body.strip() else wire.RepositoryLoadRequest()
    if ask.parameters:
        raise BadRequest(f"load parameters {sorted(ask.parameters)} are not supported: inferline loads {model} from "
                         "its configuration and model store", field="parameters")
    record = await broker(fleet.deployment(gw.redis, model))
    version = record.version if record is not None else served_version(gw, model)
    await broker(fleet.set_replicas(gw.redis, model, version, gw.settings.models[model].replicas))
    await wait_for(lambda n: n > 0, gw, model, LOAD_WAIT_S,
                   f"model {model}: load requested, but no replica is live after {LOAD_WAIT_S:g} s (the supervisor "
                   "of `inferline up` starts them; elsewhere start its workers)")
    return Response(b"", media_type="application/json")


async def unload(gw: Gateway, request: Request) -> Response:
    model = served(gw, request)
    body = await request.body()
    if body.strip():
        parse_json(body, wire.RepositoryUnloadRequest)   # unload_dependents: nothing depends on a model here
    record = await broker(fleet.deployment(gw.redis, model))
    versions = set(record.replicas) if record is not None else {served_version(gw, model)}
    for version in versions:   # every version it runs, a rollout's two included
        await broker(fleet.set_replicas(gw.redis, model, version, 0))
    if not await broker(fleet.supervised(gw.redis, model)):
        # workers run by hand or by Kubernetes: each drains on its flag (a supervisor drains the ones it runs itself,
        # and a flag would race it: a worker gone by itself is restarted)
        for worker in await broker(gw.registry.live_workers_ids(model)):
            await broker(fleet.request_drain(gw.redis, model, worker))
    await wait_for(lambda n: n == 0, gw, model, UNLOAD_WAIT_S,
                   f"model {model}: unload requested, its workers are still draining after {UNLOAD_WAIT_S:g} s")
    return Response(b"", media_type="application/json")


def served_version(gw: Gateway, model: str) -> str:
    """The version a model without a deployment record (no supervisor wrote one) serves: the configuration's pinned
    version, else "" (the supervisor's name for "whatever the configuration loads")."""
    return gw.settings.models[model].version or ""


async def wait_for(done: Any, gw: Gateway, model: str, bound_s: float, why: str) -> None:
    """Poll the model's live workers every POLL_S until done(count) holds. Raises DeadlineExceeded after bound_s."""
    deadline = time.monotonic() + bound_s
    while not done(len(await broker(gw.registry.live_workers_ids(model)))):
        if time.monotonic() > deadline:
            raise DeadlineExceeded(why)
        await asyncio.sleep(POLL_S)
