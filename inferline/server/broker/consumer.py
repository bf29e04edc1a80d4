"""A worker's side of a model's request stream: `ModelQueue` reads with the consumer group, replies, acknowledges and
deletes, reclaims work left pending by a dead worker, and dead-letters what keeps failing; `Delivery` is one request
as a worker received it. Gateways put requests on the stream with enqueue.py and read the replies with replies.py.

Ordering rules that keep work from being lost: an entry is XDEL'd only after it is XACK'd (XCLAIM and
XAUTOCLAIM skip pending ids whose entries are gone), and only after its reply was sent (a crash in
between redelivers instead of dropping).

Durable enqueue (broker.min_replicas_ack, `Durable` here): a failover can lose the last acknowledgements (Redis
replicates asynchronously), and the promoted replica delivers those entries again. So each send writes, in order on
one connection: the replies, the answered entries' ids (keys.answered), a WAIT for the replicas, then the ack. After
a failover the replica then holds the ids of every entry whose ack it may lack but whose WAIT returned, and a worker
that reads or claims such an entry acknowledges it without running it (one ZMSCORE per read, only in this mode). A
failover that cuts between a reply and its id's replication runs that entry again: the gateway ignores the second
reply, so the caller is still answered once. Entry ids, not request ids: a client that retries a 503 ("not
replicated") with the same x-request-id makes a new entry, which must run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from inferline.server.broker import deadletters, fleet, keys, nodes, roundtrip
from inferline.server.broker.client import Redis
from inferline.server.broker.pipelined import MAX_UNANSWERED, Pipelined
from inferline.server.broker.reads import streams_entries
from inferline.server.broker.ticks import TickBatcher
from inferline.server.errors import DeadLettered
from inferline.server.protocol import PAYLOAD_FIELD, Envelope, Reply, pack_replies

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


OrphanPosition = tuple[int, bytes | None] | None   # (index of the stream in ModelQueue.by_lane, last id seen there)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request as a worker received it."""

    entry_id: bytes
    envelope: Envelope
    payload: bytes
    tries: int = 1
    lane: str = ""   # the version whose lane it came from ("": the model's common stream)
    priority: str = "normal"   # the priority lane (keys.PRIORITY_LANES) of that stream

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    @property
    def arrived_ms(self) -> int:
        """When the entry reached the stream: its id's time part, Redis's clock (epoch ms)."""
        return int(self.entry_id.split(b"-", 1)[0])



