"""Commands written to Redis the moment they are sent, and their replies read in order by one reader task: a worker's
replies and acks, a gateway's enqueues of one tick. A sender never waits for the last round trip before sending again,
and pays no task, lock or pooled connection per send: answering a lone request cost the worker five event-loop turns
per send through a pooled round trip (a send task to start, its write, its reply, the task's end, the sender's
wake-up), and here one (strace: epoll_wait calls per generated token, 5.2 -> 1.2).

Order is the connection's: Redis runs what one connection sends in the order sent, so an ack sent after a reply never
lands before it, and a send never waits for the one before it to be answered.

The client's rules still hold (roundtrip.py): every send is answered or failed within the client's socket timeout; on
a broken connection, what was not answered is written again, once, on a new one (it may have run: a second reply is
ignored by the gateway, a second ack does nothing); after a timeout nothing is sent again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferline.server.broker.roundtrip import give_back, pack, read_replies, write
from inferline.server.tasks import cancel_and_wait

MAX_UNANSWERED = 64   # sends written and not yet answered; a sender past it waits (Redis slower than the model)


@dataclass(slots=True, eq=False)
class _Sent:
    packed: bytes
    commands: int
    future: asyncio.Future[list[Any]]
    refusal_fails: bool
    written_twice: bool = False


class Pipelined:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.conn: AbstractConnection | None = None
        self.unanswered: deque[_Sent] = deque()
        self.work = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.reader: asyncio.Task[None] | None = None

    def send(self, commands: Sequence[Sequence[Any]], refusal_fails: bool = False) -> asyncio.Future[list[Any]]:
        """Write `commands` now (or as soon as a connection is up); the future gets each command's raw reply, in
        order, a refused command's ResponseError in its place (or, with refusal_fails, as the future's exception: the
        others still ran). It fails with the connection's error (ConnectionError, TimeoutError) when they could not
        be run. A sender that can wait calls `wait_for_room` first, to bound what is in flight."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        sent = _Sent(pack(commands), len(commands), future, refusal_fails)
        self.unanswered.append(sent)
        if self.conn is not None and self.conn.is_connected:
            write(self.conn, sent.packed)
        if len(self.unanswered) >= MAX_UNANSWERED:
            self.room.clear()
        if self.reader is None or self.reader.done():
            self.reader = asyncio.get_running_loop().create_task(self._read())
        self.work.set()
        return future

    async def wait_for_room(self) -> None:
        await self.room.wait()

    async def drain(self) -> None:
        """Wait until everything sent is answered or failed."""
        if self.unanswered:
            await asyncio.wait([self.unanswered[-1].future])

    async def close(self) -> None:
        if self.reader is not None:   # cancelled again while it goes on: a cancel can be dropped (tasks.py)
            await cancel_and_wait([self.reader])
        self._fail(RedisConnectionError("the pipelined connection was closed"))
        await self._drop()

    # the reader task -------------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            if not self.unanswered:
                self.work.clear()
                await self.work.wait()
                continue
            try:
                conn = self.conn
                if conn is None or not conn.is_connected:
                    conn = await self._connect()
                head = self.unanswered[0]
                results = await read_replies(conn, head.commands)
            except asyncio.CancelledError:
                raise
            except RedisTimeoutError as exc:   # Redis hung: nothing is sent again
                self._fail(exc)
                await self._drop()
                continue
            except Exception as exc:   # noqa: BLE001 - broken connection (or no Redis): write again once, else fail
                await self._drop()
                for sent in [s for s in self.unanswered if s.written_twice]:
                    self.unanswered.remove(sent)
                    self._settle(sent, exc)
                for sent in self.unanswered:
                    sent.written_twice = True
                continue
            self.unanswered.popleft()
            refused = next((r for r in results if isinstance(r, ResponseError)), None) if head.refusal_fails else None
            self._settle(head, refused or results)

    async def _connect(self) -> AbstractConnection:
        """A connection of the client's pool, held; whatever is unanswered is written on it, in order."""
        await self._drop()   # one redis-py closed under us goes back to the pool first
        conn = await self.redis.connection_pool.get_connection()
        self.conn = conn
        for sent in self.unanswered:
            write(conn, sent.packed)
        return conn

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await give_back(self.redis, conn)

    def _fail(self, error: Exception) -> None:
        while self.unanswered:
            self._settle(self.unanswered.popleft(), error)

    def _settle(self, sent: _Sent, outcome: list[Any] | Exception) -> None:
        if not sent.future.done():
            if isinstance(outcome, Exception):
                sent.future.set_exception(outcome)
            else:
                sent.future.set_result(outcome)
        if len(self.unanswered) < MAX_UNANSWERED:
            self.room.set()
