"""OpenAI-compatible /v1/completions (what the `openai` client calls); what it shares with /v1/chat/completions is in
routes/openai_shapes.py and routes/sse.py.

OpenAI semantics: the stop sequence is left out of the text (the engine does it: include_stop_sequence=False);
log-probabilities are the model's own (raw_logprobs); each choice of `n` (or `best_of`) is its own engine sequence
with its own seed (service.schemas.openai.choice_seed); streams end with `data: [DONE]`.
"""

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
from inferline.server.schemas.openai import CompletionRequest, Prompt

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

# ------------------------------------------------------------------------------------------------ /v1/completions
def completion_logprobs(events: list[TokenEvent], offset: int,
                        prefill: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], int]:
    """OpenAI's completions logprobs for these tokens, `offset` characters into the choice's text: {tokens,
    token_logprobs, top_logprobs (the top-k by token text, the chosen token always among them, as OpenAI does),
    text_offset}. `prefill` (echo) puts the prompt's tokens first, with their logprobs (the first is null) and no
    alternatives. Returns the block and the offset after it."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float | None] | None] = []
    offsets: list[int] = []
    for p in prefill or []:
        tokens.append(p["text"])
        values.append(finite(p["logprob"]))
        tops.append(None)
        offsets.append(offset)
        offset += len(p["text"])
    for e in events:
        name = token_name(e)
        tokens.append(name)
        values.append(finite(e.logprob))
        top = {t["text"]: finite(t["logprob"]) for t in e.top_logprobs or []}
        top.setdefault(name, finite(e.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += 0 if e.special else len(name)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def echo_text(prompt: Prompt, prefill: list[dict[str, Any]]) -> str:
    """The prompt as echoed: as given, or for token ids the text of its tokens."""
    return prompt if isinstance(prompt, str) else "".join(p["text"] for p in prefill)


COMPLETION_NAMES = {"inputs": "prompt", "max_new_tokens": "max_tokens"}


DOCS = dict(
    summary="Text completion (OpenAI format); SSE chunks ending in [DONE] when `stream`",
    openapi_extra=json_body(CompletionRequest, {"model": "gpt2", "prompt": "The module", "max_tokens": 2}),
    **doc(wire.Completion, {"id": "cmpl-0a1b2c3d4e5f", "object": "text_completion", "created": 1767225600,
                            "model": "gpt2", "choices": [{"index": 0, "text": " is a", "logprobs": None,
                                                          "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}},
          family="openai", stream_event=wire.Completion, stream_example=(
              'data: {"id":"cmpl-0a1b2c3d4e5f","object":"text_completion","created":1767225600,"model":"gpt2",'
              '"choices":[{"index":0,"text":" is","logprobs":null,"finish_reason":null}]}\n\n'
              'data: [DONE]\n\n')))


async def completions(gw: Gateway, request: Request) -> Response:
    req = parse_json(await request.body(), CompletionRequest)
    ask_priority(req.priority)
    d = gw.dispatcher
    d.spec(req.model)   # 404 names the served models
    base = request_id()
    prompts, k = req.prompts, req.sequences_per_prompt
    jobs = [(p, j) for p in range(len(prompts)) for j in range(k)]
    ids = [base] if len(jobs) == 1 else [f"{base}-{p}-{j}" for p, j in jobs]
    head = {"id": f"cmpl-{base}", "object": "text_completion", "created": int(time.time()), "model": req.model}
    streams = [token_events(d, req.model, req.to_params(prompts[p], j), rid)
               for (p, j), rid in zip(jobs, ids, strict=True)]
    try:
        if req.stream:
            return await stream_completions(req, head, await start_all(streams))
        results = await unless_client_leaves(request.receive, collect_all(streams))
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    except InferlineError as exc:
        raise renamed(exc, COMPLETION_NAMES) from None
    return json_answer(completion_body(req, head, results))


def completion_body(req: CompletionRequest, head: dict[str, Any], results: list[Generation]) -> wire.Completion:
    """The whole answer: `results` are the sequences_per_prompt generations of each prompt in turn; with best_of,
    the n best of each prompt's are kept."""
    prompts, k = req.prompts, req.sequences_per_prompt
    choices = []
    for p, prompt in enumerate(prompts):
        gens = results[p * k:(p + 1) * k]
        if k > req.n:   # best_of: the n with the highest logprob per token, best first (OpenAI)
            gens = sorted(gens, key=lambda g: g.mean_logprob, reverse=True)[:req.n]
        choices += [completion_choice(req, prompt, g, p * req.n + c) for c, g in enumerate(gens)]
    prompt_tokens = sum(results[p * k].prompt_tokens for p in range(len(prompts)))   # once per prompt, as OpenAI
    return build(wire.Completion, {**head, "choices": choices,
                                   "usage": usage(prompt_tokens, sum(r.generated_tokens for r in results))})


def completion_choice(req: CompletionRequest, prompt: Prompt, gen: Generation, index: int) -> dict[str, Any]:
    """The fields of one wire.CompletionChoice."""
    echoed = echo_text(prompt, gen.prefill) if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        logprobs, _ = completion_logprobs(gen.events, 0, gen.prefill if req.echo else None)
    return {"index": index, "text": echoed + gen.text, "logprobs": logprobs,
            "finish_reason": FINISH.get(gen.finish_reason, gen.finish_reason)}


async def stream_completions(req: CompletionRequest, head: dict[str, Any],
                             streams: list[AsyncIterator[TokenEvent]]) -> Response:
    prompts, n = req.prompts, req.n   # streaming has no best_of > n (the schema refuses it)
    offsets = [0] * len(streams)

    def chunk_of(index: int, event: TokenEvent) -> dict[str, Any]:
        text, prefill = event.text, None
        if event.index == 0 and req.echo:
            prefill = event.prefill or []
            text = echo_text(prompts[index // n], prefill) + text
        logprobs = None
        if req.logprobs is not None:
            logprobs, offsets[index] = completion_logprobs([event], offsets[index], prefill)
        finish = FINISH.get(event.finish_reason, event.finish_reason) if event.finish_reason else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    async def lines() -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        async for index, item in merge(streams):
            if isinstance(item, InferlineError):
                yield error_chunk(item, COMPLETION_NAMES)
                continue
            completion_tokens += 1
            if item.index == 0 and index % n == 0:
                prompt_tokens += item.prompt_tokens
            # The engine leaves special tokens (EOS) and held-back stop text out of `text` on OpenAI requests
            # (include_stop_sequence=False): the chunks add up to the completion as they are.
            yield sse(build(wire.Completion, {**head, "choices": [chunk_of(index, item)]}))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(build(wire.Completion, {**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}))
        yield DONE

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)
