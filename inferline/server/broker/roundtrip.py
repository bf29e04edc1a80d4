"""Several commands in one round trip, on a connection of a redis.asyncio client's pool, without building a redis-py
Pipeline: the hot blocking reads (a worker's XREADGROUP, a gateway's XREAD of its replies, a worker's of cancels) run
here on a held connection, and the packer, the write and the reply reader serve pipelined.py too. Measured on
this machine, a one-command pipeline cost 137 µs of client CPU through redis-py's Pipeline and 84 µs this way; a
bare asyncio protocol with hiredis costs 83 µs, so what is left is the socket's own. The commands are packed here
(redis-py's packer cost ~25 µs of gateway CPU per request with a 4.5 KB body) and one timeout covers all replies
(redis-py starts one per reply).

The client's own rules still hold: its socket timeout bounds the replies, a broken connection is retried once (its
Retry), and a connection that failed or was cancelled mid-way is closed, never handed back half-read. The blocking
reads block at most client.MAX_BLOCK_S, inside that timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ClusterDownError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferline.server.broker import nodes


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """The RESP request for `commands` (each a name, then its arguments: bytes, str, int or float). Exact types are
    tested first: this runs for every request a gateway queues (~2.6 µs for an enqueue's 15 arguments)."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)
            if kind is str:
                arg = arg.encode()
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes and kind is not bytearray:
                arg = _coerce(arg)
            out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(out)


def _coerce(arg: Any) -> bytes:
    if isinstance(arg, bytes | bytearray):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return repr(arg).encode() if isinstance(arg, float) else b"%d" % arg
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(arg).__name__}")


class HeldConnection:
    """One connection of the client's pool, held by one reader for its round trips, one at a time: the hot blocking
    reads (a worker's XREADGROUP, a gateway's XREAD of its replies, a worker's of cancels). Checking a connection out
    of redis-py's pool and back in for every read (its lock, its connection-count recorder, its pool-name lookup) was
    ~45 of the gateway's ~480 Python calls for a lone request (cProfile, c=1); the worker's CPU per lone request fell
    ~11% without it (profile_serving.py, median of 8 pairs). What failed, timed out or was cancelled mid-way is
    closed, never kept half-read; the next round trip takes a fresh connection. redis.aclose() closes a held
    connection too (the pool's in-use ones)."""

    def __init__(self, redis: Any, key: str | None = None) -> None:
        """redis: a client of one Redis, or of a Cluster (connect(cluster=True)): then the reads go to the node that
        serves `key` (the one stream they read), found again after a MOVED or a broken connection."""
        self.router = nodes.router_of(redis)
        if self.router is not None and key is None:
            raise ValueError("a held connection on a Redis Cluster needs the key it reads")
        self.key = key
        self.redis: aioredis.Redis = redis   # on a Cluster: the client of the node that serves key, once known
        self.conn: AbstractConnection | None = None
        self.busy = False

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command's raw reply, in order; a command that Redis refused gives its ResponseError in its place (the
        others still ran). Raises the connection's error (ConnectionError, TimeoutError) when the round trip failed,
        after the client's Retry (a broken connection is reconnected and the commands written again, once). On a
        Cluster a MOVED is followed (the slot map read again), an ASK answered on the node named, a TRYAGAIN
        waited out, each as bounded as nodes.py says, and only the refused commands are sent again (the others ran:
        a worker's acks go in its read's round trip, sender.py); past the bound the refusal is the reply."""
        if self.router is None:
            return await self._run(commands)
        router = self.router
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))   # the commands not run yet (refused with a redirect)
        for _ in range(nodes.MAX_REDIRECTS + 1):
            await router.ensure()
            assert self.key is not None
            node = router.node_of(self.key)
            if not node:   # no primary serves the slot (a failover under way): fail now, look again
                router.refresh_soon()
                raise ClusterDownError("the stream's slot is not served by any node")
            client = router.client(node)
            if client is not self.redis:
                await self.close()
                self.redis = client
            try:
                got = await self._run([commands[i] for i in todo])
            except (RedisError, OSError):
                router.refresh_soon()   # the node died or failed over: find who serves the stream now
                raise
            hop = None
            refused = []
            for i, result in zip(todo, got, strict=True):
                results[i] = result
                if (h := nodes.redirect(result)) is not None:
                    hop = hop or h
                    refused.append(i)
            if hop is None:
                return results
            todo = refused
            kind, slot, node = hop
            router.redirects[kind] += 1
            if kind == "MOVED":
                router.moved(slot, node)
            elif kind == "ASK":   # the stream is half-way to `node`: send there, once, each command after an ASKING
                asked = HeldConnection(router.client(node))
                try:
                    got = await asked.run([c for i in todo for c in (("ASKING",), commands[i])])
                finally:
                    await asked.close()
                for i, result in zip(todo, got[1::2], strict=True):
                    results[i] = result
                return results
            else:
                await asyncio.sleep(nodes.TRYAGAIN_WAIT_S)
        return results

    async def _run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if self.busy:   # a reader's round trips are one after another; two at once would interleave their replies
            raise RuntimeError("a held connection runs one round trip at a time")
        self.busy = True
        packed = pack(commands)
        try:
            if self.conn is None:
                self.conn = await self.redis.connection_pool.get_connection()
            conn = self.conn

            async def send_and_read() -> list[Any]:
                if not conn.is_connected:
                    await conn.connect()
                write(conn, packed)
                return await read_replies(conn, len(commands))

            async def reconnect(_: Exception) -> None:
                await conn.disconnect()

            return await conn.retry.call_with_retry(send_and_read, reconnect)
        except BaseException:
            await self.close()
            raise
        finally:
            self.busy = False

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await give_back(self.redis, conn)


async def give_back(redis: aioredis.Redis, conn: AbstractConnection) -> None:
    """Close a held connection and return it to the client's pool (never half-read: closed first). Errors of a
    connection already broken are not news to anyone; they are not raised over the error that broke it."""
    with contextlib.suppress(Exception):
        await conn.disconnect()
    with contextlib.suppress(Exception):
        await redis.connection_pool.release(conn)


def write(conn: AbstractConnection, packed: bytes) -> None:
    """Put packed commands on a connected redis-py connection: a synchronous write into its transport, which buffers
    what the socket does not take at once. redis-py's own send wraps each write in asyncio.wait_for, which on Python
    3.11 runs it as a task of its own: two more event-loop turns per command. A transport that Redis closed under the
    connection takes nothing (asyncio drops the write, uvloop raises): what was not written shows up as the read's
    ConnectionError."""
    writer: Any = conn._writer   # noqa: SLF001
    if not writer.is_closing():
        writer.write(packed)


async def read_replies(conn: AbstractConnection, n: int) -> list[Any]:
    """The next n raw replies on `conn`, a refused command's ResponseError in its place (read whole: the connection
    stays in step). One timeout, the connection's socket timeout, covers them all; past it, RedisTimeoutError."""
    results: list[Any] = []
    try:
        async with asyncio.timeout(conn.socket_timeout):
            for _ in range(n):
                try:
                    results.append(await conn.read_response(timeout=math.inf))
                except ResponseError as error:
                    results.append(error)
    except TimeoutError:
        raise RedisTimeoutError(f"no reply from Redis within {conn.socket_timeout} s") from None
    return results
