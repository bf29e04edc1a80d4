"""One Redis round trip per event-loop tick: the calls that concurrent requests make in the same tick (enqueues,
rate-limit admissions, slot releases) go out as one pipeline, instead of one round trip each.

A call is a Lua script (by its source: loaded once, then run by its SHA) or a plain command. Calls are not a
transaction: each succeeds or fails alone, and its caller gets its own result or exception. A script Redis has
forgotten (a restart, SCRIPT FLUSH) is loaded again and only the calls that failed for it are sent again (they did
not run, so this repeats nothing)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from service.broker import roundtrip
from service.broker.pipelined import Pipelined


@dataclass(slots=True)
class _Call:
    script: str | None          # Lua source, or None for a plain command
    args: Sequence[Any]         # a script's keys then argv; a command's name then arguments
    nkeys: int
    future: asyncio.Future[Any]


class TickBatcher:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.shas: dict[str, str] = {}
        self.pending: list[_Call] = []
        self.sending: set[asyncio.Task[None]] = set()
        self.pipelines = 0          # round trips made (for tests and benchmarks)
        self.line = Pipelined(redis)

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a Lua script in this tick's pipeline; its result. Raises its redis error (or the connection's)."""
        return await self._submit(source, [*keys, *args], len(keys))

    async def command(self, *args: Any) -> Any:
        """Run one command (name, then arguments) in this tick's pipeline; its raw reply. Raises its redis error."""
        return await self._submit(None, args, 0)

    def _submit(self, script: str | None, args: Sequence[Any], nkeys: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self.pending:
            loop.call_soon(self._flush)
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append(_Call(script, args, nkeys, future))
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if all(call.script is None or call.script in self.shas for call in batch):
            # the usual case: written now on the pipelined connection, each caller answered from its reply
            self.pipelines += 1
            sent = self.line.send(self._commands(batch))
            sent.add_done_callback(lambda sent: self._settle(batch, sent))
            return
        self._start(batch)   # a script to load first

    def _settle(self, batch: list[_Call], sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled():
            _fail(batch, RuntimeError("call cancelled"))
            return
        error = sent.exception()
        if error is not None:
            _fail(batch, error)
            return
        again = self._answer(batch, sent.result())
        if again:   # Redis forgot the script (a restart, SCRIPT FLUSH): those did not run; load it and send them again
            self._start(again)

    def _answer(self, batch: list[_Call], results: list[Any]) -> list[_Call]:
        """Give each caller its result or error; the calls whose script Redis did not know, to be sent again."""
        again = []
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue
            if isinstance(result, NoScriptError) and call.script is not None:
                self.shas.pop(call.script, None)
                again.append(call)
            elif isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)
        return again

    def _start(self, batch: list[_Call]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def close(self) -> None:
        await self.line.close()

    async def _send(self, batch: list[_Call]) -> None:
        try:
            for _ in range(2):   # the second time only for calls whose script Redis had forgotten
                batch = self._answer(batch, await self._execute(batch))
                if not batch:
                    return
            _fail(batch, NoScriptError("script not loaded, twice"))
        except BaseException as exc:   # whatever happened, no caller may wait forever
            _fail(batch, exc if isinstance(exc, Exception) else RuntimeError("call cancelled"))
            if not isinstance(exc, Exception):
                raise

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        for source in {call.script for call in batch if call.script is not None} - set(self.shas):
            self.shas[source] = await self.redis.script_load(source)
        self.pipelines += 1
        return await roundtrip.run(self.redis, self._commands(batch))

    def _commands(self, batch: list[_Call]) -> list[Sequence[Any]]:
        return [call.args if call.script is None else ("EVALSHA", self.shas[call.script], call.nkeys, *call.args)
                for call in batch]


def _fail(batch: list[_Call], error: BaseException) -> None:
    for call in batch:
        if not call.future.done():
            call.future.set_exception(error)
