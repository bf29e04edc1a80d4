"""The API document. Routes declare their answers with `doc(...)`: the 200 body (a model from service.schemas.responses,
or a media type of its own: Prometheus text, Server-Sent Events) with an example, and the error body of their
protocol family for each error status, its example rendered by the gateway's own error code (errors.body_of), so the
document shows exactly what is sent. `with_models` finishes the document at request time: one operation per served
model (POST /v1/models/{name}/predict, from the schemas its workers published; the gateway never imports a model),
and every nested pydantic `$defs` moved to components/schemas so that every `$ref` resolves. `mount_docs` serves
Swagger UI from the `swagger-ui-bundle-v2` package's own files, so /docs works offline."""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from inferline.server.errors import typed
from inferline.server.gateway.errors import ERRORS, body_of
from inferline.server.protocol import ModelInfo
from inferline.server.schemas import responses as wire

log = logging.getLogger(__name__)
JSON = "application/json"
SSE = "text/event-stream"
EXAMPLE_ID = "0a1b2c3d4e5f"
FAMILY_PATH = {"tgi": "/generate", "openai": "/v1/completions", "kserve": "/v2/models/m/infer"}
FAMILY_MODEL: dict[str, type[BaseModel]] = {"tgi": wire.TaskError, "openai": wire.OpenAIError, "kserve": wire.V2Error}
# (error type, description, example message, field) per status; the error type picks the status (errors.ERRORS).
STATUSES: dict[int, tuple[str, str, str, str | None]] = {
    400: ("bad_request", "The body is not what the route reads (not JSON, a bad envelope)",
          "body is not valid JSON: unexpected character", "body"),
    401: ("auth", "No API key, or one the gateway does not accept (when keys are required)",
          "missing API key: send Authorization: Bearer <key>", None),
    403: ("forbidden", "The key lacks the scope or model this call needs", "this key may not use model gpt2",
          "model"),
    404: ("not_found", "No such model, version or route", "model 'nope' is not served here", "model"),
    409: ("conflict", "The call does not fit the resource's state now (a rollout already in progress, nothing to "
          "promote)", "model echo is already rolling out 1 -> 2 (canary)", "version"),
    413: ("too_large", "The body is larger than gateway.max_body_bytes", "body is 9000000 bytes; the limit is 8388608",
          "body"),
    422: ("validation", "A field fails validation; the message names the field, its bound and the value given",
          "`horizon` must be >= 1. Given: 0", "horizon"),
    429: ("rate_limited", "The key's rate, burst or concurrency limit; retry after Retry-After seconds",
          "rate limit: 10 requests/s", None),
    500: ("dead_letter", "A request the workers could not process (x-should-retry: false when it was dead-lettered)",
          "request 0a1b2c3d4e5f was dead-lettered after 3 tries", None),
    503: ("overloaded", "The model's queue is full (queue_cap) or Redis is away; retry after Retry-After seconds",
          "model lstm is at its queue_cap (2048 requests); retry later", None),
    504: ("timeout", "The request's deadline passed before a worker answered", "no answer within 30 s", None),
}
TASK_ERRORS = (400, 401, 403, 404, 413, 422, 429, 500, 503, 504)
READ_ERRORS = (401, 403, 404, 422, 429, 503)
HEADER_DOCS = {
    "retry-after": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}},
    "x-should-retry": {"description": "`false`: this 500 will fail again (dead-lettered)",
                       "schema": {"type": "string"}},
    "x-request-id": {"description": "the request's id (the caller's own, when it sent a sane one)",
                     "schema": {"type": "string"}},
}
# Component schemas referenced by hand (error bodies, an SSE event's shape); with_models adds them.
EXTRA_SCHEMAS: tuple[type[BaseModel], ...] = (wire.StreamEvent, wire.StreamError, wire.Completion, wire.ChatChunk,
                                              wire.TaskError, wire.OpenAIError, wire.V2Error)


def error_example(family: str, status: int) -> dict[str, Any]:
    error_type, _, message, field = STATUSES[status]
    return body_of(typed(error_type, message, field), FAMILY_PATH[family], EXAMPLE_ID)


