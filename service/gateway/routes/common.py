"""Helpers every task route shares: the dispatcher, the request id, and answering with a worker's body."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from service.gateway.dispatch import Dispatcher
from service.protocol import OP_TASK

JSON = "application/json"
Model = TypeVar("Model", bound=BaseModel)


async def parse_json(request: Request, model: type[Model]) -> Model:
    """The body as `model`, whatever the declared Content-Type (clients often send none)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra that documents a JSON body parsed by parse_json."""
    return {"requestBody": {"required": True, "content": {JSON: {"schema": model.model_json_schema()}}}}


def dispatcher(request: Request) -> Dispatcher:
    d: Dispatcher = request.app.state.dispatcher
    return d


def request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])


async def run_task(request: Request, model: str, params: dict[str, Any], blob: bytes = b"") -> Response:
    """Queue a task request and answer with the worker's JSON body as is (no re-encoding here)."""
    reply = await dispatcher(request).call(model, OP_TASK, params, blob, request_id=request_id(request))
    return Response(reply.body, media_type=JSON)
