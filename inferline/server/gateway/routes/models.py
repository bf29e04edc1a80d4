"""GET /v1/models: the served models in OpenAI's list shape, with each one's version, replicas, devices and queue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response

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
    return json_answer(model_list([(name, spec, await gw.registry.status(name))
                                   for name, spec in gw.settings.models.items()]))


def model_list(models: list[tuple[str, ModelSpec, ModelStatus]]) -> wire.ModelList:
    """The answer for these deployments (name, configuration, what the registry says now), in order."""
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": 0, "owned_by": "inferline",
         "version": status.info.version if status.info else None, "live_replicas": status.live_replicas,
         "replicas": spec.replicas, "devices": status.devices, "queue_depth": status.queue_depth,
         "kind": status.info.kind if status.info else None, "task": spec.task}
        for name, spec, status in models]
    return build(wire.ModelList, {"object": "list", "data": data})
