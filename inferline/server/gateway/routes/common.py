"""Helpers every route shares: parsing a JSON body, queueing for a task's deployment, answering with a worker's body,
and building an answer of the gateway's own through its wire model (schemas/responses.py), serialised once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from inferline.server import priority
from inferline.server.errors import BadRequest, ValidationFailed
from inferline.server.gateway import record as records
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.errors import from_validation
from inferline.server.gateway.record import request_id
from inferline.server.protocol import OP_PREDICT

JSON = "application/json"
Model = TypeVar("Model", bound=BaseModel)
# A request body. The hot path passes a bytearray that Dispatcher.call empties once the request is in Redis (so a
# waiting request holds no copy of it): handlers must not read the body after they passed it to the dispatcher.
Body = bytes | bytearray
# (dispatcher, request id, body, headers, path params, query string) -> the 200 response's JSON body.
Handler = Callable[[Dispatcher, str, Body, Mapping[str, str], dict[str, str], str], Awaitable[bytes]]


def ask_priority(value: int | str | None) -> None:
    """A generation body's `priority` (vLLM's integer, or high/normal/low) as the request's priority, in place of
    its x-priority header; the key's maximum still clamps it (the dispatcher). Raises ValidationFailed."""
    record = records.current.get()
    if value is not None and record is not None:
        record.asked = priority.from_body(value)


def parse_json(body: Body, model: type[Model]) -> Model:
    """The body as `model`, whatever the declared Content-Type (clients often send none). Raises the
    InferlineError that names the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation(RequestValidationError(exc.errors(include_url=False))) from None


def json_object(body: Body) -> dict[str, Any]:
    """The body as a JSON object, whatever the declared Content-Type. Raises BadRequest (not JSON) or ValidationFailed
    (not an object)."""
    try:
        row = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(row, dict):
        raise ValidationFailed("body must be a JSON object: one request of the model's request type", field="body")
    return row


def build(model: type[Model], fields: dict[str, Any]) -> Model:
    """`fields` as a `model` answer, validated by pydantic-core, nested dicts included. A field the model does not
    declare raises ValidationError (a route's bug, caught by tests/test_answers.py, never sent); a field left out is
    not sent (encode). Cheaper than `model(**fields)` or `model_construct` (measured, a per-token stream chunk:
    validation ~1.5 µs against ~3 µs and ~6 µs)."""
    return model.__pydantic_validator__.validate_python(fields, extra="forbid")


def encode(answer: BaseModel) -> bytes:
    """An answer's JSON: the fields its route set (exclude_unset), by pydantic-core in one call (~1 µs for a stream
    chunk). A logprob that is not finite is written as null, as orjson did (pydantic's ser_json_inf_nan default)."""
    return answer.__pydantic_serializer__.to_json(answer, exclude_unset=True)


def json_answer(answer: BaseModel, status_code: int = 200) -> Response:
    return Response(encode(answer), status_code=status_code, media_type=JSON)


def json_body(model: type[BaseModel], example: Any = None) -> dict[str, Any]:
    """openapi_extra that documents a JSON body parsed by parse_json (its nested $defs are hoisted into
    components/schemas when the document is served: server/gateway/openapi.py)."""
    media: dict[str, Any] = {"schema": model.model_json_schema()}
    if example is not None:
        media["example"] = example
    return {"requestBody": {"required": True, "content": {JSON: media}}}


async def run_task(d: Dispatcher, rid: str, task: str, params: dict[str, Any], blob: Body = b"") -> bytes:
    """Queue a request for the deployment bound to `task`; the worker's JSON body is the answer as is (no
    re-encoding here). params: {"row": {...}}, {"rows": [...]}, or {"options": {...}} beside raw bytes."""
    reply = await d.call(d.task(task).name, OP_PREDICT, params, blob, request_id=rid)
    return reply.body


async def answer(d: Dispatcher, request: Request, handler: Handler) -> Response:
    """Run a hot-path handler for a FastAPI route (the same code serves both ways)."""
    body = await handler(d, request_id(), await request.body(), request.headers, dict(request.path_params),
                         request.url.query)
    return Response(body, media_type=JSON)
