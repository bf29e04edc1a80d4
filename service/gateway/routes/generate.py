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
from service.gateway.generation import Generation, collect, first_then_rest, token_events, token_of
from service.gateway.openapi import SSE, doc
from service.gateway.routes.common import JSON, dispatcher, json_body, parse_json, request_id
from service.schemas import responses as wire
from service.schemas.tgi import GenerateRequest

router = APIRouter(tags=["text generation (TGI)"])
TASK = "generate"   # the deployment these routes serve is the one configured with task = "generate"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
REQUEST = {"inputs": "The module", "parameters": {"max_new_tokens": 2, "details": True}}
ANSWER = {"generated_text": " is a", "details": {"finish_reason": "length", "generated_tokens": 2, "seed": None,
                                                  "prefill": [], "tokens": [
    {"id": 318, "text": " is", "logprob": -1.2, "special": False},
    {"id": 257, "text": " a", "logprob": -0.9, "special": False}]}}
EVENTS = ('data:{"index":0,"token":{"id":318,"text":" is","logprob":-1.2,"special":false},"generated_text":null,'
          '"details":null}\n\n'
          'data:{"index":1,"token":{"id":257,"text":" a","logprob":-0.9,"special":false},"generated_text":" is a",'
          '"details":{"finish_reason":"length","generated_tokens":2,"seed":null}}\n\n')


def response_body(req: GenerateRequest, gen: Generation) -> dict[str, Any]:
    text = (req.inputs + gen.text) if req.parameters.return_full_text else gen.text
    body: dict[str, Any] = {"generated_text": text}
    if req.parameters.details:
        body["details"] = {"finish_reason": gen.finish_reason, "generated_tokens": gen.generated_tokens,
                           "seed": gen.seed, "prefill": gen.prefill, "tokens": gen.tokens}
    return body


async def generate_once(request: Request, req: GenerateRequest) -> dict[str, Any]:
    d = dispatcher(request)
    events = token_events(d, d.task(TASK).name, req.parameters.to_params(req.inputs), request_id(request))
    return response_body(req, await collect(events))


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


@router.post("/generate", summary="Generate text (TGI format)", openapi_extra=json_body(GenerateRequest, REQUEST),
             **doc(wire.Generation, ANSWER))
async def generate(request: Request) -> Response:
    req = parse_json(await request.body(), GenerateRequest)
    return Response(orjson.dumps(await generate_once(request, req)), media_type=JSON)


@router.post("/generate_stream", summary="Generate text as Server-Sent Events, one per token (TGI format)",
             openapi_extra=json_body(GenerateRequest, REQUEST),
             **doc(None, EVENTS, media=SSE, schema={"contentMediaType": SSE, "description": (
                 "each `data:` is a StreamEvent (components/schemas); an error mid-stream is a StreamError")},
                   description="Server-Sent Events, one per token; no [DONE] line"))
async def generate_stream(request: Request) -> Response:
    return await sse(request, parse_json(await request.body(), GenerateRequest))


@router.post("/", summary="TGI compatibility route: a list of one response, or SSE when `stream` is true",
             openapi_extra=json_body(GenerateRequest, {**REQUEST, "stream": False}),
             **doc(list[wire.Generation], [ANSWER], stream_example=EVENTS))
async def compat(request: Request) -> Response:
    req = parse_json(await request.body(), GenerateRequest)
    if req.stream:
        return await sse(request, req)
    return Response(orjson.dumps([await generate_once(request, req)]), media_type=JSON)
