"""The generic route every deployment answers: POST /v1/models/{name}/predict with one request row as JSON (the
model's own request type; /docs shows it), or raw bytes (an image/* or application/octet-stream body) for a model
with a `decode` hook, its small options in the query string."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from inferline.server.errors import ValidationFailed
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import Body, json_object
from inferline.server.protocol import OP_PREDICT


async def predict(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
                 query: str) -> bytes:
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        if not body:
            raise ValidationFailed("empty body: send the bytes the model decodes", field="body")
        params: dict[str, Any] = {"options": dict(parse_qsl(query))}
        reply = await d.call(path["model"], OP_PREDICT, params, body, request_id=rid)
        return reply.body
    reply = await d.call(path["model"], OP_PREDICT, {"row": json_object(body)}, request_id=rid)
    return reply.body


DOCS = dict(summary="Run a model on one request of its own request type (see each model's schema below)",
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object"},
                                     "example": {"pixels": [[0.5, 0.5], [0.5, 0.5]]}},
                "application/octet-stream": {"schema": {"contentMediaType": "application/octet-stream"}}}}},
            **doc(None, {"model": "tinycnn", "version": "1", "label": 3, "score": 0.41}, family="openai",
                  schema={"type": "object", "required": ["model", "version"],
                          "properties": {"model": {"type": "string"}, "version": {"type": "string"}}}))
