"""OpenAI-compatible /v1/chat/completions. The gateway has no tokenizer: the generation worker renders `messages`
with the model's chat template (service.model.render_chat: the deployment's, the class's, the tokenizer's, or a
plain "role: content" default). Each of `n` choices is its own engine sequence with its own seed; streams send, per
choice, a first chunk with the role, then content deltas, then `data: [DONE]`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from inferline.server.errors import InferlineError
from inferline.server.gateway.errors import CLIENT_GONE
from inferline.server.gateway.generation import (
    ClientGone,
    Generation,
    collect_all,
    merge,
    start_all,
    token_events,
    unless_client_leaves,
)
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.record import request_id
from inferline.server.gateway.routes.common import ask_priority, build, json_answer, json_body, parse_json
from inferline.server.gateway.routes.openai_shapes import FINISH, error_chunk, finite, renamed, token_name, usage
from inferline.server.gateway.routes.sse import DONE, SSE_HEADERS, sse
from inferline.server.protocol import TokenEvent
from inferline.server.schemas import responses as wire
from inferline.server.schemas.openai import ChatCompletionRequest

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway


def logprob_entry(event: TokenEvent) -> dict[str, Any]:
    """OpenAI's chat logprobs entry for one token: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}.
    `bytes` are the UTF-8 bytes of the token's text (a token holding part of a character shows U+FFFD there)."""
    name = token_name(event)
    return {"token": name, "logprob": finite(event.logprob), "bytes": list(name.encode()),
            "top_logprobs": [{"token": t["text"], "logprob": finite(t["logprob"]), "bytes": list(t["text"].encode())}
                             for t in event.top_logprobs or []]}


def logprobs_of(req: ChatCompletionRequest, events: list[TokenEvent]) -> dict[str, Any] | None:
    return {"content": [logprob_entry(e) for e in events], "refusal": None} if req.logprobs else None


DOCS = dict(summary="Chat completion (OpenAI format); SSE chunks ending in [DONE] when `stream`",
            openapi_extra=json_body(ChatCompletionRequest, {"model": "gpt2", "max_tokens": 2, "messages": [
                 {"role": "user", "content": "The module"}]}),
             **doc(wire.ChatCompletion, {"id": "chatcmpl-0a1b2c3d4e5f", "object": "chat.completion",
                                         "created": 1767225600, "model": "gpt2", "choices": [{
                                             "index": 0, "message": {"role": "assistant", "content": " is a",
                                                                     "refusal": None},
                                             "logprobs": None, "finish_reason": "length"}],
                                         "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}},
                   family="openai", stream_event=wire.ChatChunk, stream_example=(
                       'data: {"id":"chatcmpl-0a1b2c3d4e5f","object":"chat.completion.chunk","created":1767225600,'
                       '"model":"gpt2","choices":[{"index":0,"delta":{"content":" is"},"logprobs":null,'
                       '"finish_reason":null}]}\n\ndata: [DONE]\n\n')))


async def chat_completions(gw: Gateway, request: Request) -> Response:
    req = parse_json(await request.body(), ChatCompletionRequest)
    ask_priority(req.priority)
    d = gw.dispatcher
    d.spec(req.model)   # 404 names the served models
    base = request_id()
    ids = [base] if req.n == 1 else [f"{base}-{i}" for i in range(req.n)]
    names = {"inputs": "messages", "max_new_tokens": req.max_tokens_param}
    head: dict[str, Any] = {"id": f"chatcmpl-{base}", "object": "chat.completion", "created": int(time.time()),
                            "model": req.model, "system_fingerprint": None}
    streams = [token_events(d, req.model, req.to_params(i), rid) for i, rid in enumerate(ids)]
    try:
        if req.stream:
            return stream_chat(req, {**head, "object": "chat.completion.chunk"}, names, await start_all(streams))
        results = await unless_client_leaves(request.receive, collect_all(streams))
    except ClientGone:   # its sequences were dropped
        return Response(status_code=CLIENT_GONE)
    except InferlineError as exc:
        raise renamed(exc, names) from None
    return json_answer(chat_body(req, head, results))


def chat_body(req: ChatCompletionRequest, head: dict[str, Any], results: list[Generation]) -> wire.ChatCompletion:
    """The whole answer: one choice per generation, in order."""
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": logprobs_of(req, r.events), "finish_reason": FINISH.get(r.finish_reason, r.finish_reason)}
               for i, r in enumerate(results)]
    # The choices share one prompt: counted once, as OpenAI does.
    return build(wire.ChatCompletion, {**head, "choices": choices, "usage": usage(
        results[0].prompt_tokens, sum(r.generated_tokens for r in results))})


def stream_chat(req: ChatCompletionRequest, head: dict[str, Any], names: dict[str, str],
                streams: list[AsyncIterator[TokenEvent]]) -> Response:
    with_usage = req.stream_options is not None and req.stream_options.include_usage
    if with_usage:   # OpenAI: every chunk has `usage`, null but in the last
        head = {**head, "usage": None}

    def chunk(index: int, delta: dict[str, Any], event: TokenEvent | None = None) -> bytes:
        finish = event.finish_reason if event is not None else None
        return sse(build(wire.ChatChunk, {**head, "choices": [{
            "index": index, "delta": delta,
            "logprobs": logprobs_of(req, [event]) if event is not None else None,
            "finish_reason": FINISH.get(finish, finish) if finish else None}]}))

    async def lines() -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        async for index, item in merge(streams):
            if isinstance(item, InferlineError):
                yield error_chunk(item, names)
                continue
            if item.index == 0:
                prompt_tokens = item.prompt_tokens
                yield chunk(index, {"role": "assistant", "content": ""})
            completion_tokens += 1
            # Special tokens (EOS) and held-back stop text are already left out of `text` (include_stop_sequence
            # False): the deltas add up to the message.
            yield chunk(index, {"content": item.text} if item.text else {}, item)
        if with_usage:
            yield sse(build(wire.ChatChunk, {**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}))
        yield DONE

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)
