"""The run-time state of a model's fleet in Redis, all in the model's hash tag: the replicas wanted per version
(keys.deployment), the traffic split of a rollout (keys.routing, which the enqueue script reads), the rollout's own
record (keys.rollout) and each version's counters (keys.version_stats). The admin API, the CLI, the rollout
controller (server/rollout.py) and the autoscaler write here; the supervisor reads `desired` and starts or drains
workers to match. Every function raises redis errors (callers answer 503 or retry on their next round)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from inferline.server.broker import keys
from inferline.server.broker.client import Redis

REPLICAS = "r:"   # a deployment field per version: r:VERSION -> replicas wanted


def text(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


@dataclass
class Deployment:
    """What runs of a model: `version` served outside a rollout ("" for a model without store versions), the one
    before it, and the replicas wanted of each version."""

    version: str = ""
    previous: str = ""
    replicas: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.replicas.values())


def parse_deployment(raw: Mapping[Any, Any]) -> Deployment | None:
    if not raw:
        return None
    f = _fields(raw)
    return Deployment(f.get("version", ""), f.get("previous", ""),
                      {k[len(REPLICAS):]: int(v) for k, v in f.items() if k.startswith(REPLICAS)})


async def deployment(redis: Redis, model: str) -> Deployment | None:
    """The model's deployment record, or None before a supervisor (or an operator) wrote one."""
    return parse_deployment(await redis.hgetall(keys.deployment(model)))  # type: ignore[misc]


async def deployments(redis: Redis, models: Iterable[str]) -> dict[str, Deployment | None]:
    """Every model's deployment record in one round trip (the supervisor's and the gateways' poll)."""
    names = list(models)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.deployment(name))
        found: list[Any] = await pipe.execute()
    return {name: parse_deployment(raw) for name, raw in zip(names, found, strict=True)}


async def watch(redis: Redis, models: Iterable[str]) -> tuple[dict[str, Deployment | None], set[str]]:
    """Every model's deployment record, and the models with a traffic split (in a rollout), in one round trip: what
    a gateway's watcher reads every 0.5 s."""
    names = list(models)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.deployment(name))
            pipe.exists(keys.routing(name))
        found: list[Any] = await pipe.execute()
    return ({name: parse_deployment(found[2 * i]) for i, name in enumerate(names)},
            {name for i, name in enumerate(names) if found[2 * i + 1]})


async def init_deployment(redis: Redis, model: str, version: str, replicas: int) -> None:
    """A supervisor starting from its configuration: this version, these replicas, nothing else (a rollout or
    scaling of an earlier run is forgotten, its split cleared: the configuration is the truth at start)."""
    state = await redis.hget(keys.rollout(model), "state")  # type: ignore[misc]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.deployment(model), keys.routing(model))
        pipe.hset(keys.deployment(model), mapping={"version": version, REPLICAS + version: replicas})
        if state is not None and text(state) not in FINISHED:
            pipe.hset(keys.rollout(model), mapping={"state": "abandoned", "reason": "the supervisor restarted"})
        await pipe.execute()


async def supervised(redis: Redis, model: str) -> bool:
    """Whether a supervisor (`inferline up` / `serve`) runs the model's workers: it wrote the deployment record's
    `version` at start (init_deployment); set_replicas alone never does."""
    return bool(await redis.hexists(keys.deployment(model), "version"))  # type: ignore[misc]


async def set_replicas(redis: Redis, model: str, version: str, replicas: int) -> None:
    """Want `replicas` workers of `version` (0 keeps its field: a model scaled to zero still names its version)."""
    await redis.hset(keys.deployment(model), REPLICAS + version, replicas)  # type: ignore[misc]


async def served(redis: Redis, model: str, version: str, previous: str) -> None:
    """A rollout finished moving traffic: the deployment serves `version` now (when a supervisor keeps a record:
    none is made here, under Kubernetes the operator's Deployments are the record)."""
    if await redis.exists(keys.deployment(model)):
        await redis.hset(keys.deployment(model), mapping={"version": version, "previous": previous})  # type: ignore[misc]


async def drop_version(redis: Redis, model: str, version: str) -> None:
    """Want no worker of `version` any more (a rollout's old or failed version)."""
    await redis.hdel(keys.deployment(model), REPLICAS + version)  # type: ignore[misc]


async def report_load_error(redis: Redis, model: str, version: str, message: str) -> None:
    """A worker of `version` could not load it (its setup raised): the rollout controller rolls back and says why."""
    await redis.hset(keys.version_stats(model, version), "load_error", message[:500])  # type: ignore[misc]


# --- rollouts --------------------------------------------------------------------------------------------------
FINISHED = ("done", "rolled_back", "abandoned")


async def rollout(redis: Redis, model: str) -> dict[str, str]:
    """The model's current or last rollout record ({} when it never had one)."""
    return _fields(await redis.hgetall(keys.rollout(model)))  # type: ignore[misc]


async def routing(redis: Redis, model: str) -> dict[str, str]:
    """The model's traffic split ({} outside a rollout)."""
    return _fields(await redis.hgetall(keys.routing(model)))  # type: ignore[misc]


