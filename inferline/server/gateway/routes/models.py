"""GET /v1/models: the served models in OpenAI's list shape, with each one's version, replicas, devices and queue."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response

from inferline.server import store
from inferline.server.broker import fleet
from inferline.server.broker.registry import ModelStatus
from inferline.server.config import ModelSpec
from inferline.server.gateway.openapi import READ_ERRORS, doc
from inferline.server.gateway.routes.common import build, json_answer
from inferline.server.schemas import responses as wire

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

DOCS = dict(summary="Served models (OpenAI shape) with version, live replicas, device and queue depth",
            **doc(wire.ModelList, {"object": "list", "data": [{
                "id": "cnn", "object": "model", "created": 0, "owned_by": "inferline", "version": "1",
                "live_replicas": 1, "replicas": 1, "devices": ["cpu"], "queue_depth": 0, "kind": "batch",
                "task": "classify-image"}]}, family="openai", errors=READ_ERRORS))


async def list_models(gw: Gateway, request: Request) -> Response:
    deployments = await fleet.deployments(gw.redis, gw.settings.models)
    return json_answer(model_list([(name, spec, await gw.registry.status(name), deployments.get(name),
                                    await fleet.routing(gw.redis, name))
                                   for name, spec in gw.settings.models.items()]))


def versions(status: ModelStatus, dep: fleet.Deployment | None, route: dict[str, str]) -> list[dict[str, Any]]:
    """Each version wanted or running: its replicas wanted and live, and its share of the traffic now."""
    live = Counter(w.version for w in status.workers)
    wanted = dict(dep.replicas) if dep is not None else {}
    if route:
        weights = {route["a"]: 100 - int(route.get("share", 0)), route["b"]: int(route.get("share", 0))}
    else:
        served = dep.version if dep is not None and dep.version else (next(iter(live)) if len(live) == 1 else "")
        weights = {served: 100} if served else {}
    names = sorted({*wanted, *live, *weights} - {""}, key=store.version_order)
    return [{"version": v, "replicas": wanted.get(v, 0), "live_replicas": live[v], "weight": weights.get(v, 0),
             "live": live[v] > 0} for v in names]


def model_list(models: list[tuple[str, ModelSpec, ModelStatus, fleet.Deployment | None, dict[str, str]]]
               ) -> wire.ModelList:
    """The answer for these deployments (name, configuration, what the registry says now, the replicas wanted and
    the traffic split), in order. `replicas` is the run-time target when a supervisor keeps one, else the config's."""
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": 0, "owned_by": "inferline",
         "version": (dep.version if dep is not None and dep.version else None) or
                    (status.info.version if status.info else None),
         "live_replicas": status.live_replicas,
         "replicas": dep.total if dep is not None else spec.replicas, "devices": status.devices,
         "queue_depth": status.queue_depth, "kind": status.info.kind if status.info else None, "task": spec.task,
         "versions": versions(status, dep, route)}
        for name, spec, status, dep, route in models]
    return build(wire.ModelList, {"object": "list", "data": data})
