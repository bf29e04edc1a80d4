"""The /admin routes of the management API: deployments with their replicas, draining one worker, and each model's
dead letters (list without payloads, replay, purge). Every one needs the `admin` scope (the route table marks them;
security.py and audit.py enforce and log). Redis is read and written through the broker (fleet.py, deadletters.py);
a Redis that does not answer is a 503."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from starlette.responses import Response

from inferline.server.broker import deadletters, fleet, keys
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.registry import ModelHealth
from inferline.server.errors import InferlineError, NotFound, Unavailable, ValidationFailed
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import build, json_answer, json_body, parse_json
from inferline.server.schemas import admin as wire

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

T = TypeVar("T")
ADMIN_ERRORS = (401, 403, 404, 422, 503)
LIST_LIMIT = 1000   # dead letters listed per call at most

REPLICA_EXAMPLE = {"id": "host-4242-a1b2c3", "live": True, "draining": False, "device": "cpu", "version": "1",
                   "pid": 4242, "host": "host", "batches": 120, "items": 480, "started": 1765000000000,
                   "beat": 1765000060000}
DEPLOYMENTS_DOCS = dict(summary="Deployments with their replicas (live, device, version, pid, host, batches), queue "
                                "depth and oldest pending age", **doc(wire.DeploymentList, {"deployments": [{
                            "name": "echo", "task": None, "replicas": 1, "configured_replicas": 1,
                            "live_replicas": 1, "versions": ["1"], "queue_depth": 0, "pending": 0,
                            "oldest_pending_age_s": 0.0, "oldest_queued_age_s": 0.0, "dead_letters": 0,
                            "workers": [REPLICA_EXAMPLE]}]}, errors=ADMIN_ERRORS))
DRAIN_DOCS = dict(summary="Drain one worker: it takes nothing new, answers what it holds and exits (under `inferline "
                          "up` the supervisor starts a fresh one to keep the wanted replicas: scale to change those)",
                  **doc(wire.WorkerDrain, {"worker": "host-4242-a1b2c3", "model": "echo", "draining": True},
                        errors=ADMIN_ERRORS))
DEAD_LETTERS_DOCS = dict(
    summary="A model's dead letters: request id, op, tries and error of each, never its payload",
    openapi_extra={"parameters": [{"name": "limit", "in": "query", "required": False,
                                   "schema": {"type": "integer", "minimum": 1, "maximum": LIST_LIMIT}}]},
    **doc(wire.DeadLetterList, {"model": "echo", "total": 1, "entries": [{
        "id": "1765000000000-0", "request_id": "0a1b2c3d4e5f", "op": "v2", "tries": 3,
        "reason": "worker died or hung 3 times", "at_ms": 1765000000000, "replayable": True}]}, errors=ADMIN_ERRORS))
REPLAY_DOCS = dict(
    summary="Replay dead letters (the given ids, or all): each is queued again as a new request, answered to this "
            "call (ok or its error), and removed from the dead letters",
    openapi_extra=json_body(wire.ReplayRequest, {"ids": ["1765000000000-0"]}),
    **doc(wire.ReplayResult, {"model": "echo", "replayed": [{"id": "1765000000000-0", "request_id": "5e6f7a8b9c0d",
                                                            "ok": True, "error_type": "", "error": ""}],
                              "skipped": {}}, errors=ADMIN_ERRORS))
PURGE_DOCS = dict(summary="Delete dead letters (the given ids, or all) and their kept payloads",
                  openapi_extra=json_body(wire.PurgeRequest, {"ids": []}),
                  **doc(wire.PurgeResult, {"model": "echo", "purged": 1}, errors=ADMIN_ERRORS))


async def broker(call: Awaitable[T]) -> T:
    """A broker call's result; Redis away or hung is a 503 naming that."""
    try:
        return await call
    except BROKER_ERRORS as exc:
        raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None


def served(gw: Gateway, request: Request) -> str:
    """The path's model, when it is configured here. Raises NotFound."""
    model: str = request.path_params["model"]
    if model not in gw.settings.models:
        raise NotFound(f"model {model!r} is not served here; served models: {sorted(gw.settings.models)}",
                       field="model")
    return model


