"""One Redis round trip per event-loop tick: the calls that concurrent requests make in the same tick (enqueues,
rate-limit admissions, slot releases) go out as one pipeline, instead of one round trip each.

A call is a Lua script (by its source: loaded once, then run by its SHA) or a plain command. Calls are not a
transaction: each succeeds or fails alone, and its caller gets its own result or exception. A script Redis has
forgotten (a restart, SCRIPT FLUSH) is loaded again and only the calls that failed for it are sent again (they did
not run, so this repeats nothing).

Durable enqueue (`[broker] min_replicas_ack = n`, off at 0): a tick's batch that carries a call marked `replicated`
(the enqueues) ends with one `WAIT n timeout`, in the same round trip; when fewer than n replicas acknowledged the
batch within the timeout, each replicated call fails with NotReplicated (it ran on the primary: its request may
still be served). Redis runs one connection's commands in order, so the WAIT covers every write before it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from inferline.server.broker.pipelined import Pipelined


class NotReplicated(Exception):
    """A write that ran on the primary but reached fewer replicas than asked for within the timeout."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(f"reached {acked} of {wanted} replica(s) within {timeout_ms} ms")
        self.acked, self.wanted, self.timeout_ms = acked, wanted, timeout_ms


@dataclass(slots=True)
class _Call:
    script: str | None          # Lua source, or None for a plain command
    args: Sequence[Any]         # a script's keys then argv; a command's name then arguments
    nkeys: int
    future: asyncio.Future[Any]
    replicated: bool = False    # answered only once min_replicas replicas have it (a WAIT ends its batch)


class TickBatcher:
    def __init__(self, redis: aioredis.Redis, min_replicas: int = 0, replica_timeout_ms: int = 0) -> None:
        """min_replicas > 0: batches with replicated calls end with WAIT min_replicas replica_timeout_ms (which
        must stay under the client's socket timeout: the connection waits that long for the answer)."""
        self.redis = redis
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        self.shas: dict[str, str] = {}
        self.pending: list[_Call] = []
        self.loading: set[asyncio.Task[None]] = set()   # batches waiting for a script to load
        self.pipelines = 0          # round trips made (for tests and benchmarks)
        self.line = Pipelined(redis)

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any], replicated: bool = False) -> Any:
        """Run a Lua script in this tick's pipeline; its result. Raises its redis error (or the connection's), and
        with replicated (and min_replicas set) NotReplicated when the batch did not reach enough replicas."""
        return await self._submit(source, [*keys, *args], len(keys), replicated)

    async def command(self, *args: Any) -> Any:
        """Run one command (name, then arguments) in this tick's pipeline; its raw reply. Raises its redis error."""
        return await self._submit(None, args, 0)

    def _submit(self, script: str | None, args: Sequence[Any], nkeys: int,
                replicated: bool = False) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self.pending:
            loop.call_soon(self._flush)
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append(_Call(script, args, nkeys, future, replicated and self.min_replicas > 0))
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        self._send(batch, reloads=1)

    def _send(self, batch: list[_Call], reloads: int) -> None:
        """Write the batch on the pipelined connection; each caller is answered from its reply. A script not known
        yet is loaded first (a task); `reloads`: how often a script Redis forgot may still be loaded again."""
        if any(call.script is not None and call.script not in self.shas for call in batch):
            task = asyncio.get_running_loop().create_task(self._load_then_send(batch, reloads))
            self.loading.add(task)
            task.add_done_callback(self.loading.discard)
            return
        self.pipelines += 1
        commands = [call.args if call.script is None
                    else ("EVALSHA", self.shas[call.script], call.nkeys, *call.args) for call in batch]
        waits = any(call.replicated for call in batch)
        if waits:   # one WAIT per tick of enqueues, in the same round trip (Redis runs them in order)
            commands.append(("WAIT", self.min_replicas, self.replica_timeout_ms))
        sent = self.line.send(commands)
        sent.add_done_callback(lambda sent: self._settle(batch, sent, reloads, waits))

    async def _load_then_send(self, batch: list[_Call], reloads: int) -> None:
        try:
            for source in {call.script for call in batch if call.script is not None} - set(self.shas):
                self.shas[source] = await self.redis.script_load(source)
        except BaseException as exc:   # whatever happened, no caller may wait forever
            _fail(batch, exc if isinstance(exc, Exception) else RuntimeError("call cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        self._send(batch, reloads)

    def _settle(self, batch: list[_Call], sent: asyncio.Future[list[Any]], reloads: int, waits: bool) -> None:
        if sent.cancelled():
            _fail(batch, RuntimeError("call cancelled"))
            return
        error = sent.exception()
        if error is not None:
            _fail(batch, error)
            return
        results = sent.result()
        short: Exception | None = None
        if waits:
            acked = results.pop()
            if isinstance(acked, Exception):   # WAIT itself refused (an ACL without it): say so, do not hide it
                short = acked
            elif int(acked) < self.min_replicas:
                short = NotReplicated(int(acked), self.min_replicas, self.replica_timeout_ms)
        again = []
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue
            if short is not None and call.replicated and not isinstance(result, Exception):
                call.future.set_exception(short)
            elif isinstance(result, NoScriptError) and call.script is not None:
                self.shas.pop(call.script, None)
                again.append(call)
            elif isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)
        if not again:
            return
        if reloads:   # Redis forgot the script (a restart, SCRIPT FLUSH): those did not run; load it, send them again
            self._send(again, reloads - 1)
        else:
            _fail(again, NoScriptError("script not loaded, twice"))

    async def close(self) -> None:
        for task in list(self.loading):
            task.cancel()
        await self.line.close()


def _fail(batch: list[_Call], error: BaseException) -> None:
    for call in batch:
        if not call.future.done():
            call.future.set_exception(error)
