"""The request builder both clients share. A route's method builds a `Call` (what to send, which answers are
results, how to read them) or a `StreamCall` (what to send, how to read each Server-Sent Event); the sync and async
clients only differ in how they send it. `endpoint` and `stream_endpoint` turn one builder into a method of both,
typed: `client.forecast(...) -> Forecast`, `await aclient.forecast(...) -> Forecast`. Retry decisions and the SSE
parser live here too, so the two transports hold no logic of their own beyond send, sleep and read."""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import httpx
import orjson

from inferline.client.errors import APIError, error_from, error_from_data

T = TypeVar("T")
P = ParamSpec("P")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Answer:
    """A response as the parsers see it."""

    status: int
    headers: httpx.Headers
    body: bytes
    request_id: str

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Request:
    """What goes on the wire. `json` is encoded with orjson (numpy arrays allowed); `content` is sent as is."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id: str = field(default_factory=new_request_id)   # x-request-id, the same on every try

    def build(self, http: httpx.Client | httpx.AsyncClient, defaults: Mapping[str, str]) -> httpx.Request:
        headers = {**defaults, "x-request-id": self.request_id, **self.headers}
        content = self.content
        if self.json is not None:
            content = orjson.dumps(self.json, option=orjson.OPT_SERIALIZE_NUMPY)
            headers.setdefault("content-type", "application/json")
        return http.build_request(self.method, self.path, content=content, params=self.params, headers=headers)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how its answer becomes a result. Statuses in `results` are answers; others raise."""

    request: Request
    parse: Callable[[Answer], T]
    results: frozenset[int] = frozenset({200})


@dataclass(frozen=True)
class StreamCall(Generic[T]):
    """One streaming request: each SSE `data:` payload (JSON) becomes an item; `done` ends the stream (OpenAI's
    "[DONE]"); a payload with an "error" key raises that error mid-stream."""

    request: Request
    event: Callable[[Any, str], T]    # (decoded payload, request id) -> item
    done: str | None = None


@dataclass(frozen=True)
class Retries:
    """When to try again: on 429 and 503 (and a connection that could not be made), at most `max_retries` times,
    waiting what Retry-After says or else an exponential backoff, plus jitter so that many clients do not come back
    at once. Never on another 4xx, and never on a 5xx the server marked `x-should-retry: false`."""

    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter: float = 0.25       # up to this fraction of the wait is added at random

    def delay(self, attempt: int, error: APIError | None) -> float | None:
        """Seconds to wait before try number attempt + 1, or None to give up. error None: no connection."""
        if attempt >= self.max_retries:
            return None
        if error is not None:
            headers = error.headers
            if headers.get("x-should-retry") == "false":
                return None
            if error.status not in (429, 503) and headers.get("x-should-retry") != "true":
                return None
            if error.retry_after is not None:
                return min(self.max_backoff_s, error.retry_after) * (1 + random.uniform(0, self.jitter))
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        return wait * (1 - self.jitter + random.uniform(0, self.jitter))


def fail(answer: Answer) -> APIError:
    """The exception for an error answer."""
    return error_from(answer.status, answer.headers, answer.body, answer.request_id)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events stream (one per event; multi-line data joined with \\n)."""
    buf: list[str] = []
    for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
        elif line.startswith("data:"):
            buf.append(line[5:].lstrip(" "))
    if buf:
        yield "\n".join(buf)


async def asse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """sse_data for an async line source (the same grammar)."""
    buf: list[str] = []
    async for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
        elif line.startswith("data:"):
            buf.append(line[5:].lstrip(" "))
    if buf:
        yield "\n".join(buf)


def stream_item(call: StreamCall[T], payload: str, headers: httpx.Headers) -> T | None:
    """One SSE payload as an item; None at the end marker; raises an error event as an APIError."""
    if call.done is not None and payload.strip() == call.done:
        return None
    data = orjson.loads(payload)
    if isinstance(data, dict) and "error" in data and data["error"]:
        err = data["error"]
        kind = err.get("code") if isinstance(err, dict) else data.get("error_type")
        status = {"validation": 422, "overloaded": 503, "timeout": 504, "not_found": 404}.get(str(kind), 500)
        raise error_from_data(status, headers, data, call.request.request_id)
    return call.event(data, call.request.request_id)


class SyncRunner:
    """What a synchronous client provides to its endpoints."""

    def _run(self, call: Call[T]) -> T:
        raise NotImplementedError

    def _stream(self, call: StreamCall[T]) -> Iterator[T]:
        raise NotImplementedError


class AsyncRunner:
    """What an asynchronous client provides to its endpoints."""

    async def _run(self, call: Call[T]) -> T:
        raise NotImplementedError

    def _stream(self, call: StreamCall[T]) -> AsyncIterator[T]:
        raise NotImplementedError


class endpoint(Generic[P, T]):   # noqa: N801 - used as a decorator
    """A builder `def name(self, ...) -> Call[T]` as a method of both clients: T from Client, Awaitable[T] from
    AsyncClient, with the builder's signature and docstring."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: None, owner: Any) -> endpoint[P, T]: ...
    @overload
    def __get__(self, obj: SyncRunner, owner: Any) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: AsyncRunner, owner: Any) -> Callable[P, Awaitable[T]]: ...

    def __get__(self, obj: Any, owner: Any) -> Any:
        if obj is None:
            return self
        build = self.build

        @functools.wraps(build)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return obj._run(build(obj, *args, **kwargs))

        return bound


class stream_endpoint(Generic[P, T]):   # noqa: N801 - used as a decorator
    """A builder `def name(self, ...) -> StreamCall[T]` as a method of both clients: Iterator[T] from Client,
    AsyncIterator[T] from AsyncClient. Retries happen before the first event only."""

    def __init__(self, build: Callable[Concatenate[Any, P], StreamCall[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: None, owner: Any) -> stream_endpoint[P, T]: ...
    @overload
    def __get__(self, obj: SyncRunner, owner: Any) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, obj: AsyncRunner, owner: Any) -> Callable[P, AsyncIterator[T]]: ...

    def __get__(self, obj: Any, owner: Any) -> Any:
        if obj is None:
            return self
        build = self.build

        @functools.wraps(build)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return obj._stream(build(obj, *args, **kwargs))

        return bound
