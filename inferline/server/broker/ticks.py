"""One Redis round trip per event-loop tick: the calls that concurrent requests make in the same tick (enqueues,
rate-limit admissions, slot releases) go out as one pipeline, instead of one round trip each.

A call is a Lua script (by its source: loaded once, then run by its SHA) or a plain command. Calls are not a
transaction: each succeeds or fails alone, and its caller gets its own result or exception. A script Redis has
forgotten (a restart, SCRIPT FLUSH) is loaded again and only the calls that failed for it are sent again (they did
not run, so this repeats nothing).

On a Redis Cluster (a client from connect(cluster=True)) a tick's calls are grouped by the node serving their first
key's slot, one pipelined connection per node; a call refused with MOVED is sent again to the node named (and the slot
map read again), with ASK once to the node named after an ASKING, with TRYAGAIN (its keys half-migrated: it did not
run) again a little later: each bounded as nodes.py says. On one Redis no slot is hashed.

Durable enqueue (`[broker] min_replicas_ack = n`, off at 0): the calls marked `replicated` (the enqueues) that one
connection carries in a tick are followed there by one `WAIT n timeout`, in the same round trip (on a Cluster: one
WAIT per node written to); when fewer than n replicas acknowledged within the timeout, each replicated call of that
connection fails with NotReplicated (it ran on the primary: its request may still be served). Redis runs one
connection's commands in order, so the WAIT covers every write before it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ClusterDownError, NoScriptError

from inferline.server.broker import nodes
from inferline.server.broker.client import Redis
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
    ask: str | None = None      # a Cluster's ASK: the node to send it to next, after ASKING
    redirects: int = 0
    waits: int = 0              # TRYAGAIN answers so far
    replicated: bool = False    # answered only once min_replicas replicas have it (a WAIT ends its batch)


class TickBatcher:
    def __init__(self, redis: Redis, min_replicas: int = 0, replica_timeout_ms: int = 0) -> None:
        """min_replicas > 0: batches with replicated calls end with WAIT min_replicas replica_timeout_ms (which
        must stay under the client's socket timeout: the connection waits that long for the answer)."""
        self.redis = redis
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        self.shas: dict[str, str] = {}
        self.pending: list[_Call] = []
        self.loading: set[asyncio.Task[None]] = set()   # batches waiting for a script to load
        self.pipelines = 0          # round trips made (for tests and benchmarks)
        self.router: nodes.Router | None = None       # a Cluster's; None on one Redis
        self.line: Pipelined | None = None            # one Redis's
        if isinstance(redis, nodes.Cluster):
            self.router = redis.router
        else:
            self.line = Pipelined(redis)
        self.lines: dict[str, Pipelined] = {}         # a Cluster's: one per node

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any], replicated: bool = False) -> Any:
        """Run a Lua script in this tick's pipeline; its result. Raises its redis error (or the connection's), and
        with replicated (and min_replicas set) NotReplicated when the batch did not reach enough replicas."""
        return await self._submit(source, [*keys, *args], len(keys), replicated)

    async def command(self, *args: Any) -> Any:
        """Run one command (name, then arguments) in this tick's pipeline; its raw reply. Raises its redis error."""
        return await self._submit(None, args, 0)

    def submit(self, script: str | None, args: Sequence[Any], nkeys: int = 0,
               replicated: bool = False) -> asyncio.Future[Any]:
        """`script` / `command` without the coroutine: the call is queued for this tick now (so calls submitted one
        after another are written in that order), and the future gets its result."""
        return self._submit(script, args, nkeys, replicated)

    def _submit(self, script: str | None, args: Sequence[Any], nkeys: int,
                replicated: bool = False) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self.pending:
            loop.call_soon(self._flush)
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append(_Call(script, args, nkeys, future, replicated=replicated and self.min_replicas > 0))
        return future

    def flush(self) -> None:
        """Write what was submitted now rather than at the tick's end: for a caller whose calls of this tick are all
        in (a worker's send), one event-loop turn less per send (an epoll_wait and the loop's own work)."""
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if batch:   # empty when flush() wrote it already
            self._send(batch, reloads=1)

    def _send(self, batch: list[_Call], reloads: int) -> None:
        """Write the batch on the pipelined connection (a Cluster's: each node's part on that node's); each caller is
        answered from its reply. A script not known yet (or a Cluster's slot map not read yet) is loaded first (a
        task); `reloads`: how often a script Redis forgot may still be loaded again."""
        if any(call.script is not None and call.script not in self.shas for call in batch) or (
                self.router is not None and not self.router.ready):
            task = asyncio.get_running_loop().create_task(self._load_then_send(batch, reloads))
            self.loading.add(task)
            task.add_done_callback(self.loading.discard)
            return
        for line, calls in self._by_line(batch):
            self.pipelines += 1
            asked = None if self.router is None else [call.ask is not None for call in calls]
            commands: list[Sequence[Any]] = []
            for call in calls:
                if call.ask is not None:
                    commands.append(("ASKING",))
                    call.ask = None
                commands.append(call.args if call.script is None
                                else ("EVALSHA", self.shas[call.script], call.nkeys, *call.args))
            waits = any(call.replicated for call in calls)
            if waits:   # one WAIT per tick of enqueues and connection, in the same round trip (run in order)
                commands.append(("WAIT", self.min_replicas, self.replica_timeout_ms))
            sent = line.send(commands)
            sent.add_done_callback(lambda sent, calls=calls, line=line, asked=asked, waits=waits:  # type: ignore[misc]
                                   self._settle(calls, sent, reloads, line, asked, waits))

    def _by_line(self, batch: list[_Call]) -> list[tuple[Pipelined, list[_Call]]]:
        """The batch's calls by the connection they go on: one Redis's, or on a Cluster the node's serving the
        call's first key (a script's first KEYS, a command's first argument; an ASK'd call the node named)."""
        if self.router is None:
            assert self.line is not None
            return [(self.line, batch)]
        node_of = self.router.node_of
        where = [call.ask or node_of(call.args[0] if call.script is not None or len(call.args) < 2 else call.args[1])
                 for call in batch]
        first = where[0] if where else ""
        if first and where.count(first) == len(where):   # the usual tick: one node (one model, one gateway)
            return [(self._line(first), batch)]
        by_node: dict[str, list[_Call]] = {}
        for call, node in zip(batch, where, strict=True):
            if not node:   # no primary serves the slot (a failover under way): fail now, look again
                call.future.set_exception(ClusterDownError("the key's slot is not served by any node"))
                self.router.refresh_soon()
                continue
            by_node.setdefault(node, []).append(call)
        return [(self._line(node), calls) for node, calls in by_node.items()]

    def _line(self, node: str) -> Pipelined:
        assert self.router is not None
        line = self.lines.get(node)
        if line is None:
            line = self.lines[node] = Pipelined(self.router.client(node))
        return line

    async def _load_then_send(self, batch: list[_Call], reloads: int, where: Any = None) -> None:
        """Read the slot map if needed, load the batch's unknown scripts (on `where`, the node client that had
        forgotten them, else on the client: every primary of a Cluster), then send it."""
        try:
            if self.router is not None:
                await self.router.ensure()
            for source in {call.script for call in batch if call.script is not None} - set(self.shas):
                self.shas[source] = await (where or self.redis).script_load(source)
        except BaseException as exc:   # whatever happened, no caller may wait forever
            _fail(batch, exc if isinstance(exc, Exception) else RuntimeError("call cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        self._send(batch, reloads)

    def _settle(self, batch: list[_Call], sent: asyncio.Future[list[Any]], reloads: int,
                line: Pipelined | None = None, asked: list[bool] | None = None, waits: bool = False) -> None:
        if sent.cancelled():
            _fail(batch, RuntimeError("call cancelled"))
            return
        error = sent.exception()
        if error is not None:
            _fail(batch, error)
            if self.router is not None:   # a node down or failed over: read the map again
                self.router.refresh_soon()
            return
        results = sent.result()
        short: Exception | None = None
        if waits:
            acked = results.pop()
            if isinstance(acked, Exception):   # WAIT itself refused (an ACL without it): say so, do not hide it
                short = acked
            elif int(acked) < self.min_replicas:
                short = NotReplicated(int(acked), self.min_replicas, self.replica_timeout_ms)
        if asked is not None and any(asked):   # drop the ASKINGs' replies
            it = iter(results)
            results = [next(it) if not a else (next(it), next(it))[1] for a in asked]
        again: list[_Call] = []
        elsewhere: list[_Call] = []
        later: list[_Call] = []
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue
            if short is None and not isinstance(result, Exception):   # the usual answer: no refusal to look at
                call.future.set_result(result)
            elif short is not None and call.replicated and not isinstance(result, Exception):
                call.future.set_exception(short)
            elif isinstance(result, NoScriptError) and call.script is not None:
                self.shas.pop(call.script, None)
                again.append(call)
            elif self.router is not None and (hop := nodes.redirect(result)) is not None and self._redirect(call, hop):
                (later if hop[0] == "TRYAGAIN" else elsewhere).append(call)
            elif isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)
        if elsewhere:
            self._send(elsewhere, reloads)
        if later:
            asyncio.get_running_loop().call_later(nodes.TRYAGAIN_WAIT_S, self._send, later, reloads)
        if not again:
            return
        if reloads:   # Redis forgot the script (a restart, SCRIPT FLUSH): those did not run; load it, send them again
            where = line.redis if self.router is not None and line is not None else None
            task = asyncio.get_running_loop().create_task(self._load_then_send(again, reloads - 1, where))
            self.loading.add(task)
            task.add_done_callback(self.loading.discard)
        else:
            _fail(again, NoScriptError("script not loaded, twice"))

    def _redirect(self, call: _Call, hop: tuple[str, int, str]) -> bool:
        """Note a Cluster's redirect on `call`; False when its bound is spent (the refusal is then its answer)."""
        assert self.router is not None
        kind, slot, node = hop
        self.router.redirects[kind] += 1
        if kind == "TRYAGAIN":
            # A call whose keys are half-migrated goes source -> ASK -> target -> TRYAGAIN -> source again for as long
            # as the migration lasts (a key it names that exists nowhere, e.g. the split outside a rollout, keeps the
            # target answering TRYAGAIN): those ASKs are one wait, bounded by TRYAGAIN_TRIES, not new redirects.
            call.waits += 1
            call.redirects = 0
            return call.waits <= nodes.TRYAGAIN_TRIES
        call.redirects += 1
        if call.redirects > nodes.MAX_REDIRECTS:
            return False
        if kind == "MOVED":
            self.router.moved(slot, node)
        else:
            call.ask = node
        return True

    async def close(self) -> None:
        for task in list(self.loading):
            task.cancel()
        for line in [self.line, *self.lines.values()]:
            if line is not None:
                await line.close()


def _fail(batch: list[_Call], error: BaseException) -> None:
    for call in batch:
        if not call.future.done():
            call.future.set_exception(error)
