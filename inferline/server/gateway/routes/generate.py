"""TGI-compatible text generation: /generate, /generate_stream, and / (what the text-generation client
calls), and TGI's /info, /tokenize and /health, all for the deployment bound to task "generate". Errors mid-stream
are SSE events {"error", "error_type"}; no [DONE] line on these routes.

Log-probabilities (details.tokens[*].logprob, top_n_tokens, the prefill's) and their -inf: a token the warpers
excluded has logprob -inf, which JSON cannot carry; it is written as null (routes/common.encode), which TGI's
client takes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from inferline import server
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.errors import InferlineError, Unavailable
from inferline.server.gateway.errors import CLIENT_GONE
from inferline.server.gateway.errors import stream_event as stream_error
from inferline.server.gateway.generation import (
    ClientGone,
    Generation,
    collect,
    first_then_rest,
    token_events,
    token_of,
    unless_client_leaves,
)
from inferline.server.gateway.openapi import SSE, doc, error_responses
from inferline.server.gateway.record import request_id
from inferline.server.gateway.routes.common import JSON, build, encode, json_answer, json_body, parse_json
from inferline.server.gateway.routes.sse import SSE_HEADERS
from inferline.server.generation.params import MAX_STOP
from inferline.server.protocol import OP_TOKENIZE, ModelInfo, TokenEvent
from inferline.server.schemas import responses as wire
from inferline.server.schemas.tgi import GenerateRequest, TokenizeRequest

if TYPE_CHECKING:
    from inferline.server.config import ModelSpec
    from inferline.server.gateway.core import Gateway

TASK = "generate"   # the deployment these routes serve is the one configured with task = "generate"
REQUEST = {"inputs": "The module", "parameters": {"max_new_tokens": 2, "details": True}}
ANSWER = {"generated_text": " is a", "details": {"finish_reason": "length", "generated_tokens": 2, "seed": None,
                                                  "prefill": [], "tokens": [
    {"id": 318, "text": " is", "logprob": -1.2, "special": False},
    {"id": 257, "text": " a", "logprob": -0.9, "special": False}]}}
EVENTS = ('data:{"index":0,"token":{"id":318,"text":" is","logprob":-1.2,"special":false},"generated_text":null,'
          '"details":null}\n\n'
          'data:{"index":1,"token":{"id":257,"text":" a","logprob":-0.9,"special":false},"generated_text":" is a",'
          '"details":{"finish_reason":"length","generated_tokens":2,"seed":null}}\n\n')


def response_body(req: GenerateRequest, gen: Generation) -> wire.Generation:
    """/generate's answer (one element of /'s list): `details` only when asked, its `top_tokens` only with
    top_n_tokens."""
    text = (req.inputs + gen.text) if req.parameters.return_full_text else gen.text
    body: dict[str, Any] = {"generated_text": text}
    if req.parameters.details:
        details = {"finish_reason": gen.finish_reason, "generated_tokens": gen.generated_tokens,
                   "seed": gen.seed, "prefill": gen.prefill, "tokens": gen.tokens}
        if req.parameters.top_n_tokens:   # TGI: one list per generated token, best first
            details["top_tokens"] = [e.top_logprobs or [] for e in gen.events]
        body["details"] = details
    return build(wire.Generation, body)


def stream_event(req: GenerateRequest, event: TokenEvent) -> wire.StreamEvent:
    """One event of /generate_stream (per token: validated and serialised ~2.5 µs, routes/common.build); the last
    carries the whole text and the details."""
    last = event.finish_reason is not None
    text = event.generated_text if last else None
    if last and req.parameters.return_full_text:
        text = req.inputs + (text or "")
    return build(wire.StreamEvent, {
        "index": event.index, "token": token_of(event), "top_tokens": event.top_logprobs, "generated_text": text,
        "details": {"finish_reason": event.finish_reason, "generated_tokens": event.index + 1,
                    "seed": event.seed} if last else None})


def event_line(event: wire.StreamEvent | wire.StreamError) -> bytes:
    """TGI's framing: `data:` without a space."""
    return b"data:" + encode(event) + b"\n\n"


async def generate_once(gw: Gateway, request: Request, req: GenerateRequest) -> wire.Generation:
    """The whole answer. Raises ClientGone (the sequence is dropped) when the client leaves before it is ready."""
    d = gw.dispatcher
    events = token_events(d, d.task(TASK).name, req.parameters.to_params(req.inputs), request_id())
    return response_body(req, await unless_client_leaves(request.receive, collect(events)))


async def sse(gw: Gateway, req: GenerateRequest) -> Response:
    d = gw.dispatcher
    events = await first_then_rest(token_events(d, d.task(TASK).name, req.parameters.to_params(req.inputs),
                                                request_id()))

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event_line(stream_event(req, event))
        except InferlineError as exc:
            yield event_line(build(wire.StreamError, stream_error(exc)))

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


