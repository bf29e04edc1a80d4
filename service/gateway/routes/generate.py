"""TGI-compatible text generation: /generate, /generate_stream, and / (what the text-generation client
calls). Errors mid-stream are SSE events {"error", "error_type"}; no [DONE] line on these routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from service.errors import InferlineError
from service.gateway.errors import stream_event
from service.gateway.generation import (
    CLIENT_GONE,
    ClientGone,
    Generation,
    collect,
    first_then_rest,
    token_events,
    token_of,
    unless_client_leaves,
)
from service.gateway.routes.common import JSON, dispatcher, json_body, parse_json, request_id
from service.schemas.tgi import GenerateRequest

router = APIRouter(tags=["text generation (TGI)"])
TASK = "generate"   # the deployment these routes serve is the one configured with task = "generate"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def response_body(req: GenerateRequest, gen: Generation) -> dict[str, Any]:
    text = (req.inputs + gen.text) if req.parameters.return_full_text else gen.text
    body: dict[str, Any] = {"generated_text": text}
    if req.parameters.details:
        body["details"] = {"finish_reason": gen.finish_reason, "generated_tokens": gen.generated_tokens,
                           "seed": gen.seed, "prefill": gen.prefill, "tokens": gen.tokens}
    return body


async def generate_once(request: Request, req: GenerateRequest) -> dict[str, Any]:
    """The whole answer. Raises ClientGone (the sequence is dropped) when the client leaves before it is ready."""
    d = dispatcher(request)
    events = token_events(d, d.task(TASK).name, req.parameters.to_params(req.inputs), request_id(request))
    return response_body(req, await unless_client_leaves(request.receive, collect(events)))


async def sse(request: Request, req: GenerateRequest) -> Response:
    d = dispatcher(request)
    events = await first_then_rest(token_events(d, d.task(TASK).name, req.parameters.to_params(req.inputs),
                                                request_id(request)))

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                last = event.finish_reason is not None
                text = event.generated_text if last else None
                if last and req.parameters.return_full_text:
                    text = req.inputs + (text or "")
                yield b"data:" + orjson.dumps({
                    "index": event.index, "token": token_of(event), "generated_text": text,
                    "details": {"finish_reason": event.finish_reason, "generated_tokens": event.index + 1,
                                "seed": event.seed} if last else None}) + b"\n\n"
        except InferlineError as exc:
            yield b"data:" + orjson.dumps(stream_event(exc)) + b"\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/generate", summary="Generate text (TGI format)", openapi_extra=json_body(GenerateRequest))
async def generate(request: Request) -> Response:
    req = parse_json(await request.body(), GenerateRequest)
    try:
        return Response(orjson.dumps(await generate_once(request, req)), media_type=JSON)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)


@router.post("/generate_stream", summary="Generate text as Server-Sent Events, one per token (TGI format)",
             openapi_extra=json_body(GenerateRequest))
async def generate_stream(request: Request) -> Response:
    return await sse(request, parse_json(await request.body(), GenerateRequest))


@router.post("/", summary="TGI compatibility route: a list of one response, or SSE when `stream` is true",
             openapi_extra=json_body(GenerateRequest))
async def compat(request: Request) -> Response:
    req = parse_json(await request.body(), GenerateRequest)
    if req.stream:
        return await sse(request, req)
    try:
        return Response(orjson.dumps([await generate_once(request, req)]), media_type=JSON)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
