"""Client and AsyncClient: the same routes (api.API), sent with httpx. Each keeps one connection pool for its life
(close it, or use it as a context manager), sends the API key as a bearer token, gives every call an x-request-id
that stays the same on every try, and retries per calls.Retries. `map` runs one call over many inputs with bounded
concurrency and a progress bar, answers in input order."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

from inferline.client.admin import Admin, AsyncAdmin
from inferline.client.api import API
from inferline.client.calls import (
    Answer,
    AsyncRunner,
    Call,
    Request,
    Retries,
    StreamCall,
    SyncRunner,
    asse_data,
    fail,
    sse_data,
    stream_item,
)
from inferline.client.errors import APIConnectionError

T = TypeVar("T")
X = TypeVar("X")
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_RETRIES = Retries()
# A connection that could not be made sent nothing: safe to try again. Any later transport failure may have
# reached the server, so it is raised, not retried.
RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout)
PRIORITIES = ("high", "normal", "low")   # the x-priority values (the client needs only the core install: no server)


class Options:
    """What both clients take: url (default INFERLINE_URL, else http://127.0.0.1:8000), api_key (default
    INFERLINE_API_KEY), timeout in seconds for each try, retries (a Retries, or an int: how many), extra headers,
    and the priority of every request ("high" | "normal" | "low", sent as x-priority; None: the server's default,
    normal; the key's maximum clamps it and the answer's x-priority header says the one applied)."""

    def __init__(self, url: str | None, api_key: str | None, timeout: float, retries: Retries | int,
                 headers: Mapping[str, str] | None, priority: str | None = None) -> None:
        self.url = (url or os.environ.get("INFERLINE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("INFERLINE_API_KEY")
        self.headers = {"user-agent": "inferline-client", **(headers or {})}
        if key:
            self.headers["authorization"] = f"Bearer {key}"
        if priority is not None:
            if priority not in PRIORITIES:
                raise ValueError(f"priority must be one of {', '.join(PRIORITIES)} (given {priority!r})")
            self.headers["x-priority"] = priority
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.retries = retries if isinstance(retries, Retries) else Retries(max_retries=retries)


def answer_of(response: httpx.Response, request: Request) -> Answer:
    return Answer(response.status_code, response.headers, response.content,
                  response.headers.get("x-request-id", request.request_id))


def progress_bar(total: int, progress: bool | None) -> tqdm[Any]:
    """tqdm on stderr; progress None shows it only on a terminal."""
    return tqdm(total=total, disable=None if progress is None else not progress, unit="req", leave=False)


class Client(API, SyncRunner):
    """The synchronous client: `Client(url, api_key).forecast([...], horizon=3) -> Forecast`. Thread-safe."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: Retries | int = DEFAULT_RETRIES, headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None, priority: str | None = None) -> None:
        self.options = Options(url, api_key, timeout, retries, headers, priority)
        self.url = self.options.url
        self._http = http_client or httpx.Client(timeout=self.options.timeout,
                                                 limits=httpx.Limits(max_connections=64,
                                                                     max_keepalive_connections=64))
        self._http.base_url = httpx.URL(self.url)
        self.admin = Admin(self._run)   # the management API (client/admin.py)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: Request, results: frozenset[int], stream: bool = False) -> httpx.Response:
        """Send with retries; the response whose status is in `results` (streamed: the caller closes it)."""
        attempt = 0
        while True:
            built = request.build(self._http, self.options.headers)
            try:
                response = self._http.send(built, stream=stream)
            except RETRYABLE_TRANSPORT as exc:
                delay = self.options.retries.delay(attempt, None)
                if delay is None:
                    raise APIConnectionError(f"{self.url} unreachable: {exc}", request.request_id) from exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{request.method} {request.path}: {exc}", request.request_id) from exc
            else:
                if response.status_code in results:
                    return response
                response.read()
                response.close()
                error = fail(answer_of(response, request))
                delay = self.options.retries.delay(attempt, error)
                if delay is None:
                    raise error
            time.sleep(delay)
            attempt += 1

    def _run(self, call: Call[T]) -> T:
        response = self._send(call.request, call.results)
        return call.parse(answer_of(response, call.request))

    def _stream(self, call: StreamCall[T]) -> Iterator[T]:
        response = self._send(call.request, frozenset({200}), stream=True)
        try:
            for payload in sse_data(response.iter_lines()):
                item = stream_item(call, payload, response.headers)
                if item is None:
                    return
                yield item
        except httpx.TransportError as exc:
            raise APIConnectionError(f"stream broke: {exc}", call.request.request_id) from exc
        finally:
            response.close()

    def map(self, fn: Callable[..., T], inputs: Iterable[Any], *, concurrency: int = 16,
            progress: bool | None = None, return_exceptions: bool = False, **kwargs: Any) -> list[T]:
        """[fn(x, **kwargs) for x in inputs], `concurrency` at a time (threads sharing this client's connection
        pool), answers in input order, with a progress bar (progress None: only on a terminal). The first error
        is raised and the calls not yet started are dropped, unless return_exceptions puts errors in its place."""
        items = list(inputs)
        results: list[Any] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="inferline-map") as pool, \
                progress_bar(len(items), progress) as bar:
            futures: dict[Future[T], int] = {pool.submit(fn, x, **kwargs): i for i, x in enumerate(items)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None and not return_exceptions:
                        for other in pending:
                            other.cancel()
                        raise error
                    results[futures[future]] = error if error is not None else future.result()
                    bar.update(1)
        return results


class AsyncClient(API, AsyncRunner):
    """The asyncio client: `await AsyncClient(url).forecast([...])`; `async for t in aclient.generate_stream(...)`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: Retries | int = DEFAULT_RETRIES, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None, priority: str | None = None) -> None:
        self.options = Options(url, api_key, timeout, retries, headers, priority)
        self.url = self.options.url
        self._http = http_client or httpx.AsyncClient(timeout=self.options.timeout,
                                                      limits=httpx.Limits(max_connections=64,
                                                                          max_keepalive_connections=64))
        self._http.base_url = httpx.URL(self.url)
        self.admin = AsyncAdmin(self._run)   # the management API (client/admin.py), awaited

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: Request, results: frozenset[int], stream: bool = False) -> httpx.Response:
        """Client._send, awaiting instead of blocking (the same decisions, from Retries)."""
        attempt = 0
        while True:
            built = request.build(self._http, self.options.headers)
            try:
                response = await self._http.send(built, stream=stream)
            except RETRYABLE_TRANSPORT as exc:
                delay = self.options.retries.delay(attempt, None)
                if delay is None:
                    raise APIConnectionError(f"{self.url} unreachable: {exc}", request.request_id) from exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{request.method} {request.path}: {exc}", request.request_id) from exc
            else:
                if response.status_code in results:
                    return response
                await response.aread()
                await response.aclose()
                error = fail(answer_of(response, request))
                delay = self.options.retries.delay(attempt, error)
                if delay is None:
                    raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _run(self, call: Call[T]) -> T:
        response = await self._send(call.request, call.results)
        return call.parse(answer_of(response, call.request))

    async def _stream(self, call: StreamCall[T]) -> AsyncIterator[T]:
        response = await self._send(call.request, frozenset({200}), stream=True)
        try:
            async for payload in asse_data(response.aiter_lines()):
                item = stream_item(call, payload, response.headers)
                if item is None:
                    return
                yield item
        except httpx.TransportError as exc:
            raise APIConnectionError(f"stream broke: {exc}", call.request.request_id) from exc
        finally:
            await response.aclose()

    async def map(self, fn: Callable[..., Awaitable[T]], inputs: Iterable[Any], *, concurrency: int = 16,
                  progress: bool | None = None, return_exceptions: bool = False, **kwargs: Any) -> list[T]:
        """Client.map for coroutines: `concurrency` calls in flight at once, answers in input order."""
        items = list(inputs)
        results: list[Any] = [None] * len(items)
        queue = iter(enumerate(items))

        async def worker(bar: tqdm[Any]) -> None:
            for i, x in queue:   # one shared iterator: each index is taken once
                try:
                    results[i] = await fn(x, **kwargs)
                except Exception as exc:   # noqa: BLE001 - handed back in its place, as asyncio.gather does
                    if not return_exceptions:
                        raise
                    results[i] = exc
                bar.update(1)

        with progress_bar(len(items), progress) as bar:
            workers = [asyncio.create_task(worker(bar)) for _ in range(max(1, min(concurrency, len(items))))]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
        return results
