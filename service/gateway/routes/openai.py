"""OpenAI-compatible /v1/completions (what the `openai` client calls). A list of prompts runs as
concurrent requests; streams end with `data: [DONE]`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from service.errors import InferlineError
from service.gateway.errors import body_of
from service.gateway.generation import collect, first_then_rest, token_events
from service.gateway.openapi import doc
from service.gateway.routes.common import JSON, dispatcher, json_body, parse_json, request_id
from service.protocol import TokenEvent
from service.schemas import responses as wire
from service.schemas.openai import CompletionRequest

router = APIRouter(tags=["text generation (OpenAI)"])
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
# The worker names the fields it checks (prompt length against the context) as the engine calls them.
PARAMS = {"inputs": "prompt", "max_new_tokens": "max_tokens"}


def param_of(field: str | None) -> str | None:
    return PARAMS.get(field, field) if field is not None else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@router.post("/v1/completions", summary="Text completion (OpenAI format); SSE chunks ending in [DONE] when `stream`",
             openapi_extra=json_body(CompletionRequest, {"model": "gpt2", "prompt": "The module", "max_tokens": 2}),
             **doc(wire.Completion, {"id": "cmpl-0a1b2c3d4e5f", "object": "text_completion", "created": 1767225600,
                                     "model": "gpt2", "choices": [{"index": 0, "text": " is a", "logprobs": None,
                                                                   "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}},
                   family="openai", stream_event=wire.Completion, stream_example=(
                       'data: {"id":"cmpl-0a1b2c3d4e5f","object":"text_completion","created":1767225600,"model":"gpt2",'
                       '"choices":[{"index":0,"text":" is","logprobs":null,"finish_reason":null}]}\n\n'
                       'data: [DONE]\n\n')))
async def completions(request: Request) -> Response:
    req = parse_json(await request.body(), CompletionRequest)
    d = dispatcher(request)
    d.spec(req.model)   # 404 names the served models
    base = request_id(request)
    ids = [base] if len(req.prompts) == 1 else [f"{base}-{i}" for i in range(len(req.prompts))]
    head = {"id": f"cmpl-{base}", "object": "text_completion", "created": int(time.time()), "model": req.model}
    streams = [token_events(d, req.model, req.to_params(p), rid) for p, rid in zip(req.prompts, ids, strict=True)]
    try:
        if req.stream:
            return await stream(req, head, streams)
        results = await asyncio.gather(*[collect(s) for s in streams])
    except InferlineError as exc:
        exc.field = param_of(exc.field)
        raise
    choices = [{"index": i, "text": (req.prompts[i] if req.echo else "") + r.text, "logprobs": None,
                "finish_reason": FINISH[r.finish_reason]} for i, r in enumerate(results)]
    body = {**head, "choices": choices, "usage": usage(sum(r.prompt_tokens for r in results),
                                                        sum(r.generated_tokens for r in results))}
    return Response(orjson.dumps(body), media_type=JSON)


async def stream(req: CompletionRequest, head: dict[str, Any],
                 streams: list[AsyncIterator[TokenEvent]]) -> Response:
    # Start every prompt and wait for each first token, so a bad request is still a plain 4xx.
    started = await asyncio.gather(*[first_then_rest(s) for s in streams])
    merged: asyncio.Queue[tuple[int, TokenEvent | InferlineError | None]] = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                await merged.put((index, event))
        except InferlineError as exc:
            await merged.put((index, exc))
        finally:
            await merged.put((index, None))

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    async def lines() -> AsyncIterator[bytes]:
        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(started)]
        open_streams, prompt_tokens, completion_tokens = len(pumps), 0, 0
        try:
            if req.echo:
                yield chunk([{"index": i, "text": p, "logprobs": None, "finish_reason": None}
                             for i, p in enumerate(req.prompts)])
            while open_streams:
                index, item = await merged.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, InferlineError):
                    item.field = param_of(item.field)
                    yield b"data: " + orjson.dumps(body_of(item, "/v1/completions", "")) + b"\n\n"
                else:
                    completion_tokens += 1
                    prompt_tokens = prompt_tokens if item.index else prompt_tokens + item.prompt_tokens
                    finish = FINISH.get(item.finish_reason) if item.finish_reason else None
                    # The engine leaves special tokens (EOS) and held-back stop text out of `text` on OpenAI requests
                    # (include_stop_sequence=False): the chunks add up to the completion as they are.
                    text = item.text
                    yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": finish}])
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk([], usage=usage(prompt_tokens, completion_tokens))
            yield b"data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
