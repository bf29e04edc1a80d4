"""The dispatcher's own rules against the suite's real Redis, with no worker process: the test plays the worker's
part through redis-py (reads the request off the model's stream, answers on the gateway's reply stream). Fast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from inferline.server.broker import keys
from inferline.server.broker.client import connect
from inferline.server.broker.registry import Registry
from inferline.server.config import Settings
from inferline.server.errors import DeadlineExceeded, InferlineError, Overloaded, Unavailable, ValidationFailed
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.ids import new_id
from inferline.server.metrics import GatewayMetrics
from inferline.server.protocol import OP_PREDICT, Envelope, Reply, WorkerStatus, pack_replies

pytestmark = pytest.mark.timeout(60)


WORKER = "w1"


@pytest.fixture
def redis_for_test(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)   # no ./inferline.toml: each test's model is the only one
    return redis_url


@asynccontextmanager
async def started(redis_url: str) -> AsyncIterator[Dispatcher]:
    """A started dispatcher serving one model of its own name (tests share the Redis), 0.5 s deadlines, with one
    worker heartbeat in the registry (valid for keys.HEARTBEAT_TTL_S: longer than any test here)."""
    model = f"m{new_id()}"
    settings = Settings(redis_url=redis_url, models={model: {"timeout_s": 0.5, "queue_cap": 2}})
    redis = connect(redis_url)
    registry = Registry(redis)
    await registry.beat(model, WORKER, WorkerStatus(pid=1, host="test", device="cpu", version="1", started=0))
    d = Dispatcher(redis, settings, GatewayMetrics(), registry)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        await redis.aclose()


def the_model(d: Dispatcher) -> str:
    return next(iter(d.settings.models))


async def next_request(redis: aioredis.Redis, model: str) -> Envelope:
    """The newest request on the model's stream, once there is one (as a worker would read it)."""
    for _ in range(200):
        entries = await redis.xrevrange(keys.request_stream(model), count=1)
        if entries:
            return Envelope.from_fields(entries[0][1])
        await asyncio.sleep(0.01)
    raise AssertionError("no request reached the stream")


async def reply_on(redis: aioredis.Redis, envelope: Envelope, *replies: Reply) -> None:
    await redis.xadd(envelope.reply_to, {"pack": pack_replies(list(replies))})


async def test_an_unanswered_request_fails_at_its_deadline(redis_for_test: str) -> None:
    async with started(redis_for_test) as dispatcher:
        begun = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="not answered within 0.5 s"):
            await dispatcher.call(the_model(dispatcher), OP_PREDICT, {"row": {}})
        assert 0.45 < time.monotonic() - begun < 2.0
        assert dispatcher.waiters == {}   # nothing left waiting


async def test_a_reply_reaches_its_caller_and_strays_are_dropped(redis_for_test: str) -> None:
    async with started(redis_for_test) as dispatcher:
        redis = connect(redis_for_test)
        try:
            call = asyncio.create_task(dispatcher.call(the_model(dispatcher), OP_PREDICT, {"row": {}},
                                                       request_id="caller-1"))
            envelope = await next_request(redis, the_model(dispatcher))
            assert envelope.request_id == "caller-1" and envelope.deadline_ms > 0
            # a reply for nobody, and a non-final piece, are ignored; the final reply answers the caller
            await reply_on(redis, envelope, Reply("nobody", b"{}"), Reply("caller-1", b'{"part":1}', final=False),
                           Reply("caller-1", b'{"ok":1}', batch_size=3, compute_ms=1.5))
            reply = await asyncio.wait_for(call, 5)
            assert reply.body == b'{"ok":1}' and reply.batch_size == 3
            assert dispatcher.waiters == {}
        finally:
            await redis.aclose()


async def test_an_error_reply_raises_its_type(redis_for_test: str) -> None:
    async with started(redis_for_test) as dispatcher:
        redis = connect(redis_for_test)
        try:
            call = asyncio.create_task(dispatcher.call(the_model(dispatcher), OP_PREDICT, {"row": {}}))
            envelope = await next_request(redis, the_model(dispatcher))
            await reply_on(redis, envelope, Reply.error(envelope.request_id, ValidationFailed("`x` is bad", field="x")))
            with pytest.raises(InferlineError) as caught:
                await asyncio.wait_for(call, 5)
            assert caught.value.error_type == "validation" and caught.value.field == "x"
            assert "`x` is bad" in caught.value.message
        finally:
            await redis.aclose()


async def test_a_request_id_in_flight_is_not_taken_over(redis_for_test: str) -> None:
    """Two callers sending one x-request-id: the second gets an id of its own, so neither takes the other's reply."""
    async with started(redis_for_test) as dispatcher:
        redis = connect(redis_for_test)
        try:
            first = asyncio.create_task(dispatcher.call(the_model(dispatcher), OP_PREDICT, {"row": {}},
                                                        request_id="same"))
            await next_request(redis, the_model(dispatcher))
            second = asyncio.create_task(dispatcher.call(the_model(dispatcher), OP_PREDICT, {"row": {}},
                                                         request_id="same"))
            await asyncio.sleep(0.05)
            entries = await redis.xrange(keys.request_stream(the_model(dispatcher)))
            ids = [Envelope.from_fields(fields).request_id for _, fields in entries]
            assert ids[0] == "same" and len(ids) == 2 and ids[1] != "same"
            for task in (first, second):
                with pytest.raises(DeadlineExceeded):
                    await task
        finally:
            await redis.aclose()


async def test_a_full_queue_is_refused_at_once(redis_for_test: str) -> None:
    async with started(redis_for_test) as dispatcher:
        model = the_model(dispatcher)
        waiting = [asyncio.create_task(dispatcher.call(model, OP_PREDICT, {"row": {}})) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded, match="queue_cap"):
            await dispatcher.call(model, OP_PREDICT, {"row": {}})
        for task in waiting:
            with pytest.raises(DeadlineExceeded):
                await task


async def test_a_model_without_a_live_worker_is_refused_without_queueing(redis_for_test: str) -> None:
    async with started(redis_for_test) as dispatcher:
        model = the_model(dispatcher)
        await dispatcher.registry.remove(model, WORKER)
        await asyncio.sleep(0.6)   # the watcher has looked again (every 0.5 s): no worker beats for this model
        assert dispatcher.live.get(model) == 0
        with pytest.raises(Unavailable, match="no live worker"):
            await dispatcher.call(model, OP_PREDICT, {"row": {}})
        redis = connect(redis_for_test)
        try:
            assert await redis.xlen(keys.request_stream(model)) == 0
        finally:
            await redis.aclose()