GENERATE_DOCS = dict(summary="Generate text (TGI format)", openapi_extra=json_body(GenerateRequest, REQUEST),
                     **doc(wire.Generation, ANSWER))
STREAM_DOCS = dict(summary="Generate text as Server-Sent Events, one per token (TGI format)",
                   openapi_extra=json_body(GenerateRequest, REQUEST),
                   **doc(None, EVENTS, media=SSE, schema={"contentMediaType": SSE, "description": (
                       "each `data:` is a StreamEvent (components/schemas); an error mid-stream is a StreamError")},
                         description="Server-Sent Events, one per token; no [DONE] line"))
COMPAT_DOCS = dict(summary="TGI compatibility route: a list of one response, or SSE when `stream` is true",
                   openapi_extra=json_body(GenerateRequest, {**REQUEST, "stream": False}),
                   **doc(list[wire.Generation], [ANSWER], stream_example=EVENTS))


async def generate(gw: Gateway, request: Request) -> Response:
    req = parse_json(await request.body(), GenerateRequest)
    try:
        return json_answer(await generate_once(gw, request, req))
    except ClientGone:
        return Response(status_code=CLIENT_GONE)


async def generate_stream(gw: Gateway, request: Request) -> Response:
    return await sse(gw, parse_json(await request.body(), GenerateRequest))


async def compat(gw: Gateway, request: Request) -> Response:
    req = parse_json(await request.body(), GenerateRequest)
    if req.stream:
        return await sse(gw, req)
    try:
        return Response(b"[" + encode(await generate_once(gw, request, req)) + b"]", media_type=JSON)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)


INFO_DOCS = dict(summary="The generate deployment's model and limits (TGI's /info)",
                 **doc(wire.TGIInfo, {"model_id": "gpt2", "model_sha": "1", "model_version": "1",
                                      "max_input_tokens": 255, "max_total_tokens": 256, "max_batch_size": 16,
                                      "max_concurrent_requests": 2048, "max_stop_sequences": 4, "router": "inferline",
                                      "version": "0.1.0"}, errors=(401, 403, 404, 429, 503)))
TOKENIZE_DOCS = dict(summary="Tokenize a text with the model's tokenizer (TGI's /tokenize)",
                     openapi_extra=json_body(TokenizeRequest, {"inputs": "The module"}),
                     **doc(list[wire.TokenSpan], [{"id": 464, "text": "The", "start": 0, "stop": 3},
                                                  {"id": 8265, "text": " module", "start": 3, "stop": 10}]))
HEALTH_DOCS = dict(summary="200 while the generate deployment has a live worker, else 503 (TGI's /health)",
                   response_class=Response, responses={200: {"description": "A live worker (empty body)"},
                                                       **error_responses("tgi", (401, 403, 404, 429, 503))})


async def info(gw: Gateway, request: Request) -> Response:
    spec = gw.dispatcher.task(TASK)
    try:
        status = await gw.registry.status(spec.name)
    except BROKER_ERRORS as exc:
        raise Unavailable(f"the registry is unreachable: {type(exc).__name__}") from None
    if status.info is None:
        raise Unavailable(f"no worker of model {spec.name} has started yet")
    return json_answer(info_body(spec, status.info, status.devices))


def info_body(spec: ModelSpec, model: ModelInfo, devices: list[str]) -> wire.TGIInfo:
    """TGI's /info for the generate deployment `spec`, from what its workers published and the devices they run on."""
    return build(wire.TGIInfo, {
        "model_id": spec.name, "model_sha": model.version, "model_version": model.version, "model_dtype": None,
        "model_device_type": ",".join(sorted({dev.split(":")[0] for dev in devices})) or None,
        "model_pipeline_tag": "text-generation",
        # TGI's admission limit: past it requests are refused as overloaded; here the deployment's queue_cap.
        "max_concurrent_requests": spec.queue_cap, "max_best_of": 1, "max_stop_sequences": MAX_STOP,
        "max_input_tokens": model.max_input_tokens, "max_total_tokens": model.context_length,
        "max_batch_size": model.max_batch_size, "max_batch_prefill_tokens": model.max_prefill_tokens,
        "max_client_batch_size": 1, "router": "inferline", "version": server.__version__, "sha": None,
        "docker_label": None})


async def tokenize(gw: Gateway, request: Request) -> Response:
    req = parse_json(await request.body(), TokenizeRequest)
    d = gw.dispatcher
    reply = await d.call(d.task(TASK).name, OP_TOKENIZE, {"inputs": req.inputs}, request_id=request_id())
    return Response(reply.body, media_type=JSON)   # [{"id", "text", "start", "stop"}], the worker's TokenSpans


async def health(gw: Gateway, request: Request) -> Response:
    name = gw.dispatcher.task(TASK).name
    try:
        live = (await gw.registry.status(name)).live_replicas
    except BROKER_ERRORS as exc:
        raise Unavailable(f"the registry is unreachable: {type(exc).__name__}") from None
    if not live:
        raise Unavailable(f"model {name} has no live worker")
    return Response(status_code=200)