def error_responses(family: str, statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route of `family` ("tgi", "openai" or "kserve")."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        error_type, description, _, _ = STATUSES[status]
        headers = {"x-request-id": HEADER_DOCS["x-request-id"]}
        headers |= {name: HEADER_DOCS[name] for name, _ in ERRORS[error_type].headers}
        # An explicit JSON schema, not FastAPI's "model": that would land under a streaming route's own media type.
        schema = {"$ref": f"#/components/schemas/{FAMILY_MODEL[family].__name__}"}
        out[status] = {"description": description, "headers": headers,
                       "content": {JSON: {"schema": schema, "example": error_example(family, status)}}}
    return out


def doc(model: Any, example: Any, family: str = "tgi", errors: tuple[int, ...] = TASK_ERRORS,
        description: str = "The answer", media: str = JSON, schema: dict[str, Any] | None = None,
        stream_example: str | None = None, stream_event: type[BaseModel] | None = None,
        more: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Decorator keyword arguments documenting a route's answers: `responses` (200 and each error status) and, for
    a 200 that is not JSON, `response_class` with that media type. stream_example: the route may also answer
    Server-Sent Events (each event's `data:` a `stream_event`). more: other documented answers (a 503 that is
    an answer, like /readyz's)."""
    ok: dict[str, Any] = {"description": description, "content": {media: {"example": example}}}
    if model is not None:
        ok["model"] = model
    if schema is not None:
        ok["content"][media]["schema"] = schema
    if stream_example is not None:
        event = stream_event or wire.StreamEvent
        ok["content"][SSE] = {"schema": {"contentMediaType": SSE, "description": f"Server-Sent Events; each `data:` "
                                         f"is a {event.__name__} (components/schemas)"},
                              "example": stream_example,
                              "x-sse-event": {"$ref": f"#/components/schemas/{event.__name__}"}}
    out: dict[str, Any] = {"responses": {200: ok, **error_responses(family, errors), **(more or {})}}
    if media != JSON:
        out["response_class"] = type(f"{media.replace('/', '_')}_response", (Response,), {"media_type": media})
    return out


def with_models(base: dict[str, Any], infos: dict[str, ModelInfo]) -> dict[str, Any]:
    """A copy of `base` with an operation per model that has published its schemas, and every `$defs` hoisted."""
    doc_ = copy.deepcopy(base)
    schemas = doc_.setdefault("components", {}).setdefault("schemas", {})
    for extra in EXTRA_SCHEMAS:
        schemas.setdefault(extra.__name__, hoist(extra.model_json_schema(ref_template="#/$defs/{model}"), "",
                                                 schemas))
    doc_["paths"] = hoist(doc_.setdefault("paths", {}), "", schemas)
    paths = doc_["paths"]
    for ops in paths.values():
        for op in ops.values():
            for media in op.get("responses", {}).get("200", {}).get("content", {}).values():
                # FastAPI types every non-JSON body as a JSON string; a byte stream is described by its
                # contentMediaType alone (OpenAPI 3.1), or validators would read the SSE bytes as a string.
                if "contentMediaType" in media.get("schema", {}):
                    media["schema"].pop("type", None)
    for name, info in sorted(infos.items()):
        if info.request_schema is None:
            continue
        request = hoist(info.request_schema, f"{name}.", schemas)
        response = hoist(info.response_schema or {"type": "object"}, f"{name}.", schemas)
        answer = {"allOf": [{"type": "object", "required": ["model", "version"], "properties": {
            "model": {"type": "string", "const": name}, "version": {"type": "string"}}}, response]}
        # /v1/... answers errors in OpenAI's shape (errors.family)
        errors = {str(status): {"description": spec["description"], "headers": spec["headers"], "content": {JSON: {
            "schema": {"$ref": "#/components/schemas/OpenAIError"}, "example": spec["content"][JSON]["example"]}}}
            for status, spec in error_responses("openai", TASK_ERRORS).items()}
        example = example_of(info.request_schema, info.request_schema.get("$defs", {}))
        answered = {"model": name, "version": info.version,
                    **example_of(info.response_schema or {}, (info.response_schema or {}).get("$defs", {}))}
        paths[f"/v1/models/{name}/predict"] = {"post": {
            "tags": ["models"], "operationId": f"predict_{name}",
            "summary": f"Run {name} (version {info.version}) on one request",
            "requestBody": {"required": True, "content": {
                JSON: {"schema": request, "example": example},
                "application/octet-stream": {"schema": {"contentMediaType": "application/octet-stream",
                                                        "description": "bytes for a model with a decode hook"}}}},
            "responses": {"200": {"description": "The model's answer", "content": {JSON: {
                "schema": answer, "example": answered}}}, **errors}}}
    return doc_


SCALAR_EXAMPLES: dict[str, Any] = {"number": 0.5, "integer": 1, "string": "text", "boolean": False, "null": None}


def example_of(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    """A value a schema accepts, made from its defaults, bounds and sizes: the example of a model's own predict
    operation, whose types the gateway knows only as the JSON schema its workers published."""
    if depth > 12:
        return None
    if "$ref" in schema:
        return example_of(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key, []) if o.get("type") != "null"]
        if options:
            return example_of(options[0], defs, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: example_of(v, defs, depth + 1) for k, v in props.items() if k in schema.get("required", props)}
    if kind == "array":
        item = example_of(schema.get("items", {}), defs, depth + 1)
        return [item] * max(1, int(schema.get("minItems", 1)))
    if kind in ("number", "integer") and "minimum" in schema:
        return schema["minimum"]
    return SCALAR_EXAMPLES.get(kind) if isinstance(kind, str) else None


def hoist(schema: Any, prefix: str, into: dict[str, Any]) -> Any:
    """`schema` with every nested `$defs` (at any depth) stored in `into` under `prefix`-ed names and every
    `#/$defs/...` reference rewritten to components/schemas."""
    schema = copy.deepcopy(schema)
    _collect(schema, prefix, into)
    return _rewrite(schema, prefix)


def _collect(node: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.pop("$defs", {}).items():
            _collect(value, prefix, into)
            into[prefix + key] = _rewrite(value, prefix)
        for value in node.values():
            _collect(value, prefix, into)
    elif isinstance(node, list):
        for value in node:
            _collect(value, prefix, into)


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


def mount_docs(app: Any, openapi_url: str = "/openapi.json") -> None:
    """GET /docs: Swagger UI from local files (the swagger-ui-bundle-v2 package) under /docs/assets; from its CDN
    only when that package is missing."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.responses import HTMLResponse

    urls: dict[str, Any] = {}
    try:
        import swagger_ui_bundle
        from starlette.staticfiles import StaticFiles

        app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
        urls = {"swagger_js_url": "/docs/assets/swagger-ui-bundle.js", "swagger_css_url": "/docs/assets/swagger-ui.css",
                "swagger_favicon_url": "/docs/assets/favicon-32x32.png"}
    except ImportError:
        log.warning("swagger-ui-bundle-v2 is not installed: /docs loads Swagger UI from a CDN")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title="inferline", **urls)
