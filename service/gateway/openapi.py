"""The API document: FastAPI's own for the fixed routes, plus one operation per served model,
POST /v1/models/{name}/predict, whose request and response schemas are the ones the model's workers published (the
gateway never imports a model). Pydantic's nested `$defs` move to components/schemas, so every `$ref` resolves."""

from __future__ import annotations

import copy
from typing import Any

from service.protocol import ModelInfo


def with_models(base: dict[str, Any], infos: dict[str, ModelInfo]) -> dict[str, Any]:
    """A copy of `base` with an operation per model that has published its schemas."""
    doc = copy.deepcopy(base)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    paths = doc.setdefault("paths", {})
    for name, info in sorted(infos.items()):
        if info.request_schema is None:
            continue
        request = hoist(info.request_schema, f"{name}.", schemas)
        response = hoist(info.response_schema or {"type": "object"}, f"{name}.", schemas)
        answer = {"allOf": [{"type": "object", "required": ["model", "version"], "properties": {
            "model": {"type": "string", "const": name}, "version": {"type": "string"}}}, response]}
        paths[f"/v1/models/{name}/predict"] = {"post": {
            "tags": ["models"], "operationId": f"predict_{name}",
            "summary": f"Run {name} (version {info.version}) on one request",
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": {"description": "The model's answer", "content": {
                "application/json": {"schema": answer}}}}}}
    return doc


def hoist(schema: dict[str, Any], prefix: str, into: dict[str, Any]) -> dict[str, Any]:
    """The schema with its `$defs` stored in `into` under `prefix`-ed names and every reference rewritten."""
    schema = copy.deepcopy(schema)
    defs = schema.pop("$defs", {})
    for key, value in defs.items():
        into[prefix + key] = _rewrite(value, prefix)
    return _rewrite(schema, prefix)


def _rewrite(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, prefix) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            out["$ref"] = "#/components/schemas/" + prefix + ref[len("#/$defs/"):]
        return out
    if isinstance(node, list):
        return [_rewrite(v, prefix) for v in node]
    return node
