"""Token streams from a generation worker, shared by the TGI and OpenAI routes: parse each token reply,
skip indexes already seen (a request restarted on another replica repeats them), collect the whole
answer, and tell the workers when the client leaves, mid-stream or while a whole answer is being collected."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from inferline.server.errors import InferlineError
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.generation.params import reproducible
from inferline.server.protocol import OP_GENERATE, TokenEvent

_cancelling: set[asyncio.Task[None]] = set()
T = TypeVar("T")
Receive = Callable[[], Awaitable[Any]]   # an ASGI receive: the HTTP connection's next message


class ClientGone(Exception):
    """The client closed the connection before its answer was ready; nobody reads a response any more."""


@dataclass
class Generation:
    """A finished generation: its token events in order, and what the last (and first) of them said."""

    events: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    seed: int | None = None
    prompt_tokens: int = 0
    prefill: list[dict[str, Any]] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.events)

    @property
    def tokens(self) -> list[dict[str, Any]]:
        """TGI's details.tokens."""
        return [token_of(e) for e in self.events]

    @property
    def mean_logprob(self) -> float:
        """Per generated token: how OpenAI's best_of ranks choices."""
        return sum(e.logprob for e in self.events) / max(len(self.events), 1)


def token_of(event: TokenEvent) -> dict[str, Any]:
    """TGI's token object (the fields of a wire.Token). A logprob that is not finite is written as null (TGI's
    client takes it)."""
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}


async def token_events(d: Dispatcher, model: str, params: dict[str, Any],
                       rid: str) -> AsyncGenerator[TokenEvent, None]:
    """The token events of one request in order, each once; the last has `finish_reason`. Errors before the
    first token raise as InferlineErrors (so routes can still answer with a status). If the consumer stops
    early (client gone), the workers are told to drop the sequence.

    With the deployment's response cache on, a reproducible request (greedy, or seeded: generation/params.py) is
    looked up first under the hash of `params`, which hold everything that changes its tokens (the prompt or
    messages and every sampling field; not the request id, stream flag, priority or how the route renders the
    answer). A hit replays the kept events at once, without queueing: a streaming request gets the same events,
    in one burst. A miss keeps its events once the last arrives, before it is handed on (so the next request finds
    them); a failed or abandoned generation is not kept."""
    rid = d.new_request_id(rid)   # a client reusing one x-request-id must not share a reply waiter
    spec = d.spec(model)
    kept: list[TokenEvent] | None = None
    key: tuple[str, str] | None = None
    if spec.cache is not None and reproducible(params):
        hit, key = await d.look_up(spec, OP_GENERATE, orjson.dumps(params, option=orjson.OPT_SORT_KEYS))
        if hit is not None:
            for event in TokenEvent.decode_all(hit):
                yield dataclasses.replace(event, request_id=rid)
            return
        kept = [] if key is not None else None
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
            if kept is not None:
                kept.append(event)
            if finished:
                d.metrics.prompt_tokens.labels(model).inc(event.prompt_tokens)
                if expected > 1:
                    d.metrics.tpot.labels(model).observe((last - first) / (expected - 1))
                if kept is not None and key is not None:
                    await d.keep(spec, key, TokenEvent.encode_all(kept), reply.version)
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
        result.events.append(event)
        result.prompt_tokens = event.prompt_tokens
        result.seed = event.seed
        if event.prefill is not None:
            result.prefill = event.prefill
        if event.finish_reason is not None:
            result.finish_reason = event.finish_reason
            result.text = event.generated_text or ""
    return result


async def merge(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent | InferlineError]]:
    """Several token streams (the choices of one OpenAI request) as one, in arrival order: (stream index, event), or
    (stream index, error) for a stream that failed after its first event; the other streams go on. Leaving early
    cancels the rest (each tells its workers to drop its sequence)."""
    merged: asyncio.Queue[tuple[int, TokenEvent | InferlineError | None]] = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                await merged.put((index, event))
        except InferlineError as exc:
            await merged.put((index, exc))
        finally:
            await merged.put((index, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(pumps)
    try:
        while open_streams:
            index, item = await merged.get()
            if item is None:
                open_streams -= 1
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def collect_all(streams: list[AsyncGenerator[TokenEvent, None]]) -> list[Generation]:
    """Every stream to its end, concurrently. If one fails, the others are closed (their workers drop them) and the
    first error is raised."""
    results = await asyncio.gather(*[collect(s) for s in streams], return_exceptions=True)
    return [r for r in await _all_or_close(streams, results) if isinstance(r, Generation)]


async def start_all(streams: list[AsyncGenerator[TokenEvent, None]]) -> list[AsyncIterator[TokenEvent]]:
    """first_then_rest for several streams: every first event is in before a response starts, so a bad request is
    still a plain 4xx; if one fails, the others are closed and the first error is raised."""
    started = await asyncio.gather(*[first_then_rest(s) for s in streams], return_exceptions=True)
    return [s for s in await _all_or_close(streams, started) if not isinstance(s, BaseException)]


async def _all_or_close(streams: list[AsyncGenerator[TokenEvent, None]], results: list[Any]) -> list[Any]:
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
        raise failed[0]
    return results


async def first_then_rest(events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """Wait for the first event before a streaming response starts, so an error can still be a 4xx/5xx."""
    first = await events.__anext__()

    async def chained() -> AsyncIterator[TokenEvent]:
        yield first
        async for event in events:
            yield event

    return chained()


async def unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` (whose request body is already read) while watching the connection. If the client disconnects
    first, cancel `work` - its token streams then tell the workers to drop their sequences, freeing them within a
    step, as a closed stream does - and raise ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():   # the client left, or this handler itself was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone()
    return task.result()
