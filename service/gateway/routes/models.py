from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.config import Settings
from service.gateway.directory import Directory

router = APIRouter(tags=["operations"])


@router.get("/v1/models", summary="Served models (OpenAI shape) with version, live replicas, device and queue depth")
async def list_models(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    directory: Directory = request.app.state.directory
    data = []
    for name, spec in settings.models.items():
        status = await directory.status(name)
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "inferline",
                     "version": status["version"], "live_replicas": status["live_replicas"],
                     "replicas": spec.replicas, "devices": status["devices"], "queue_depth": status["queue_depth"],
                     "kind": status["kind"]})
    return {"object": "list", "data": data}