async def deployments(gw: Gateway, request: Request) -> Response:
    names = list(gw.settings.models)
    health = await broker(gw.registry.health(names))
    records = await broker(fleet.deployments(gw.redis, names))
    rows = []
    for name in names:
        drains = await broker(fleet.draining(gw.redis, name, [wid for wid, _ in health[name].workers]))
        record = records[name]
        depth = await broker(gw.registry.depth(name))   # the common stream and a rollout's lanes
        rows.append(deployment(gw, name, health[name], record.total if record is not None else None, drains, depth))
    return json_answer(build(wire.DeploymentList, {"deployments": rows}))


def deployment(gw: Gateway, name: str, h: ModelHealth, desired: int | None, drains: set[str],
               depth: int) -> dict[str, Any]:
    spec = gw.settings.models[name]
    workers = [{"id": wid, "live": True, "draining": wid in drains, "device": w.device, "version": w.version,
                "pid": w.pid, "host": w.host, "batches": w.batches, "items": w.items, "started": w.started,
                "beat": w.beat} for wid, w in h.workers]
    return {"name": name, "task": spec.task, "replicas": spec.replicas if desired is None else desired,
            "configured_replicas": spec.replicas, "live_replicas": len(workers),
            "versions": sorted({w.version for _, w in h.workers}), "queue_depth": depth,
            "pending": h.pending, "oldest_pending_age_s": h.oldest_pending_age_s,
            "oldest_queued_age_s": h.oldest_queued_age_s, "dead_letters": h.dead_letter_length, "workers": workers}


async def drain_worker(gw: Gateway, request: Request) -> Response:
    worker_id: str = request.path_params["worker"]
    names = list(gw.settings.models)
    model = await broker(fleet.owner(gw.redis, names, worker_id))
    alive = model is not None and worker_id in await broker(gw.registry.alive(model, [worker_id]))
    if model is None or not alive:
        raise NotFound(f"no live worker {worker_id!r}: GET /admin/deployments lists the workers", field="worker")
    await broker(fleet.request_drain(gw.redis, model, worker_id))
    return json_answer(build(wire.WorkerDrain, {"worker": worker_id, "model": model, "draining": True}), 202)


async def list_dead_letters(gw: Gateway, request: Request) -> Response:
    model = served(gw, request)
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= LIST_LIMIT:
        raise ValidationFailed(f"`limit` must be an integer in [1, {LIST_LIMIT}]. Given: {raw!r}", field="limit")
    total, rows = await broker(deadletters.listing(gw.redis, model, int(raw)))
    return json_answer(build(wire.DeadLetterList, {"model": model, "total": total, "entries": rows}))


async def replay_dead_letters(gw: Gateway, request: Request) -> Response:
    model = served(gw, request)
    body = await request.body()
    ask = parse_json(body or b"{}", wire.ReplayRequest)
    found = await broker(deadletters.entries(gw.redis, model, ask.ids, ask.limit))
    skipped = {i: "no such dead letter" for i in ask.ids if i not in {e.id for e in found}}
    outcomes = []
    for entry in found:   # one at a time: a replay is a repair, not a burst on a model that just failed
        payload = await broker(deadletters.payload(gw.redis, model, entry.id))
        if payload is None:
            skipped[entry.id] = (f"its payload was not kept (over {keys.DEAD_PAYLOAD_BYTES} bytes, or trimmed: the "
                                 f"newest {keys.DEAD_PAYLOAD_MAXLEN} are kept)")
            continue
        try:
            request_id, reply = await gw.dispatcher.replay(model, entry.op, payload)
        except InferlineError as err:   # not queued, or no answer in time: the dead letter stays
            skipped[entry.id] = f"{err.error_type}: {err.message}"
            continue
        # answered: ok, or failed again (a worker's error, or dead-lettered anew as a new entry): either way this
        # entry is done with
        await broker(deadletters.purge(gw.redis, model, [entry.id]))
        outcomes.append({"id": entry.id, "request_id": request_id, "ok": reply.ok,
                         "error_type": "" if reply.ok else reply.error_type,
                         "error": "" if reply.ok else reply.error_fields()[0]})
    return json_answer(build(wire.ReplayResult, {"model": model, "replayed": outcomes, "skipped": skipped}))


async def purge_dead_letters(gw: Gateway, request: Request) -> Response:
    model = served(gw, request)
    body = await request.body()
    ask = parse_json(body or b"{}", wire.PurgeRequest)
    purged = await broker(deadletters.purge(gw.redis, model, ask.ids))
    return json_answer(build(wire.PurgeResult, {"model": model, "purged": purged}))
