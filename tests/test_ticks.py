"""The broker's TickBatcher against a real Redis: the calls of one event-loop tick (enqueues, rate-limit admissions,
slot releases) go out as one pipeline, each caller gets its own result or error, and a script Redis forgot is
loaded again without repeating a call that already ran."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from inferline.server.broker import keys
from inferline.server.broker.client import connect
from inferline.server.broker.delivery import parse_entry
from inferline.server.broker.enqueue import Enqueuer
from inferline.server.broker.ratelimit import ADMITTED, LIMITED, Limits, RateLimiter
from inferline.server.broker.ticks import TickBatcher
from inferline.server.protocol import PAYLOAD_FIELD, Envelope, now_ms

COUNT = "return redis.call('INCR', KEYS[1])"


def test_one_tick_is_one_round_trip_with_a_result_each(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> tuple[list[object], int]:
        client = connect(redis_url)
        batcher = TickBatcher(client)
        try:
            calls = [batcher.script(COUNT, ["n"], []) for _ in range(20)]
            calls += [batcher.command("SET", "k", "v"), batcher.command("HSET", "k", "f", "v")]   # the last: wrong type
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results, batcher.pipelines
        finally:
            await client.aclose()

    results, pipelines = asyncio.run(run())
    assert pipelines == 1
    assert sorted(results[:20]) == list(range(1, 21))          # type: ignore[type-var]
    assert results[20] == b"OK"                                # the raw reply: no redis-py callbacks
    assert isinstance(results[21], redis.ResponseError) and "WRONGTYPE" in str(results[21])


def test_a_forgotten_script_is_reloaded_and_nothing_runs_twice(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> list[object]:
        client = connect(redis_url)
        batcher = TickBatcher(client)
        try:
            assert await batcher.script(COUNT, ["n"], []) == 1
            await client.script_flush()                          # as after a Redis restart
            return list(await asyncio.gather(batcher.command("INCR", "m"), batcher.script(COUNT, ["n"], [])))
        finally:
            await client.aclose()

    assert asyncio.run(run()) == [1, 2]
    assert rdb.get("m") == b"1" and rdb.get("n") == b"2"


def test_gateway_calls_of_one_tick_share_the_pipeline(redis_url: str, rdb: redis.Redis) -> None:
    """Admissions, enqueues and releases of concurrent requests through one batcher, as the gateway wires them: one
    round trip per kind of step, not one per request; the rate limit still holds exactly."""
    rdb.hset(keys.api_key("k"), mapping={"hash": "h", "scopes": "infer", "models": "*"})

    async def run() -> tuple[list[int], list[int], int]:
        client = connect(redis_url)
        batcher = TickBatcher(client)
        limiter = RateLimiter(client, Limits(rate_per_s=0.001, burst=10, concurrency=100, lease_ms=60_000), batcher)
        enqueuer = Enqueuer(client, batcher)
        try:
            admitted = await asyncio.gather(*[limiter.admit("k", "h", f"s{i}") for i in range(16)])
            depths = await asyncio.gather(*[enqueuer.enqueue("m", Envelope(f"r{i}", "reply", now_ms() + 10_000, "v2"),
                                                             b"x", 100, 60_000) for i in range(10)])
            await asyncio.gather(*[limiter.release("k", f"s{i}") for i in range(16)])
            return [a.code for a in admitted], sorted(depths), batcher.pipelines
        finally:
            await client.aclose()

    codes, depths, pipelines = asyncio.run(run())
    assert codes.count(ADMITTED) == 10 and codes.count(LIMITED) == 6
    assert depths == list(range(10)) and rdb.xlen(keys.request_stream("m")) == 10
    assert pipelines == 3
    assert rdb.zcard(keys.in_flight("k")) == 0


def test_the_enqueue_script_writes_the_entry_the_codec_spells(redis_url: str, rdb: redis.Redis) -> None:
    """The script's field list is generated from protocol.py: the entry Redis holds is the payload field, then
    Envelope.fields() in order (the optional traceparent only when set), and a worker reads the envelope back."""
    sent = [Envelope("r1", keys.reply_stream("gw"), now_ms() + 10_000, "v2"),
            Envelope("r2", keys.reply_stream("gw"), now_ms() + 10_000, "generate", traceparent="00-ab-cd-01")]

    async def run() -> None:
        client = connect(redis_url)
        try:
            enqueuer = Enqueuer(client)
            for envelope in sent:
                await enqueuer.enqueue("m", envelope, b"payload " + envelope.request_id.encode(), 100, 60_000)
        finally:
            await client.aclose()

    asyncio.run(run())
    entries: Any = rdb.xrange(keys.request_stream("m"))
    for envelope, (entry_id, fields) in zip(sent, entries, strict=True):
        payload = b"payload " + envelope.request_id.encode()
        want = [(PAYLOAD_FIELD, payload)] + [(k, str(v).encode()) for k, v in envelope.fields().items()]
        assert [(k.decode(), v) for k, v in fields.items()] == want
        delivery = parse_entry(entry_id, fields, 1)
        assert delivery.envelope == envelope and delivery.payload == payload
    assert b"tp" not in entries[0][1] and entries[1][1][b"tp"] == b"00-ab-cd-01"
