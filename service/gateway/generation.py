"""Token streams from a generation worker, shared by the TGI and OpenAI routes: parse each token reply,
skip indexes already seen (a request restarted on another replica repeats them), collect the whole
answer, and tell the workers when the client leaves mid-stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service.gateway.dispatch import Dispatcher
from service.protocol import OP_GENERATE, TokenEvent

_cancelling: set[asyncio.Task[None]] = set()


@dataclass
class Generation:
    """A finished generation."""

    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "length"
    seed: int | None = None
    prompt_tokens: int = 0
    prefill: list[dict[str, Any]] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)


def token_of(event: TokenEvent) -> dict[str, Any]:
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}


async def token_events(d: Dispatcher, model: str, params: dict[str, Any], rid: str) -> AsyncIterator[TokenEvent]:
    """The token events of one request in order, each once; the last has `finish_reason`. Errors before the
    first token raise as InferlineErrors (so routes can still answer with a status). If the consumer stops
    early (client gone), the workers are told to drop the sequence."""
    rid = d.new_request_id(rid)   # a client reusing one x-request-id must not share a reply waiter
    expected = 0
    finished = False
    started = time.perf_counter()
    first = last = 0.0
    try:
        async for reply in d.stream(model, OP_GENERATE, params, rid):
            event = TokenEvent.decode(reply.body)
            if event.index < expected:
                continue
            last = time.perf_counter()
            if expected == 0:
                first = last
                d.metrics.ttft.labels(model).observe(first - started)
            expected = event.index + 1
            finished = event.finish_reason is not None
            if finished:
                d.metrics.prompt_tokens.labels(model).inc(event.prompt_tokens)
                if expected > 1:
                    d.metrics.tpot.labels(model).observe((last - first) / (expected - 1))
            yield event
    finally:
        if expected:   # the tokens the caller was sent, whether or not it stayed to the end
            d.metrics.generated_tokens.labels(model).inc(expected)
        if not finished:   # we may be inside a cancellation: fire and forget, keeping a reference
            task = asyncio.get_running_loop().create_task(d.cancel(model, rid))
            _cancelling.add(task)
            task.add_done_callback(_cancelling.discard)


async def collect(events: AsyncIterator[TokenEvent]) -> Generation:
    result = Generation()
    async for event in events:
        result.tokens.append(token_of(event))
        result.prompt_tokens = event.prompt_tokens
        result.seed = event.seed
        if event.prefill is not None:
            result.prefill = event.prefill
        if event.finish_reason is not None:
            result.finish_reason = event.finish_reason
            result.text = event.generated_text or ""
    return result


async def first_then_rest(events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """Wait for the first event before a streaming response starts, so an error can still be a 4xx/5xx."""
    first = await events.__anext__()

    async def chained() -> AsyncIterator[TokenEvent]:
        yield first
        async for event in events:
            yield event

    return chained()
