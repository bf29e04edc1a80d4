"""The registry of models and workers: the metadata a model's workers publish (ModelInfo), each worker's heartbeat
(WorkerStatus, a hash with a TTL plus a sorted-set index scored by last beat), and what gateways read of them
(/readyz, /v1/models, /v2 metadata). Metadata is cached briefly: status routes must not cost a round trip per call."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferline.server.broker import keys
from inferline.server.broker.client import Redis
from inferline.server.protocol import ModelInfo, WorkerStatus

INFO_TTL_S = 2.0


@dataclass
class ModelStatus:
    """A model as the gateway sees it now."""

    info: ModelInfo | None
    workers: list[WorkerStatus]
    queue_depth: int

    @property
    def live_replicas(self) -> int:
        return len(self.workers)

    @property
    def devices(self) -> list[str]:
        return sorted({w.device for w in self.workers})


@dataclass(frozen=True)
class Serving:
    """Whether a model can be served now: live workers, and a consumer group for them to read."""

    live_workers: int
    group: bool

    @property
    def ready(self) -> bool:
        return self.live_workers > 0 and self.group


@dataclass
class ModelHealth:
    """One model as Redis says it is now: what /metrics exports of the broker (server/metrics.py)."""

    queue_depth: int = 0                  # entries on the model's streams: waiting + pending
    pending: int = 0                      # delivered to a worker, not yet answered (in flight)
    waiting: int = 0                      # not yet delivered to any worker
    oldest_waiting_age_s: float = 0.0     # the oldest entry not yet delivered
    oldest_pending_age_s: float = 0.0     # the oldest entry delivered to a worker and not yet answered
    oldest_queued_age_s: float = 0.0      # the oldest entry on the stream, delivered or not
    dead_letter_length: int = 0
    cache_bytes: int = 0                  # the response cache's bytes (broker/cache.py)
    workers: list[tuple[str, WorkerStatus]] = field(default_factory=list)   # (worker id, heartbeat) of live ones
    stats: dict[str, float] = field(default_factory=dict)                   # the model's counters (keys.stats)


def add_stats(pipe: Any, model: str, stats: dict[str, float]) -> None:
    for name, delta in stats.items():
        pipe.hincrbyfloat(keys.stats(model), name, delta)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _group(groups: Any) -> dict[str, Any] | None:
    """The workers' group among XINFO GROUPS' answer, or None (no stream, no group, or an error)."""
    if isinstance(groups, Exception):
        return None
    for g in groups:
        if g["name"] in (keys.GROUP, keys.GROUP.encode()):
            return dict(g)
    return None


def entry_ms(entry_id: Any) -> int:
    raw = entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()
    return int(raw.split(b"-", 1)[0])


class Registry:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.cache: dict[str, tuple[float, ModelInfo]] = {}

    async def ping(self) -> None:
        await self.redis.ping()

    # the worker side -------------------------------------------------------------------------------------------
    async def publish(self, info: ModelInfo) -> None:
        await self.redis.set(keys.model_info(info.name), info.encode())

    async def beat(self, model: str, worker_id: str, status: WorkerStatus,
                   stats: dict[str, float] | None = None, info: ModelInfo | None = None) -> bool:
        """Refresh the worker's heartbeat record and add `stats` (increments of the model's counters, by field)
        to the model's stats hash, in one round trip. Returns whether the worker was asked to drain
        (broker/fleet.py request_drain). Raises redis errors: then nothing of `stats` was added
        unless the pipeline broke midway (a beat is retried with the same increments: at worst some count twice,
        never go backwards). With `info`, also put the model's metadata back if Redis lost it (a restart without
        persistence, FLUSHALL): gateways need it to route and document the model."""
        now_ms = int(time.time() * 1000)
        status.beat = now_ms
        key = keys.worker(model, worker_id)
        index = keys.workers_index(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=status.fields())   # type: ignore[arg-type]
            pipe.pexpire(key, int(keys.HEARTBEAT_TTL_S * 1000))
            pipe.zadd(index, {worker_id: now_ms})
            pipe.zremrangebyscore(index, 0, now_ms - int(keys.HEARTBEAT_TTL_S * 1000) * 10)
            add_stats(pipe, model, stats or {})
            if info is not None:
                pipe.set(keys.model_info(info.name), info.encode(), nx=True)
            pipe.exists(keys.drain(model, worker_id))
            results: list[Any] = await pipe.execute()
        return bool(results[-1])

    async def alive(self, model: str, worker_ids: Sequence[str]) -> set[str]:
        """The ones among worker_ids whose heartbeat has not lapsed."""
        if not worker_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in worker_ids:
                pipe.exists(keys.worker(model, wid))
            found: list[int] = await pipe.execute()
        return {wid for wid, n in zip(worker_ids, found, strict=True) if n}

    async def add_stats(self, model: str, stats: dict[str, float]) -> None:
        """Add increments to the model's stats hash (a worker's last ones, as it stops). Raises redis errors."""
        if stats:
            async with self.redis.pipeline(transaction=False) as pipe:
                add_stats(pipe, model, stats)
                await pipe.execute()

    async def remove(self, model: str, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.worker(model, worker_id))
            pipe.zrem(keys.workers_index(model), worker_id)
            await pipe.execute()

    # the gateway side ------------------------------------------------------------------------------------------
    async def info(self, model: str) -> ModelInfo | None:
        """The model's published metadata, or None before any worker published it."""
        hit = self.cache.get(model)
        if hit is not None and time.monotonic() - hit[0] < INFO_TTL_S:
            return hit[1]
        raw: bytes | None = await self.redis.get(keys.model_info(model))  # type: ignore[assignment]
        if raw is None:   # a miss is not cached: a worker that just published must be seen at once
            return None
        info = ModelInfo.decode(raw)
        self.cache[model] = (time.monotonic(), info)
        return info

    async def live_workers(self, model: str) -> list[WorkerStatus]:
        """The records of a model's workers whose heartbeat has not expired."""
        return [w for _, w in await self._live(model)]

    async def live_workers_ids(self, model: str) -> list[str]:
        """The ids of a model's workers whose heartbeat has not expired."""
        return [wid for wid, _ in await self._live(model)]

    async def _live(self, model: str) -> list[tuple[str, WorkerStatus]]:
        now_ms = int(time.time() * 1000)
        ids: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
            keys.workers_index(model), now_ms - int(keys.HEARTBEAT_TTL_S * 1000), "+inf")
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(keys.worker(model, wid.decode()))
            records: list[dict[bytes, bytes]] = await pipe.execute()
        return [(wid.decode(), WorkerStatus.from_fields(r)) for wid, r in zip(ids, records, strict=True) if r]

    async def lanes(self, models: Sequence[str]) -> dict[str, list[str]]:
        """Each model's request streams now: the common one, and a rollout's two version lanes (keys.routing)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in models:
                pipe.hmget(keys.routing(name), ["a", "b"])
            found: list[Any] = await pipe.execute()
        return {name: keys.model_streams(name, [v.decode() for v in lanes if v])
                for name, lanes in zip(models, found, strict=True)}

    async def health(self, models: Iterable[str]) -> dict[str, ModelHealth]:
        """The broker's state of each model over all its streams (keys.model_streams, a rollout's lanes included):
        length, waiting and in flight (XINFO GROUPS' pending; waiting = length - pending, since answered entries are
        deleted), the ages of the oldest entry, the oldest pending one (XPENDING's summary) and the oldest waiting
        one (the first entry after the group's last-delivered id: XINFO GROUPS' `lag` would say how many, but it is
        Redis 7 only), dead letters, counters, live workers. Redis's clock, the models' lanes, then two pipelined
        round trips for all models, plus one per model with live workers. Raises redis errors."""
        names = list(models)
        # TIME on its own: a Cluster's pipelines refuse keyless commands (any node's clock serves: entry ids are
        # made from the same clocks, kept in step by NTP).
        seconds, micros = await self.redis.time()
        streams = await self.lanes(names)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                for stream in streams[name]:
                    pipe.xlen(stream)
                    pipe.xinfo_groups(stream)
                    pipe.xpending(stream, keys.GROUP)
                    pipe.xrange(stream, count=1)
                pipe.xlen(keys.dead_letter_stream(name))
                pipe.hgetall(keys.stats(name))
                pipe.get(keys.cache_bytes(name))
            results: list[Any] = await pipe.execute(raise_on_error=False)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        out: dict[str, ModelHealth] = {}
        after: list[tuple[str, str, Any]] = []   # (model, stream, last-delivered id) of streams with waiting entries
        i = 0
        for name in names:
            health = ModelHealth()
            for stream in streams[name]:
                depth, groups, pending, first = results[i:i + 4]
                i += 4
                if isinstance(depth, Exception):
                    raise depth
                group = _group(groups)   # a missing stream or group is an error here: nothing delivered yet
                in_flight = int(group["pending"]) if group else 0
                health.queue_depth += int(depth)
                health.pending += in_flight
                health.waiting += max(0, int(depth) - in_flight)
                if isinstance(pending, dict) and pending.get("pending"):
                    health.oldest_pending_age_s = max(health.oldest_pending_age_s,
                                                      max(0, now_ms - entry_ms(pending["min"])) / 1000)
                if isinstance(first, list) and first:
                    age = max(0, now_ms - entry_ms(first[0][0])) / 1000
                    health.oldest_queued_age_s = max(health.oldest_queued_age_s, age)
                    if int(depth) > in_flight:
                        if group is None:   # no group: every entry waits, the first is the oldest
                            health.oldest_waiting_age_s = max(health.oldest_waiting_age_s, age)
                        else:
                            after.append((name, stream, group["last-delivered-id"]))
            dead, stats, cached = results[i:i + 3]
            i += 3
            health.cache_bytes = int(cached) if isinstance(cached, bytes | str | int) else 0
            for r in (dead, stats):
                if isinstance(r, Exception):
                    raise r
            health.dead_letter_length = int(dead)
            health.stats = {k.decode(): float(v) for k, v in stats.items()}
            out[name] = health
        if after:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, stream, last_id in after:
                    pipe.xrange(stream, min=b"(" + _bytes(last_id), count=1)
                firsts: list[Any] = await pipe.execute(raise_on_error=False)
            for (name, _, _), found in zip(after, firsts, strict=True):
                if isinstance(found, list) and found:
                    age = max(0, now_ms - entry_ms(found[0][0])) / 1000
                    out[name].oldest_waiting_age_s = max(out[name].oldest_waiting_age_s, age)
        for name in names:
            out[name].workers = await self._live(name)
        return out

    async def serving(self, models: Sequence[str]) -> dict[str, Serving]:
        """For each model: how many workers beat, and whether its consumer group exists (a live worker recreates a
        lost one within a second). One round trip for all models, so /readyz stays cheap and bounded."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcount(keys.workers_index(model), now_ms - int(keys.HEARTBEAT_TTL_S * 1000), "+inf")
                pipe.xinfo_groups(keys.request_stream(model))
            results: list[Any] = await pipe.execute(raise_on_error=False)
        out = {}
        for i, model in enumerate(models):
            live, groups = results[2 * i], results[2 * i + 1]
            if isinstance(live, Exception):
                raise live
            out[model] = Serving(int(live), _group(groups) is not None)
        return out

    async def status(self, model: str) -> ModelStatus:
        info = await self.info(model)
        workers = await self.live_workers(model)
        return ModelStatus(info, workers, await self.depth(model))

    async def depth(self, model: str) -> int:
        """Requests on the model's streams (the common one, and a rollout's two lanes), queued or in a worker's
        hands."""
        streams = (await self.lanes([model]))[model]
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            found: list[int] = await pipe.execute()
        return sum(found)