class ModelQueue:
    """A worker's view of one model's request streams: the common one and, for a worker that knows its version, that
    version's lane (keys.request_stream), each in its priority lanes (keys.PRIORITY_LANES); one consumer group on each
    stream, each entry acknowledged on its own stream.

    Priority, and its bound on waiting: a read takes from the priorities in order (high, normal, low; each one's
    streams, common and version, in one XREADGROUP) until it has `count` entries, so a batch is filled from the
    highest lanes; every LOWER_FIRST_EVERY-th read takes from the lowest first. So while higher lanes keep every batch
    full, a `low` request at the head of its lane is taken within LOWER_FIRST_EVERY reads of one worker (4 batches,
    or 4 admissions of a generation worker), never starved; behind other `low` requests it waits for those too, at a
    quarter of the worker's batches at least."""

    LOWER_FIRST_EVERY = 4

    def __init__(self, redis: Redis, model: str, consumer: str, version: str = "", label: str = "", *,
                 durable: Durable | None = None) -> None:
        """version: the store version whose lane this worker reads beside the common stream ("": none). label: the
        version its answers name (x-model-version), default `version` (a model without store versions has a label,
        its class's own version, and no lane). durable: de-duplicate redelivered entries (module docstring); None:
        the default path, no extra command."""
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.version = version
        self.label = label or version
        self.durable = durable
        self.skipped = 0   # deliveries found answered already (durable mode), for tests and logs
        self.stream = keys.request_stream(model)
        self.lanes = ["", version] if version else [""]          # the versions it reads: "" is the common stream
        # every (version, priority) stream it reads, highest priority first, the common stream before the version's
        self.by_lane = {(v, p): keys.request_stream(model, v, p) for p in keys.PRIORITY_LANES for v in self.lanes}
        self.streams = list(self.by_lane.values())
        self._lane_of = {name.encode(): lane for lane, name in self.by_lane.items()}
        self.reads = roundtrip.HeldConnection(redis, self.stream)   # XREADGROUP (all lanes: one slot, one node)
        # Replies and acks: on one Redis one pipelined connection; on a Cluster the reply streams and the request
        # stream live on different nodes, so they go through a TickBatcher's per-node connections (`_send_routed`).
        self.pipelined = None if isinstance(redis, nodes.Cluster) else Pipelined(redis)
        self.batcher = (TickBatcher(redis, *((durable.min_replicas, durable.timeout_ms) if durable else ()))
                        if isinstance(redis, nodes.Cluster) else None)
        self.sending: set[asyncio.Future[list[Any]]] = set()   # a Cluster's sends not yet done
        self.guarded = False   # this version is in a rollout: its answers are counted (watch_rollout)
        self._reads = 0
        # Entries a blocking read over all lanes brought beyond `count` (several lanes filled at once): merged into
        # the next read, highest lanes first. At most (lanes - 1) x count.
        self._spare: list[Delivery] = []
        self._backlog = False
        # A Cluster's acks whose replies ran on another node (`_send_routed`): they go in the next read's round trip
        # (the read's connection is the request stream's node), or on their own after ACK_WAIT_S. Each: (the acks,
        # the send's future, the replies' results). At most MAX_UNANSWERED (the sends in flight).
        self._due: list[tuple[list[tuple[str, list[Any]]], asyncio.Future[list[Any]], list[Any]]] = []
        self._due_timer: asyncio.TimerHandle | None = None

    async def ensure_group(self) -> None:
        """Create the streams and their consumer group if missing (idempotent, safe across replicas)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def watch_rollout(self) -> None:
        """Whether this worker's version is one of a rollout's two (keys.routing): its answers and failures are then
        counted for the rollout's status, and the new version's go through the guard. Called at start and with
        every heartbeat. Raises redis errors."""
        if self.version:
            lanes = await self.redis.hmget(keys.routing(self.model), ["a", "b"])  # type: ignore[misc]
            self.guarded = self.version in {fleet.text(v) for v in lanes if v is not None}

    async def read(self, count: int, block_s: float | None) -> list[Delivery]:
        """Up to `count` new entries for this consumer, from the priority lanes in order (class docstring), waiting
        up to block_s for the first when every stream is empty. block_s None: do not block.

        While there is a backlog (the last read filled its batch) each priority is read in turn; otherwise one
        blocking read over all streams (it answers at once with what is there, highest lanes first): a lone request
        costs one read, as before lanes (three non-blocking reads ahead of it cost the worker ~+100 µs a request at
        c=1)."""
        got, self._spare = self._spare, []
        self._reads += 1
        if self._backlog or got or block_s is None:
            order = list(keys.PRIORITY_LANES)
            if self._reads % self.LOWER_FIRST_EVERY == 0:
                order.reverse()
            for priority in order:
                if len(got) >= count:
                    break
                got += await self._read([priority], count - len(got), None)
        if not got and block_s is not None:
            got = await self._read(list(keys.PRIORITY_LANES), count, block_s)
        got.sort(key=lambda d: _RANK[d.priority])
        got, self._spare = got[:count], got[count:]
        self._backlog = len(got) >= count
        return got

    async def _read(self, priorities: list[str], count: int, block_s: float | None) -> list[Delivery]:
        streams = [self.by_lane[(v, p)] for p in priorities for v in self.lanes]
        block = () if block_s is None else ("BLOCK", max(1, int(block_s * 1000)))
        read = ("XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", count, *block,
                "STREAMS", *streams, *(">",) * len(streams))
        if self._due:   # a Cluster's acks that wait for a read: written before it, on its connection
            res = await self._read_and_ack(read)
        else:
            [res] = await self.reads.run([read])
        if isinstance(res, ResponseError):
            await self._recreate_on_nogroup(res)   # the stream was deleted under us (e.g. FLUSHALL): start over
            return []
        found = [parse_entry(eid, fields, 1, *self._lane_of[name])
                 for name, entries in streams_entries(res) for eid, fields in entries]
        return await self._unanswered(found)

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
            acks.append((_ACK, [*keys.ack_keys(self.model, *lane), keys.GROUP, *pairs]))
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
            both = asyncio.gather(written, acked)
            both.add_done_callback(lambda both: _chain_both(both, done))
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

        written.add_done_callback(then_mark if marks else then_ack)
        self.sending.add(done)
        done.add_done_callback(self.sending.discard)
        return done

    async def _read_and_ack(self, read: tuple[Any, ...]) -> Any:
        """The acks due, then `read`, in one round trip on the read's connection: the read's raw reply. Each send is
        done with its acks' replies, or failed with the first refusal or the connection's error (then its entries
        stay pending on this consumer: the worker claims them back, worker/shell.py)."""
        due = self._take_due()
        commands = [("EVAL", script, 2, *args) for acks, _, _ in due for script, args in acks]
        try:
            *acked, res = await self.reads.run([*commands, read])
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
            acked.add_done_callback(functools.partial(_chain, done=done, written=written))

    async def drain(self) -> None:
        """Wait until everything sent is run by Redis, or failed."""
        if self._due:
            self._ack_due()
        if self.pipelined is not None:
            await self.pipelined.drain()
        elif self.sending:
            await asyncio.wait(list(self.sending))

    async def close(self) -> None:
        """Wait for what was sent, then let the pipelined connection go, and the one reads were held on."""
        await self.drain()
        if self.pipelined is not None:
            await self.pipelined.close()
        if self.batcher is not None:
            await self.batcher.close()
        await self.reads.close()

    async def reclaim(self, min_idle_ms: int, max_tries: int,
                      count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Take over entries left pending longer than min_idle_ms (their worker died or hung), on each of this
        worker's streams (at most `count` from each). Returns (claimed, exhausted): exhausted ones were already
        delivered max_tries times and must be dead-lettered, not run again."""
        return await self._claim_all(min_idle_ms, max_tries, count, None)

    async def claim_from(self, consumer: str, min_idle_ms: int, max_tries: int,
                         count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Take over the entries of one consumer (a worker whose heartbeat lapsed), as reclaim() does. min_idle_ms
        is kept above zero on purpose: the first claimer resets the idle time, so two workers claiming the same dead
        consumer's entries at once never both get one."""
        return await self._claim_all(min_idle_ms, max_tries, count, consumer)

    async def _claim_all(self, min_idle_ms: int, max_tries: int, count: int,
                         consumer: str | None) -> tuple[list[Delivery], list[Delivery]]:
        fresh: list[Delivery] = []
        exhausted: list[Delivery] = []
        for lane in self.by_lane:
            f, e = await self._claim(lane, min_idle_ms, max_tries, count, consumer)
            fresh += f
            exhausted += e
        return fresh, exhausted

    async def _claim(self, lane: tuple[str, str], min_idle_ms: int, max_tries: int, count: int,
                     consumer: str | None) -> tuple[list[Delivery], list[Delivery]]:
        stream = self.by_lane[lane]
        try:
            pending: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=count,
                                                           idle=min_idle_ms, consumername=consumer)
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)
            return [], []
        if not pending:
            return [], []
        tries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        # XCLAIM with the same min-idle: if another worker claimed one first, it is not returned twice.
        claimed: Any = await self.redis.xclaim(stream, keys.GROUP, self.consumer, min_idle_ms, list(tries))
        deleted = [eid for eid, fields in claimed if not fields]
        if deleted:   # entries deleted under the PEL (Redis 6.2 still lists them): clear them for good
            await self.redis.xack(stream, keys.GROUP, *deleted)
        # XCLAIM counted this delivery: the tries are the old count + 1.
        deliveries = [parse_entry(eid, f, tries[eid] + 1, *lane) for eid, f in claimed if f]
        deliveries = await self._unanswered(deliveries)
        fresh = [d for d in deliveries if d.tries <= max_tries]
        exhausted = [d for d in deliveries if d.tries > max_tries]
        if deliveries:   # counted now, in Redis: the worker that claimed them may die on the next one
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.stats(self.model), keys.STAT_RECLAIMED, len(deliveries))
                if fresh:
                    pipe.hincrby(keys.stats(self.model), keys.STAT_REDELIVERED, len(fresh))
                await pipe.execute()
        return fresh, exhausted

    async def orphans(self, held: Container[bytes], count: int,
                      after: OrphanPosition = None) -> tuple[list[Delivery], OrphanPosition]:
        """Entries Redis delivered to this consumer that its worker does not hold: a blocking read that Redis answered
        but whose answer the worker never read (it stalled past the socket timeout, SIGSTOP or a long pause, and the
        read failed), or a send that failed (after a failover the promoted replica has the entry pending here).
        Claimed again by this consumer, so their idle time restarts and their delivery count stays what it was (they
        never ran). Looks at one page of `count` pending entries of one of its streams (`by_lane`'s order), from the
        position `after` (None: the first stream's start); returns (what it claimed, the position to go on from, or
        None once every stream's pending list was read to its end). The page, not what was claimed, says whether
        there is more: held entries (and those read but not handed out yet) are skipped, and in durable mode the
        answered ones are acknowledged, not returned, so a page can yield nothing while more wait behind it. Call it
        only while no read of this consumer is in flight: that read's entries would look orphaned too."""
        if self._due:   # answered entries whose acks wait for a read are not orphans: ack them first
            await self.drain()
        index, last = after if after is not None else (0, None)
        lanes = list(self.by_lane)
        while True:   # a stream whose pending list ends short of a page: on to the next one in the same call
            found, last = await self._orphan_page(lanes[index], last, held, count)
            if last is not None:
                return found, (index, last)
            if index + 1 == len(lanes):
                return found, None
            index += 1
            if found:
                return found, (index, None)

    async def _orphan_page(self, lane: tuple[str, str], last: bytes | None, held: Container[bytes],
                           count: int) -> tuple[list[Delivery], bytes | None]:
        """One page of orphans() on one stream: what it claimed, and the last id seen when the page was full."""
        stream = self.by_lane[lane]
        spare = {d.entry_id for d in self._spare}   # read, not yet handed out: not orphans
        try:
            pending: Any = await self.redis.xpending_range(stream, keys.GROUP,
                                                           min="-" if last is None else b"(" + last, max="+",
                                                           count=count, consumername=self.consumer)
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)
            return [], None
        by_tries: dict[int, list[Any]] = {}   # one XCLAIM per delivery count, to keep each entry's (usually one)
        for p in pending:
            if p["message_id"] not in held and p["message_id"] not in spare:
                by_tries.setdefault(int(p["times_delivered"]), []).append(p["message_id"])
        found: list[Delivery] = []
        for tries, ids in by_tries.items():
            claimed: Any = await self.redis.xclaim(stream, keys.GROUP, self.consumer, 0, ids, retrycount=tries)
            found += await self._unanswered([parse_entry(eid, f, tries, *lane) for eid, f in claimed if f])
            deleted = [eid for eid, f in claimed if not f]
            if deleted:   # entries deleted under the PEL: clear them for good
                await self.redis.xack(stream, keys.GROUP, *deleted)
        return found, (pending[-1]["message_id"] if len(pending) == count else None)

    async def _unanswered(self, deliveries: list[Delivery]) -> list[Delivery]:
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

    async def consumers(self) -> list[str]:
        """The names of the consumers other than this one (worker ids) in the group of any of its streams."""
        names: list[str] = []
        for stream in self.streams:
            try:
                found: Any = await self.redis.xinfo_consumers(stream, keys.GROUP)
            except ResponseError as exc:
                await self._recreate_on_nogroup(exc)
                continue
            for c in found:
                n = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
                if n != self.consumer and n not in names:
                    names.append(n)
        return names

    async def remove_consumer(self, consumer: str) -> bool:
        """Remove a dead worker's consumer from the groups of this worker's streams once nothing is pending on it
        there (XGROUP DELCONSUMER would drop what is). True when it was removed from all of them."""
        removed = True
        for stream in self.streams:
            try:
                left: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=1,
                                                            consumername=consumer)
                if left:
                    removed = False
                    continue
                await self.redis.xgroup_delconsumer(stream, keys.GROUP, consumer)
            except ResponseError as exc:
                await self._recreate_on_nogroup(exc)
                removed = False
        return removed

    async def refresh_claims(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of entries this worker still works on, so no other worker reclaims live work. Also
        proves the groups are there: Redis lost one (restart, FLUSHALL) -> it is recreated here, on the spot."""
        for lane, stream in self.by_lane.items():
            ids: list[Any] = [d.entry_id for d in deliveries if (d.lane, d.priority) == lane]
            try:
                if ids:
                    await self.redis.xclaim(stream, keys.GROUP, self.consumer, 0, ids, justid=True)
                else:
                    groups: Any = await self.redis.xinfo_groups(stream)
                    if not any(g["name"] in (keys.GROUP, keys.GROUP.encode()) for g in groups):
                        await self.ensure_group()   # the stream is back (an enqueue made it) but not its group
            except ResponseError as exc:
                await self._recreate_on_nogroup(exc)

    async def _recreate_on_nogroup(self, exc: ResponseError) -> None:
        """Redis lost the stream or its group (a restart without persistence, FLUSHALL): make them again here, on
        the spot, rather than failing the same call every round. Redis 7 also ends a blocked group read with
        UNBLOCKED when its stream is deleted: FLUSHALL, or on a Cluster the stream migrated to another node (then
        ensure_group finds it there, and the next read follows the redirect at once, where a failed read would
        have held the worker back a second). Other errors are raised."""
        text = str(exc)
        if "NOGROUP" not in text and "no such key" not in text.lower() and not text.startswith("UNBLOCKED"):
            raise exc
        await self.ensure_group()

    async def dead_letter(self, deliveries: Sequence[Delivery], reason: str) -> None:
        """Move deliveries to the dead-letter stream (their metadata, and their payload for a replay when small:
        deadletters.py), answer them (not to be retried), ack and delete."""
        if not deliveries:
            return
        rows = [(d.request_id, d.entry_id, d.tries, d.envelope.op, d.payload) for d in deliveries]
        await self.redis.eval(deadletters.DEAD_LETTER, *deadletters.dead_letter_args(self.model, reason, rows))
        lanes = {d.lane for d in deliveries if d.lane}
        if lanes:   # a rollout's version counts its own dead letters
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in lanes:
                    pipe.hincrby(keys.version_stats(self.model, lane), "dead_lettered",
                                 sum(1 for d in deliveries if d.lane == lane))
                await pipe.execute()
        log.warning("dead-lettered model=%s n=%d reason=%s", self.model, len(deliveries), reason)
        await self.reply_and_ack([(d.envelope.reply_to, dead_letter_reply(d, reason)) for d in deliveries], deliveries)


_PAYLOAD = PAYLOAD_FIELD.encode()
_RANK = {lane: i for i, lane in enumerate(keys.PRIORITY_LANES)}


def _chain_both(both: asyncio.Future[Any], done: asyncio.Future[list[Any]]) -> None:
    if done.done():
        return
    if both.cancelled():
        done.set_exception(RuntimeError("send cancelled"))
    elif (error := both.exception()) is not None:
        done.set_exception(error)
    else:
        written, acked = both.result()
        done.set_result([*written, *acked])


def _chain(acked: asyncio.Future[Any], done: asyncio.Future[list[Any]], written: list[Any]) -> None:
    if done.done():
        return
    if acked.cancelled():
        done.set_exception(RuntimeError("send cancelled"))
    elif (error := acked.exception()) is not None:
        done.set_exception(error)
    else:
        done.set_result([*written, *acked.result()])


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes], tries: int, lane: str = "",
                priority: str = "normal") -> Delivery:
    """An entry as read (from the common stream, or the version `lane`'s; its `priority` lane). One without a payload
    (written by an
    older gateway, or by hand) gets an empty one, which fails to decode: that request alone is answered with an
    error and acknowledged, not retried."""
    return Delivery(entry_id, Envelope.from_fields(fields), fields.get(_PAYLOAD, b""), tries, lane, priority)


def dead_letter_reply(delivery: Delivery, reason: str) -> Reply:
    return Reply.error(delivery.request_id, DeadLettered(
        f"request {delivery.request_id} failed {delivery.tries - 1} times ({reason}) and was moved to the dead-letter "
        "stream"))

