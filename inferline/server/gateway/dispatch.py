"""Submit a request to a model's stream and await its reply by request id.

One reply stream per gateway process, read by one task that hands each reply to the coroutine waiting
for it. Queue at cap -> Overloaded (503 + Retry-After); Redis unreachable or hung (broker.timeout_s) ->
Unavailable (503); durable enqueue (broker.min_replicas_ack) and too few replicas had it in time ->
Unavailable (503 + Retry-After, "not replicated"); no live worker for the model -> Unavailable (503, at once: the
model's routes only);
deadline passed -> DeadlineExceeded (504); the worker's error replies come back as InferlineErrors of their type.
Every Redis call goes through the broker (server/broker/).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from inferline.server import priority
from inferline.server.broker import fleet, keys
from inferline.server.broker.cache import ResponseCache
from inferline.server.broker.cancels import publish_command
from inferline.server.broker.client import BROKER_ERRORS, Redis
from inferline.server.broker.enqueue import FULL_BYTES, Enqueuer, lane_cap
from inferline.server.broker.registry import Registry
from inferline.server.broker.replies import ReplyInbox
from inferline.server.broker.ticks import NotReplicated, TickBatcher
from inferline.server.config import ModelSpec, Settings
from inferline.server.errors import DeadlineExceeded, InferlineError, NotFound, Overloaded, Unavailable, typed
from inferline.server.gateway import record as records
from inferline.server.gateway.record import sane_id
from inferline.server.ids import new_id
from inferline.server.logs import RepeatingError
from inferline.server.metrics import GatewayMetrics
from inferline.server.protocol import OP_GENERATE, OP_PREDICT, OP_V2, Cancel, Envelope, Reply, encode_payload, now_ms
from inferline.server.tasks import cancel_and_wait

log = logging.getLogger(__name__)
# What a deployment's response cache keeps: the one-answer ops of models whose answer is their request's alone (the
# deployment's opt-in says so), here; and generation requests that are greedy or seeded, as their token events
# (gateway/generation.py). A generation model's one-answer ops are not kept: their parameters may sample.
CACHED_OPS = frozenset({OP_PREDICT, OP_V2})

TRIM_EVERY_S = 0.2
WATCH_EVERY_S = 0.5       # how often the gateway learns which models have live workers
RECHECK_DEAD_S = 0.25     # a model seen without workers is asked about again at most this often, on a request


class Dispatcher:
    def __init__(self, redis: Redis, settings: Settings, metrics: GatewayMetrics, registry: Registry,
                 batcher: TickBatcher | None = None) -> None:
        """registry: the gateway's one registry (which workers are live). batcher: the gateway's one TickBatcher,
        shared with the security layer (made here when None)."""
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.gateway_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.inbox = ReplyInbox(redis, self.gateway_id)
        self.reply_stream = self.inbox.stream
        self.batcher = batcher if batcher is not None else TickBatcher(
            redis, settings.broker.min_replicas_ack, settings.broker.replica_ack_timeout_ms)
        self.enqueuer = Enqueuer(redis, self.batcher)
        self.cache = ResponseCache(self.batcher)
        self.waiters: dict[str, asyncio.Future[Reply] | asyncio.Queue[Reply]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.registry = registry
        self.live: dict[str, int] = {}          # model -> workers beating, as last seen (absent: not known yet)
        # Models an operator scaled to zero replicas (keys.deployment): their requests wait in the queue for a
        # replica (until their deadline) instead of a 503 for having no live worker.
        self.parked: set[str] = set()
        # Models in a rollout: their enqueues follow the split in Redis (broker/enqueue.py); the rest skip reading it.
        self.split: set[str] = set()
        self.asked: dict[str, float] = {}       # model -> when a request last asked Redis about it
        self.asking: dict[str, asyncio.Future[int]] = {}
        self.timings: dict[str, tuple[Any, Any]] = {}   # model -> its (queue wait, compute) histogram children

    async def start(self) -> None:
        """Start reading replies. Does not wait for Redis: until it answers, requests get 503 or 504 and
        /readyz says why."""
        self.tasks = [asyncio.create_task(self._read_replies()), asyncio.create_task(self._keep_alive()),
                      asyncio.create_task(self._watch_workers())]

    async def stop(self) -> None:
        """End the background loops (within tasks.STOP_WITHIN_S even when a cancel is dropped, see tasks.py), then
        delete the reply stream."""
        await cancel_and_wait(self.tasks)
        await self.inbox.delete()
        await self.batcher.close()

    def spec(self, model: str) -> ModelSpec:
        spec = self.settings.models.get(model)
        if spec is None:
            raise NotFound(f"model {model!r} is not served here; served models: {sorted(self.settings.models)}",
                           field="model")
        return spec

    def task(self, task: str) -> ModelSpec:
        """The deployment bound to a task route. Raises NotFound when the configuration binds none."""
        spec = self.settings.deployment_for(task)
        if spec is None:
            raise NotFound(f"no model serves /{task} here: set task = \"{task}\" on a deployment", field="model")
        return spec

    def new_request_id(self, wanted: str | None = None) -> str:
        """The caller's x-request-id when it is sane and not already in flight, else a fresh one."""
        if wanted and sane_id(wanted) and wanted not in self.waiters:
            return wanted
        return new_id()

    async def _enqueue(self, spec: ModelSpec, request_id: str, op: str, payload: bytes) -> None:
        # Every request to a model has the model's timeout, so every entry older than that (and a grace) is
        # one nobody waits for: the enqueue trims those.
        # A deployment that scales to zero (autoscale.min_replicas = 0) takes requests with no worker: the request
        # waits on the stream, where the backlog wakes a worker (the autoscaler, or KEDA), within its deadline.
        if spec.autoscale.min_replicas > 0 and not await self.has_worker(spec.name):
            self.metrics.rejected.labels(spec.name, "no_worker").inc()
            raise Unavailable(f"model {spec.name} has no live worker; retry later")
        timeout_ms = int(spec.timeout_s * 1000)
        record = records.current.get()
        lane = priority.DEFAULT
        if record is not None:
            record.model = spec.name
            lane = record.priority = priority.clamp(record.asked or priority.DEFAULT, record.max_priority)
        envelope = Envelope(request_id, self.reply_stream, now_ms() + timeout_ms, op,
                            record.traceparent if record is not None else "")
        try:
            depth = await self.enqueuer.enqueue(spec.name, envelope, payload, spec.queue_cap,
                                                timeout_ms + keys.UNANSWERED_GRACE_MS, spec.queue_cap_bytes,
                                                spec.name in self.split, lane)
        except NotReplicated as exc:
            # Queued on the primary but not (yet) on enough replicas: a failover now could lose it, so it is not
            # accepted. It may still be served (the client retries; a worker answers one delivery once).
            self.metrics.rejected.labels(spec.name, "not_replicated").inc()
            raise Unavailable(f"request {request_id} was not replicated: it {exc} (broker.min_replicas_ack); it may "
                              "still run; retry later") from None
        except BROKER_ERRORS as exc:
            self.metrics.rejected.labels(spec.name, "redis").inc()
            raise Unavailable(f"the queue is unreachable: {type(exc).__name__}") from None
        if depth == FULL_BYTES:
            self.metrics.rejected.labels(spec.name, "queue_bytes").inc()
            raise Overloaded(f"model {spec.name} has too many bytes queued: this request's {len(payload)} would pass "
                             f"its queue_cap_bytes of {spec.queue_cap_bytes}; retry later")
        if depth < 0:
            self.metrics.rejected.labels(spec.name, "queue_full").inc()
            raise Overloaded(f"model {spec.name} has {lane_cap(spec.queue_cap, lane)} requests queued (what its "
                             f"queue_cap of {spec.queue_cap} admits at priority {lane}); retry later")

    def starting(self, model: str) -> str:
        """What a deadline's message adds when the model had no live worker (a deployment scaled to zero whose
        worker was still starting), from what the watcher saw last; else nothing."""
        if self.live.get(model, 1) > 0:
            return ""
        return ": the model was starting (no live worker yet; it had scaled to zero), retry later"

    async def has_worker(self, model: str) -> bool:
        """Whether some worker of the model beats, from what the watcher saw (no round trip on the hot path). A model
        seen without one is asked about again here (one question shared by the requests that arrive meanwhile, and
        not again for RECHECK_DEAD_S after a "no"), so a worker that just came up is used at once. Unknown (Redis
        away, not watched yet) counts as yes: the enqueue then decides."""
        if self.live.get(model, 1) > 0 or model in self.parked:
            return True
        asking = self.asking.get(model)
        if asking is None:
            now = time.monotonic()
            if now - self.asked.get(model, 0.0) < RECHECK_DEAD_S:
                return False
            self.asked[model] = now
            asking = self.asking[model] = asyncio.ensure_future(self._ask(model))
            asking.add_done_callback(lambda _: self.asking.pop(model, None))
        try:
            return await asyncio.shield(asking) > 0
        except BROKER_ERRORS:
            return True

    async def _ask(self, model: str) -> int:
        self.live[model] = (await self.registry.serving([model]))[model].live_workers
        return self.live[model]

    async def call(self, model: str, op: str, params: dict[str, Any] | bytes, blob: bytes | bytearray = b"",
                   request_id: str | None = None) -> Reply:
        """Queue one request and return its successful reply. Raises InferlineError for every failure.
        A bytearray blob (the hot path's request bodies) is emptied once encoded: while the request waits for its
        reply (up to the model's timeout) its body is in Redis only, not also in this process."""
        spec = self.spec(model)
        # Replies are matched by id: a caller's id that is already in flight (a client reusing one x-request-id)
        # must not take over the other request's waiter.
        request_id = self.new_request_id(request_id)
        timeout = spec.timeout_s
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self.waiters[request_id] = future
        # A timer rather than asyncio.timeout(): it showed up in profiles of the hot path.
        timer = loop.call_later(timeout, expire, future, request_id, model, timeout, self.starting)
        cached: tuple[str, str] | None = None   # (version, request hash) when the model's cache was asked and missed
        try:
            payload = encode_payload(params, blob)
            if isinstance(blob, bytearray):
                del blob[:]   # every frame that holds it now holds an empty buffer
            if spec.cache is not None and op in CACHED_OPS:   # the only cost on the hot path without a cache
                hit, cached = await self.look_up(spec, op, payload)
                if hit is not None:
                    return Reply(request_id, hit)
            await self._enqueue(spec, request_id, op, payload)
            del payload
            reply = await future
        finally:
            timer.cancel()
            self.waiters.pop(request_id, None)
        self.answered_by(reply)
        self.observe(spec.name, reply)
        if not reply.ok:
            raise reply_error(reply)
        if cached is not None:
            await self.keep(spec, cached, reply.body, reply.version)
        return reply

    async def replay(self, model: str, op: str, payload: bytes) -> tuple[str, Reply]:
        """Queue an already encoded payload (a dead letter's, kept by the broker) as a new request, under a new id,
        and await its first reply: (the new request id, the reply, ok or not). Raises InferlineError when it could
        not be queued or no reply came within the model's timeout."""
        spec = self.spec(model)
        request_id = new_id()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self.waiters[request_id] = future
        timer = loop.call_later(spec.timeout_s, expire, future, request_id, model, spec.timeout_s, self.starting)
        try:
            await self._enqueue(spec, request_id, op, payload)
            reply = await future
        finally:
            timer.cancel()
            self.waiters.pop(request_id, None)
        self.answered_by(reply)
        self.observe(spec.name, reply)
        return request_id, reply

    @staticmethod
    def answered_by(reply: Reply) -> None:
        """Name the version that answered on the request's record (the Edge's x-model-version header)."""
        if reply.version:
            record = records.current.get()
            if record is not None:
                record.version = reply.version

    async def look_up(self, spec: ModelSpec, op: str, request: bytes) -> tuple[bytes | None, tuple[str, str] | None]:
        """Ask the model's response cache (spec.cache must be set) for the answer to `request`: the canonical bytes
        of everything that changes the answer (a one-answer op's payload; a generation's parameters, keys sorted).
        Returns (the cached answer or None, (version, request hash) to keep the answer under with keep(), or None
        when it cannot be kept: no version published yet, Redis away, an op this model's kind does not cache). The
        version is the one the model's workers published (read at most INFO_TTL_S ago): answers are kept and found
        per version, and a hit names it (x-model-version). Sets the request's x-cache: "hit" only when every look-up
        of the request hit (an OpenAI request's choices are one each)."""
        record = records.current.get()
        try:
            info = await self.registry.info(spec.name)
            if info is None or (info.kind == "generation") != (op == OP_GENERATE):
                return None, None
            digest = hashlib.sha256(op.encode() + b"\0" + request).hexdigest()[:40]
            hit = await self.cache.get(spec.name, info.version, digest)
        except BROKER_ERRORS:
            return None, None
        self.metrics.cache.labels(spec.name, "miss" if hit is None else "hit").inc()
        if record is not None:
            record.model = spec.name
            record.cache = "miss" if hit is None or record.cache == "miss" else "hit"
            if hit is not None:
                record.version = info.version
        return hit, (None if hit is not None else (info.version, digest))

    async def keep(self, spec: ModelSpec, key: tuple[str, str], answer: bytes, answered_by: str) -> None:
        """Keep an answer under the key look_up() gave, within the deployment's TTL and byte bound, unless another
        version than the key's gave it (`answered_by`, the reply's; a rollout's other version, or a new one that
        started meanwhile): a version never serves another's answers. A cache that cannot keep it (Redis away) only
        costs the next request a miss: nothing is raised."""
        if spec.cache is not None and (not answered_by or answered_by == key[0]):
            with contextlib.suppress(*BROKER_ERRORS):
                await self.cache.put(spec.name, *key, answer, spec.cache.ttl_s, spec.cache.max_bytes)

    async def stream(self, model: str, op: str, params: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        """Queue one request and yield its replies as they come, the last one final. The first reply
        (or an error before it) is awaited before anything is yielded, so callers can still answer
        with a plain error status."""
        spec = self.spec(model)
        timeout = spec.timeout_s
        inbox: asyncio.Queue[Reply] = asyncio.Queue()
        self.waiters[request_id] = inbox
        deadline = asyncio.get_running_loop().time() + timeout
        # asyncio.timeout_at, not wait_for: on Python 3.11 wait_for returns the result when a cancel arrives just as
        # its awaitable finishes (a token landing as the client leaves), losing the cancel; the stream then ran on
        # to its last token, its workers generating for no one, and never told them to drop it.
        try:
            try:   # the deadline covers the enqueue too (call() has its timer for that)
                async with asyncio.timeout_at(deadline):
                    await self._enqueue(spec, request_id, op, encode_payload(params))
            except TimeoutError:
                raise DeadlineExceeded(f"request {request_id} to model {model} could not be queued within "
                                       f"{timeout:g} s") from None
            while True:
                if inbox.empty():
                    try:
                        async with asyncio.timeout_at(deadline):
                            reply = await inbox.get()
                    except TimeoutError:
                        raise DeadlineExceeded(f"request {request_id} to model {model} did not finish within "
                                               f"{timeout:g} s{self.starting(model)}") from None
                else:   # tokens that came together (a step's, or a slow reader's backlog): no timer for each
                    reply = inbox.get_nowait()
                self.answered_by(reply)   # the first reply, before any byte of the answer is sent
                if reply.final or not reply.ok:
                    self.observe(spec.name, reply)
                if not reply.ok:
                    raise reply_error(reply)
                yield reply
                if reply.final:
                    return
        finally:
            self.waiters.pop(request_id, None)

    def observe(self, model: str, reply: Reply) -> None:
        """The worker's timings of a final reply: into the queue-wait / compute histograms and the request's record
        (its access-log line). A reply that never ran (an error before the model) has none."""
        if not (reply.batch_size or reply.tokens or reply.compute_ms):
            return
        timings = self.timings.get(model)
        if timings is None:   # labels() is a locked lookup: found once per model, not per request
            timings = self.timings[model] = (self.metrics.queue_wait.labels(model), self.metrics.compute.labels(model))
        timings[0].observe(reply.queued_ms / 1000)
        timings[1].observe(reply.compute_ms / 1000)
        record = records.current.get()
        if record is not None:
            record.queued_ms, record.compute_ms = reply.queued_ms, reply.compute_ms
            record.batch_size, record.tokens = reply.batch_size, reply.tokens

    async def cancel(self, model: str, request_id: str) -> None:
        """Tell the model's workers the caller is gone, so they drop the request (best effort)."""
        with contextlib.suppress(*BROKER_ERRORS):
            await self.batcher.command(*publish_command(model, Cancel(request_id)))

    async def _read_replies(self) -> None:
        errors = RepeatingError(log, f"reply stream gateway={self.gateway_id}", BROKER_ERRORS)
        trimmed_at = time.monotonic()
        while True:
            try:
                for reply in await self.inbox.read(block_s=1.0):
                    self._deliver(reply)
                now = time.monotonic()
                if now - trimmed_at > TRIM_EVERY_S:   # everything read is handled; trim now and then
                    trimmed_at = now
                    await self.inbox.trim()
                errors.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # noqa: BLE001 - Redis away: waiting callers hit their deadlines; keep trying
                errors.failed(exc)
                await asyncio.sleep(0.5)

    async def _watch_workers(self) -> None:
        errors = RepeatingError(log, f"watching workers gateway={self.gateway_id}", BROKER_ERRORS)
        models = list(self.settings.models)
        while True:
            try:
                seen = await self.registry.serving(models)
                self.live = {m: s.live_workers for m, s in seen.items()}
                deployments, self.split = await fleet.watch(self.redis, models)
                self.parked = {m for m, dep in deployments.items() if dep is not None and dep.total == 0}
                errors.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # noqa: BLE001 - Redis away: requests get 503 from the enqueue meanwhile
                self.live = {}
                errors.failed(exc)
            await asyncio.sleep(WATCH_EVERY_S)

    def _deliver(self, reply: Reply) -> None:
        """Hand a reply to whoever waits for it; nobody does once the caller timed out or left."""
        waiter = self.waiters.get(reply.request_id)
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(reply)
        elif waiter is not None and not waiter.done() and (reply.final or not reply.ok):
            waiter.set_result(reply)

    async def _keep_alive(self) -> None:
        errors = RepeatingError(log, f"reply stream refresh gateway={self.gateway_id}", BROKER_ERRORS)
        while True:
            await asyncio.sleep(keys.REPLY_STREAM_TTL_S / 4)
            try:
                await self.inbox.refresh()   # recreates it if Redis lost it (restart or flush)
                errors.ok()
            except BROKER_ERRORS as exc:
                errors.failed(exc)


def expire(future: asyncio.Future[Reply], request_id: str, model: str, timeout: float,
           why: Callable[[str], str]) -> None:
    """The deadline's error, made only when it passes (most requests are answered first)."""
    if not future.done():
        future.set_exception(DeadlineExceeded(f"request {request_id} to model {model} was not answered within "
                                              f"{timeout:g} s{why(model)}"))


def reply_error(reply: Reply) -> InferlineError:
    message, field = reply.error_fields()
    return typed(reply.error_type, message, field)
