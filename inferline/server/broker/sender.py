"""A worker's replies and acknowledgements: `Sender` writes a batch's replies, each gateway's on its reply stream, then
acknowledges and deletes the answered entries on the model's request streams (and counts a rollout's answers).
Gateways read the replies with replies.py.

Ordering rules that keep work from being lost: an entry is XDEL'd only after it is XACK'd (XCLAIM and
XAUTOCLAIM skip pending ids whose entries are gone), and only after its reply was sent (a crash in
between redelivers instead of dropping).

Durable enqueue (broker.min_replicas_ack, `Durable` here): a failover can lose the last acknowledgements (Redis
replicates asynchronously), and the promoted replica delivers those entries again. So each send writes, in order on
one connection: the replies, the answered entries' ids (keys.answered), a WAIT for the replicas, then the ack. After
a failover the replica then holds the ids of every entry whose ack it may lack but whose WAIT returned, and a worker
that reads or claims such an entry acknowledges it without running it (`Sender.unanswered`: one ZMSCORE per read,
only in this mode). A failover that cuts between a reply and its id's replication runs that entry again: the gateway
ignores the second reply, so the caller is still answered once. Entry ids, not request ids: a client that retries a
503 ("not replicated") with the same x-request-id makes a new entry, which must run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from inferline.server.broker import fleet, keys, nodes, roundtrip
from inferline.server.broker.client import Redis
from inferline.server.broker.delivery import Delivery
from inferline.server.broker.pipelined import MAX_UNANSWERED, Pipelined
from inferline.server.broker.ticks import TickBatcher
from inferline.server.protocol import Reply, pack_replies

log = logging.getLogger(__name__)

# A gateway's reply stream is trimmed to about this many entries by the workers' XADDs (one entry per gateway per
# send): a gateway that stopped reading cannot grow it without bound.
REPLY_MAXLEN = 100_000

# On a Cluster, the ack of a send whose replies went to another node waits until they ran (module docstring of
# `_send_routed`), then rides the next read's round trip (the read's node is the request stream's) rather than costing
# a round trip of its own: under load the next read comes within a batch. Past this wait it goes on its own; the bound
# on how long an answered entry stays pending before it is acknowledged.
ACK_WAIT_S = 0.01


# Acknowledge and delete answered entries, and count their payload bytes off the model's queued-bytes counter (the
# enqueue script, enqueue.py, counted them on): only an entry this XDEL removed is counted off, so a second answer to a
# redelivered request subtracts nothing. KEYS: request stream, its byte counter. ARGV: group, then (entry id, payload
# bytes) pairs. Sent as EVAL on the pipelined connection (EVALSHA's NOSCRIPT could not be retried there; the script
# text is ~400 bytes a send, not a request).
_ACK = """
local gone = 0
for i = 2, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then gone = gone + tonumber(ARGV[i + 1]) end
end
if gone > 0 and redis.call('DECRBY', KEYS[2], gone) < 0 then redis.call('SET', KEYS[2], 0) end
return gone
"""

# The same with Redis 8.2's XACKDEL (acknowledge and delete, one command for all the ids), where the server has it
# (`Sender.detect`): its answer per id is 1 when the entry was deleted, so the bytes are counted off as above. A
# server without it (an older replica promoted, a downgrade after the worker asked) refuses it without running it:
# then the pair, as in _ACK.
_ACKDEL = """
local ids = {}
for i = 2, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
local done = redis.pcall('XACKDEL', KEYS[1], ARGV[1], 'IDS', #ids, unpack(ids))
local gone = 0
if done.err then
  for i = 2, #ARGV, 2 do
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then gone = gone + tonumber(ARGV[i + 1]) end
  end
else
  for j = 1, #done do
    if done[j] == 1 then gone = gone + tonumber(ARGV[2 * j + 1]) end
  end
end
if gone > 0 and redis.call('DECRBY', KEYS[2], gone) < 0 then redis.call('SET', KEYS[2], 0) end
return gone
"""

# The answered ids of one send (KEYS: keys.answered). ARGV: how long (ms) to keep ids, then the entry ids. Trimmed by
# Redis's clock, the one entry ids come from.
_MARK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
return 0
"""


@dataclass(frozen=True, slots=True)
class Durable:
    """Durable enqueue's worker side (broker.min_replicas_ack > 0): WAIT for min_replicas (timeout_ms) before each
    ack, and keep answered entry ids keep_ms (the model's timeout: after it nobody waits for a second answer)."""

    min_replicas: int
    timeout_ms: int
    keep_ms: int



# The rollout guard, sent with the replies of either version of a rollout (a worker learns it is in one from
# keys.routing at start and with each heartbeat): counts the version's answers and failures, and for the new version
# (`b`) while its window is open (`limit` set) the moment its failures pass the limit sets the split's share back to 0
# and says why, in the same step, so no further request goes to it (the requests already on its lane are still
# answered by it). One EVAL more per batch, during a rollout only. KEYS: keys.guard_keys. ARGV: version, answers,
# failures.
_GUARD = """
local req = redis.call('HINCRBY', KEYS[1], 'requests', ARGV[2])
local fail = redis.call('HINCRBY', KEYS[1], 'failures', ARGV[3])
if tonumber(ARGV[3]) > 0 then
  local r = redis.call('HMGET', KEYS[2], 'b', 'limit', 'share')
  if r[1] == ARGV[1] and r[2] and fail > tonumber(r[2]) and tonumber(r[3] or '0') > 0 then
    redis.call('HSET', KEYS[2], 'share', 0, 'tripped', fail .. ' failed of its first ' .. req ..
               ' answers, over the limit of ' .. r[2])
  end
end
return fail
"""
# Answers that count against a version in a rollout: the worker's own failures, not the caller's (bad input, a
# deadline passed in the queue, a caller gone).
FAILURES = frozenset({"internal", "generation", "dead_letter"})


class Sender:
    """The replies and acks of one worker of a model: on one Redis written on one pipelined connection, in order; on a
    Cluster through a TickBatcher's per-node connections (`_send_routed`)."""

    def __init__(self, redis: Redis, model: str, version: str = "", label: str = "", *,
                 durable: Durable | None = None) -> None:
        """version: the store version this worker serves ("": none); label: the version its answers name
        (x-model-version). durable: mark answered entries and WAIT for replicas before each ack (module docstring);
        None: the default path, no extra command."""
        self.redis = redis
        self.model = model
        self.version = version
        self.label = label
        self.durable = durable
        self.skipped = 0   # deliveries found answered already (durable mode), for tests and logs
        self.stream = keys.request_stream(model)
        # Replies and acks: on one Redis one pipelined connection; on a Cluster the reply streams and the request
        # stream live on different nodes, so they go through a TickBatcher's per-node connections (`_send_routed`).
        self.pipelined = None if isinstance(redis, nodes.Cluster) else Pipelined(redis)
        self.batcher = (TickBatcher(redis, *((durable.min_replicas, durable.timeout_ms) if durable else ()))
                        if isinstance(redis, nodes.Cluster) else None)
        self.sending: set[asyncio.Future[list[Any]]] = set()   # a Cluster's sends not yet done
        self.guarded = False   # this version is in a rollout: its answers are counted (watch_rollout)
        self.ack_script = _ACK   # _ACKDEL once `detect` found XACKDEL
        self._detected = False
        # A Cluster's acks whose replies ran on another node (`_send_routed`): they go in the next read's round trip
        # (the read's connection is the request stream's node: `ack_with`), or on their own after ACK_WAIT_S. Each:
        # (the acks, the send's future, the replies' results). At most MAX_UNANSWERED (the sends in flight).
        self._due: list[tuple[list[tuple[str, list[Any]]], asyncio.Future[list[Any]], list[Any]]] = []
        self._due_timer: asyncio.TimerHandle | None = None

    async def detect(self) -> None:
        """Use XACKDEL for the acks where the server has it (Redis 8.2+), asked once: an XACKDEL of no entry on the
        request stream (it acknowledges and deletes nothing; a server without it refuses it). Until asked, and
        where it is refused, XACK + XDEL. Called by ModelQueue.ensure_group, after the group exists."""
        if self._detected:
            return
        client: Any = self.redis
        if (router := nodes.router_of(client)) is not None:   # the stream's node: RedisCluster itself refuses an
            await router.ensure()                              # unknown command before any node is asked
            client = router.client(router.node_of(self.stream))
        try:
            await client.execute_command("XACKDEL", self.stream, keys.GROUP, "IDS", 1, "0-1")
            self.ack_script = _ACKDEL
        except ResponseError:   # unknown command (before Redis 8.2, Valkey 8), or denied by an ACL
            self.ack_script = _ACK
        self._detected = True

    @property
    def due(self) -> bool:
        """Acks wait for the next read (`ack_with`)."""
        return bool(self._due)

    async def watch_rollout(self) -> None:
        """Whether this worker's version is one of a rollout's two (keys.routing): its answers and failures are then
        counted for the rollout's status, and the new version's go through the guard. Called at start and with
        every heartbeat. Raises redis errors."""
        if self.version:
            lanes = await self.redis.hmget(keys.routing(self.model), ["a", "b"])  # type: ignore[misc]
            self.guarded = self.version in {fleet.text(v) for v in lanes if v is not None}

    async def reply_and_ack(self, replies: Sequence[tuple[str, Reply]], deliveries: Sequence[Delivery]) -> None:
        """send(), then wait until Redis ran it. Raises the connection's error or Redis's refusal."""
        sent = await self.send(replies, deliveries)
        if sent is not None:
            await sent

    async def send(self, replies: Sequence[tuple[str, Reply]],
                   deliveries: Sequence[Delivery]) -> asyncio.Future[list[Any]] | None:
        """Replies first, then acknowledge and delete: written at once on the queue's pipelined connection, the
        future done when Redis ran them (or failed with why not; None when there was nothing to send). Redis runs
        one connection's commands in order, so an ack never lands before its reply, and a send never waits for the
        last one's answer; if the connection breaks in between, the entry stays pending and is redelivered (the
        gateway ignores a second reply). Waits only while too many sends are unanswered."""
        if not replies and not deliveries:
            return None
        by_gateway: dict[str, list[Reply]] = {}
        for reply_to, reply in replies:
            by_gateway.setdefault(reply_to, []).append(reply)
        # One entry per gateway, however many replies. The XADD makes the stream if Redis lost it (a restart,
        # FLUSHALL, a Cluster failover that lost the last writes), and the EXPIRE bounds it if its gateway is gone
        # for good: the enqueue script no longer makes it (it hashes to another slot than the request stream).
        # The pack names the version that answered (x-model-version): one field per send, not per reply.
        commands: list[Sequence[Any]] = []
        version = ("v", self.label) if self.label else ()
        for reply_to, batch in by_gateway.items():
            commands.append(("XADD", reply_to, "MAXLEN", "~", REPLY_MAXLEN, "*", "pack", pack_replies(batch),
                             *version))
            commands.append(("EXPIRE", reply_to, keys.REPLY_STREAM_TTL_S))
        # The model's node: each stream's ack (each entry on its own stream: version and priority lane), then the
        # rollout's guard (a version in a rollout counts its answers and failures there): (script, its keys then
        # argv), two keys each.
        acks: list[tuple[str, list[Any]]] = []
        for lane in dict.fromkeys((d.lane, d.priority) for d in deliveries):
            pairs = [x for d in deliveries if (d.lane, d.priority) == lane for x in (d.entry_id, len(d.payload))]
            acks.append((self.ack_script, [*keys.ack_keys(self.model, *lane), keys.GROUP, *pairs]))
        if self.guarded:
            final = [r for _, r in replies if r.final or not r.ok]
            failed = sum(1 for r in final if r.error_type in FAILURES)
            if final:
                acks.append((_GUARD, [*keys.guard_keys(self.model, self.version), self.version, len(final), failed]))
        marks = [keys.answered(self.model), self.durable.keep_ms, *[d.entry_id for d in deliveries]] \
            if self.durable is not None and deliveries else []
        if self.pipelined is None:
            return await self._send_routed(commands, acks, marks)
        if marks:   # the ids reach the replicas before the ack can (module docstring)
            commands.append(("EVAL", _MARK, 1, *marks))
            commands.append(("WAIT", self.durable.min_replicas, self.durable.timeout_ms))  # type: ignore[union-attr]
        commands += [("EVAL", script, 2, *args) for script, args in acks]
        await self.pipelined.wait_for_room()
        return self.pipelined.send(commands, refusal_fails=True)

    async def _send_routed(self, commands: list[Sequence[Any]], acks: list[tuple[str, list[Any]]],
                           marks: list[Any]) -> asyncio.Future[list[Any]]:
        """send() on a Cluster: the replies are written at once, each to the node of its gateway's stream, and the
        ack only once they all ran (on another node, nothing would order it after them: an ack that landed first,
        then a reply lost with its node, would lose the request); it is then written before the next read, on the
        read's connection (to the request stream's node), or on its own after ACK_WAIT_S. The future: done when the
        ack ran, failed with
        the first refusal or connection error (then nothing is acked: the entries are redelivered). At most
        MAX_UNANSWERED sends in flight; past that it waits for one to end. Durable mode: the answered ids (`marks`,
        the mark script's KEYS and ARGV) go to the model's node after the replies ran, with its WAIT (the batcher's
        replicated call), and the ack after them, whatever the WAIT found (the replies are out: only its timeout
        is spent)."""
        assert self.batcher is not None and self.batcher.router is not None
        batcher, router = self.batcher, self.batcher.router
        while len(self.sending) >= MAX_UNANSWERED:
            await asyncio.wait(self.sending, return_when=asyncio.FIRST_COMPLETED)
        await router.ensure()   # before anything is submitted: the calls below must go out in one tick
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()
        written = asyncio.gather(*(batcher.submit(None, command) for command in commands))
        home = router.node_of(self.stream)
        if acks and not marks and all(router.node_of(command[1]) == home for command in commands):
            # Every reply stream lives on the request stream's node: the batcher writes the tick's calls to one node
            # in the order submitted, on one connection, so the ack goes in the same write, after the replies (one
            # round trip, as on one Redis; waiting cost a second write per batch: +25-50 % of the worker's broker
            # CPU per request, bench/bench_broker_calls.py). Not in durable mode: its WAIT must come before the ack.
            acked = asyncio.gather(*(batcher.submit(script, args, 2) for script, args in acks))
            batcher.flush()
            both = asyncio.gather(written, acked)
            both.add_done_callback(lambda both: _chain(both, done, lambda pair: _after(*pair)))
            self.sending.add(done)
            done.add_done_callback(self.sending.discard)
            return done

        def then_ack(written: asyncio.Future[list[Any]]) -> None:
            if written.cancelled() or written.exception() is not None:
                if not done.done():
                    done.set_exception(written.exception() or RuntimeError("send cancelled"))
                return
            if not acks:
                done.set_result(written.result())
                return
            self._due.append((acks, done, written.result()))
            if self._due_timer is None:
                self._due_timer = loop.call_later(ACK_WAIT_S, self._ack_due)

        def then_mark(written: asyncio.Future[list[Any]]) -> None:
            if written.cancelled() or written.exception() is not None:
                then_ack(written)
                return
            marked = batcher.submit(_MARK, marks, 1, replicated=True)
            marked.add_done_callback(lambda marked: then_ack(written))

        batcher.flush()
        written.add_done_callback(then_mark if marks else then_ack)
        self.sending.add(done)
        done.add_done_callback(self.sending.discard)
        return done

    async def ack_with(self, reads: roundtrip.HeldConnection, read: Sequence[Any]) -> Any:
        """The acks due, then `read`, in one round trip on `reads` (a held connection to the request stream's node:
        the reader's): the read's raw reply. Each send is done with its acks' replies, or failed with the first
        refusal or the connection's error (then its entries stay pending on this consumer: the worker claims them
        back, worker/shell.py)."""
        due = self._take_due()
        commands = [("EVAL", script, 2, *args) for acks, _, _ in due for script, args in acks]
        try:
            *acked, res = await reads.run([*commands, read])
        except BaseException as exc:
            for _, done, _ in due:
                if not done.done():
                    done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("send cancelled"))
            raise
        at = 0
        for acks, done, written in due:
            mine, at = acked[at:at + len(acks)], at + len(acks)
            refused = next((r for r in mine if isinstance(r, Exception)), None)
            if done.done():
                continue
            if refused is not None:
                done.set_exception(refused)
            else:
                done.set_result([*written, *mine])
        return res

    def _take_due(self) -> list[tuple[list[tuple[str, list[Any]]], asyncio.Future[list[Any]], list[Any]]]:
        due, self._due = self._due, []
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        return due

    def _ack_due(self) -> None:
        """Send the acks due on their own (no read came within ACK_WAIT_S, or the pending list is to be read)."""
        assert self.batcher is not None
        for acks, done, written in self._take_due():
            acked = asyncio.gather(*(self.batcher.submit(script, args, 2) for script, args in acks))
            prefixed: Callable[[list[Any]], list[Any]] = functools.partial(_after, written)
            acked.add_done_callback(functools.partial(_chain, done=done, results=prefixed))

    async def drain(self) -> None:
        """Wait until everything sent is run by Redis, or failed."""
        if self._due:
            self._ack_due()
        if self.pipelined is not None:
            await self.pipelined.drain()
        elif self.sending:
            await asyncio.wait(list(self.sending))

    async def close(self) -> None:
        """Wait for what was sent, then let the pipelined connections go."""
        await self.drain()
        if self.pipelined is not None:
            await self.pipelined.close()
        if self.batcher is not None:
            await self.batcher.close()


    async def unanswered(self, deliveries: list[Delivery]) -> list[Delivery]:
        """In durable mode, the deliveries not answered already; the answered ones (a failover lost their ack) are
        acknowledged and deleted here, without a reply (their caller had one). Otherwise all of them, at no cost."""
        if self.durable is None or not deliveries:
            return deliveries
        scores: Any = await self.redis.execute_command("ZMSCORE", keys.answered(self.model),
                                                       *[d.entry_id for d in deliveries])
        done = [d for d, score in zip(deliveries, scores, strict=True) if score is not None]
        if not done:
            return deliveries
        self.skipped += len(done)
        log.warning("answered already model=%s n=%d (delivered again after a failover)", self.model, len(done))
        await self.reply_and_ack([], done)
        return [d for d, score in zip(deliveries, scores, strict=True) if score is None]


def _chain(source: asyncio.Future[Any], done: asyncio.Future[list[Any]],
           results: Callable[[Any], list[Any]]) -> None:
    """Settle a send's `done` from the future its last step ran in: its error, or results(its result)."""
    if done.done():
        return
    if source.cancelled():
        done.set_exception(RuntimeError("send cancelled"))
    elif (error := source.exception()) is not None:
        done.set_exception(error)
    else:
        done.set_result(results(source.result()))


def _after(written: list[Any], acked: list[Any]) -> list[Any]:
    return [*written, *acked]