async def begin_rollout(redis: Redis, model: str, record: Mapping[str, str | int | float], old: str,
                        new: str, replicas: int, limit: int) -> bool:
    """Start a rollout from `old` to `new` atomically: its record, a split that sends everything to old's lane for
    now (share 0: no traffic to new until its workers are live) with the guard's failure `limit` already set (new's
    workers read it as they start: their first answer is counted), new's counters reset and `replicas` of it wanted.
    False (nothing written) when another rollout is in progress: the record is watched, as two operators may race."""
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(keys.rollout(model))
            state = await pipe.hget(keys.rollout(model), "state")
            if state is not None and text(state) not in FINISHED:
                return False
            pipe.multi()
            pipe.delete(keys.rollout(model), keys.version_stats(model, new), keys.version_stats(model, old))
            pipe.hset(keys.rollout(model), mapping=dict(record))  # type: ignore[arg-type]
            pipe.delete(keys.routing(model))
            pipe.hset(keys.routing(model), mapping={"a": old, "b": new, "share": 0, "n": 0, "limit": limit})
            pipe.hset(keys.deployment(model), REPLICAS + new, replicas)
            await pipe.execute()
        except aioredis.WatchError:
            return False
    return True


async def update_rollout(redis: Redis, model: str, values: Mapping[str, str | int | float]) -> None:
    await redis.hset(keys.rollout(model), mapping=dict(values))  # type: ignore[misc,arg-type]


async def set_split(redis: Redis, model: str, share: int, limit: int | None) -> None:
    """Send `share` percent of the requests to the new version; `limit`: the failures of it that trip the automatic
    rollback while the window is open (None: the window is closed, no guard)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.routing(model), "share", share)
        if limit is None:
            pipe.hdel(keys.routing(model), "limit")
        else:
            pipe.hset(keys.routing(model), "limit", limit)
        await pipe.execute()


async def set_share(redis: Redis, model: str, share: int) -> None:
    """Send `share` percent of the requests to the new version (the guard's limit, if any, stays)."""
    await redis.hset(keys.routing(model), "share", share)  # type: ignore[misc]


async def clear_split(redis: Redis, model: str) -> None:
    """Back to the common stream: every request of the model goes there again."""
    await redis.delete(keys.routing(model))


async def version_counts(redis: Redis, model: str, versions: Iterable[str]) -> dict[str, dict[str, str]]:
    """Each version's counters since its rollout began (keys.version_stats)."""
    names = [v for v in dict.fromkeys(versions) if v]
    async with redis.pipeline(transaction=False) as pipe:
        for v in names:
            pipe.hgetall(keys.version_stats(model, v))
        found: list[Any] = await pipe.execute()
    return {v: _fields(raw) for v, raw in zip(names, found, strict=True)}


async def lane_depth(redis: Redis, model: str, version: str) -> int:
    """Entries on a version's lane (all its priority lanes), queued or in a worker's hands (answered ones are deleted
    at once)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in keys.lane_streams(model, version):
            pipe.xlen(stream)
        found: list[int] = await pipe.execute()
    return sum(int(n) for n in found)


async def count_rollback(redis: Redis, model: str) -> None:
    """One more automatic rollback of the model (the `inferline_automatic_rollbacks_total` metric)."""
    await redis.hincrby(keys.stats(model), keys.STAT_ROLLBACKS, 1)  # type: ignore[misc]


async def lead(redis: Redis, model: str, owner: str, ttl_ms: int) -> bool:
    """Whether `owner` drives the model's rollout controller now: taken when free, kept while held (a gateway that
    dies lets it lapse after ttl_ms)."""
    lock = keys.rollout_lock(model)
    if await redis.set(lock, owner, nx=True, px=ttl_ms):
        return True
    held = await redis.get(lock)
    if held is not None and text(held) == owner:
        await redis.pexpire(lock, ttl_ms)
        return True
    return False


def failure_limit(rate: float, window_requests: int) -> int:
    """Failures of the new version that trip the rollback at once: more than `rate` of the whole window."""
    return int(math.floor(rate * window_requests))


# --- draining one worker (POST /admin/workers/{id}/drain) ---------------------------------------------------------
async def request_drain(redis: Redis, model: str, worker_id: str) -> None:
    """Ask one worker of `model` to drain: it reads the flag with its next heartbeat (~1 s), takes nothing new,
    answers what it holds and exits. The flag lapses after keys.DRAIN_FLAG_TTL_S."""
    await redis.set(keys.drain(model, worker_id), 1, ex=keys.DRAIN_FLAG_TTL_S)


async def draining(redis: Redis, model: str, worker_ids: Sequence[str]) -> set[str]:
    """The ones among worker_ids that were asked to drain (and may still be finishing). One round trip."""
    if not worker_ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for wid in worker_ids:
            pipe.exists(keys.drain(model, wid))
        found: list[int] = await pipe.execute()
    return {wid for wid, n in zip(worker_ids, found, strict=True) if n}


async def owner(redis: Redis, models: Sequence[str], worker_id: str) -> str | None:
    """The model whose worker index holds `worker_id` (a worker seen within the index's horizon, about ten
    heartbeat lifetimes), or None. One round trip for all models."""
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zscore(keys.workers_index(model), worker_id)
        scores: list[Any] = await pipe.execute()
    return next((m for m, score in zip(models, scores, strict=True) if score is not None), None)
