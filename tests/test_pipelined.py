"""The broker's pipelined connection (a worker's replies and acks) and its raw stream reads, against a real Redis:
sends are written at once and answered in order without waiting for each other, a refused command fails its own
send, a broken connection is written to again once (on asyncio's loop and on uvloop's, which refuses a write into a
closed transport), a reader's held connection is kept, replaced when broken and never reused half-read, and both of
Redis's protocols (RESP2, RESP3) read the same."""

from __future__ import annotations

import asyncio

import pytest
import redis
import uvloop

from inferline.server.broker import keys
from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.pipelined import Pipelined
from inferline.server.broker.reads import xread
from inferline.server.broker.roundtrip import HeldConnection
from inferline.server.protocol import Envelope
from tests.conftest import wait_for


def test_sends_are_answered_in_order_without_waiting_for_each_other(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> list[object]:
        client = connect(redis_url)
        line = Pipelined(client)
        try:
            futures = [line.send([("RPUSH", "order", i)]) for i in range(50)]   # none awaited before the next
            return [(await f)[0] for f in futures]
        finally:
            await line.close()
            await client.aclose()

    assert asyncio.run(run()) == list(range(1, 51))
    assert [int(v) for v in rdb.lrange("order", 0, -1)] == list(range(50))


def test_a_refused_command_fails_its_own_send_only(redis_url: str, rdb: redis.Redis) -> None:
    rdb.set("plain", "v")

    async def run() -> tuple[BaseException | None, list[object], list[object]]:
        client = connect(redis_url)
        line = Pipelined(client)
        try:
            failing = line.send([("INCR", "n"), ("XACK", "plain", "g", "1-1")], refusal_fails=True)   # WRONGTYPE
            in_place = line.send([("XACK", "plain", "g", "1-1"), ("INCR", "n")])
            fine = line.send([("INCR", "n")])
            error = (await asyncio.gather(failing, return_exceptions=True))[0]
            return error if isinstance(error, BaseException) else None, await in_place, await fine
        finally:
            await line.close()
            await client.aclose()

    error, in_place, fine = asyncio.run(run())
    assert isinstance(error, redis.ResponseError) and "WRONGTYPE" in str(error)
    assert isinstance(in_place[0], redis.ResponseError) and in_place[1] == 2   # the refused sends' INCRs still ran
    assert fine == [3]


def test_a_broken_connection_is_written_to_again_once(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> list[object]:
        client = connect(redis_url)
        line = Pipelined(client)
        try:
            [conn_id] = await line.send([("CLIENT", "ID")])
            await asyncio.to_thread(rdb.client_kill_filter, _id=conn_id)
            return await line.send([("INCR", "after-kill")])   # found broken when read; sent again on a new one
        finally:
            await line.close()
            await client.aclose()

    assert asyncio.run(run()) == [1]
    assert rdb.get("after-kill") == b"1"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_send_into_a_transport_closed_under_it_goes_out_on_a_new_connection(redis_url: str, rdb: redis.Redis,
                                                                               loop: str) -> None:
    async def run() -> list[object]:
        client = connect(redis_url)
        line = Pipelined(client)
        try:
            await line.send([("PING",)])
            assert line.conn is not None
            line.conn._writer.transport.close()   # as the loop does when Redis goes away, before redis-py hears of it
            await asyncio.sleep(0.01)              # closed, not just closing (nothing reads this idle connection)
            return await line.send([("INCR", "after-close")])   # uvloop refuses the write; it must not raise
        finally:
            await line.close()
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        assert runner.run(run()) == [1]
    assert rdb.get("after-close") == b"1"


def test_a_reader_holds_one_connection_and_replaces_it_when_broken_or_cut_off(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> tuple[list[object], list[object], object]:
        client = connect(redis_url)
        held = HeldConnection(client)
        try:
            ids = [(await held.run([("CLIENT", "ID")]))[0] for _ in range(2)]
            await asyncio.to_thread(rdb.client_kill_filter, _id=ids[-1])
            ids.append((await held.run([("CLIENT", "ID")]))[0])   # broken: the client's Retry reconnects, once
            both = await asyncio.gather(held.run([("PING",)]), held.run([("PING",)]), return_exceptions=True)
            blocked = asyncio.create_task(held.run([("BLPOP", "nothing-here", 5)]))
            await asyncio.sleep(0.2)
            blocked.cancel()   # cut off mid-read: its late reply must not answer the next round trip
            await asyncio.gather(blocked, return_exceptions=True)
            # Redis sees the close when it next reads that socket: an RPUSH sent sooner (another connection, the same
            # event-loop turn of Redis) was served to the blocked BLPOP first, which then wrote "late" to a dead socket
            # (LLEN 0 under load). So push once Redis has dropped the client, within 3 s: a connection not closed on
            # cancel stays open (nothing reads it any more) and fails here.
            await asyncio.to_thread(wait_for, lambda: all(c["id"] != str(ids[-1]) for c in rdb.client_list()),
                                    3, "the cut connection closed")
            await asyncio.to_thread(rdb.rpush, "nothing-here", "late")
            after_cut = (await held.run([("LLEN", "nothing-here")]))[0]
            return ids, both, after_cut
        finally:
            await held.close()
            await client.aclose()

    ids, both, after_cut = asyncio.run(run())
    assert ids[0] == ids[1] != ids[2]   # kept across round trips, replaced when Redis dropped it
    assert sum(isinstance(r, RuntimeError) for r in both) == 1   # one round trip at a time, the other refused
    assert after_cut == 1   # the cancelled BLPOP's connection was closed: nothing popped the pushed value


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_reads_parse_both_protocols(redis_url: str, rdb: redis.Redis, protocol: int) -> None:
    rdb.xadd("plain-stream", {"a": "1", "b": "2"})
    rdb.delete(keys.request_stream("proto"))

    async def run() -> tuple[list[tuple[bytes, dict[bytes, bytes]]], list[bytes]]:
        client = connect(redis_url, protocol=protocol)
        queue = ModelQueue(client, "proto", "c1")
        try:
            await queue.ensure_group()
            await client.xadd(queue.stream, Envelope("r1", "gw", 1, "v2").fields() | {"p": b"xyz"})
            entries = await xread(HeldConnection(client), "plain-stream", b"0-0", 10, 0.1)
            deliveries = await queue.read(count=10, block_s=None)
            return entries, [d.payload for d in deliveries]
        finally:
            await queue.close()
            await client.aclose()

    entries, payloads = asyncio.run(run())
    assert [fields for _, fields in entries] == [{b"a": b"1", b"b": b"2"}]
    assert payloads == [b"xyz"]
