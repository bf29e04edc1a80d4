"""A deployment's run-time state in Redis, for the management API: the replicas wanted now (keys.deployment, which the
supervisor of `inferline up` / `inferline serve` reconciles its worker processes to) and the drain requests a worker
reads with its heartbeat (keys.drain). The one place that writes either; the admin API, the CLI, the rollout machinery
and the autoscaler all go through these functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis

from inferline.server.broker import keys

REPLICAS = "replicas"   # keys.deployment's field: the replicas wanted now


async def set_replicas(redis: aioredis.Redis, model: str, replicas: int | None) -> None:
    """Set the replicas wanted for `model` now; None removes the run-time value (the configuration's count holds
    again). Raises ValueError for a negative count, and redis errors."""
    if replicas is None:
        await redis.hdel(keys.deployment(model), REPLICAS)   # type: ignore[misc]
        return
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, not {replicas}")
    await redis.hset(keys.deployment(model), REPLICAS, replicas)   # type: ignore[misc]


async def desired_replicas(redis: aioredis.Redis, models: Iterable[str]) -> dict[str, int | None]:
    """The run-time replicas wanted for each model (None: none set; the configuration's count holds). One round
    trip. Raises redis errors."""
    names = list(models)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hget(keys.deployment(name), REPLICAS)
        found: list[Any] = await pipe.execute()
    return {name: int(v) if v is not None else None for name, v in zip(names, found, strict=True)}


async def request_drain(redis: aioredis.Redis, model: str, worker_id: str) -> None:
    """Ask one worker of `model` to drain: it reads the flag with its next heartbeat (~1 s), takes nothing new,
    answers what it holds and exits. The flag lapses after keys.DRAIN_FLAG_TTL_S. Raises redis errors."""
    await redis.set(keys.drain(model, worker_id), 1, ex=keys.DRAIN_FLAG_TTL_S)


async def draining(redis: aioredis.Redis, model: str, worker_ids: Sequence[str]) -> set[str]:
    """The ones among worker_ids that were asked to drain (and may still be finishing). One round trip."""
    if not worker_ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for wid in worker_ids:
            pipe.exists(keys.drain(model, wid))
        found: list[int] = await pipe.execute()
    return {wid for wid, n in zip(worker_ids, found, strict=True) if n}


async def owner(redis: aioredis.Redis, models: Sequence[str], worker_id: str) -> str | None:
    """The model whose worker index holds `worker_id` (a worker seen within the index's horizon, about ten
    heartbeat lifetimes), or None. One round trip for all models."""
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zscore(keys.workers_index(model), worker_id)
        scores: list[Any] = await pipe.execute()
    return next((m for m, score in zip(models, scores, strict=True) if score is not None), None)
