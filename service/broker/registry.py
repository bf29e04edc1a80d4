"""Reading the worker registry that heartbeats write (service/worker/heartbeat.py)."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from service.broker import keys


async def live_workers(redis: aioredis.Redis, model: str) -> list[dict[str, str]]:
    """The records of a model's workers whose heartbeat has not expired."""
    now_ms = int(time.time() * 1000)
    ids: list[bytes] = await redis.zrangebyscore(  # type: ignore[assignment]
        keys.workers_index(model), now_ms - int(keys.HEARTBEAT_TTL_S * 1000), "+inf")
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(keys.worker(model, wid.decode()))
        records: list[dict[bytes, bytes]] = await pipe.execute()
    return [{k.decode(): v.decode() for k, v in r.items()} | {"id": wid.decode()}
            for wid, r in zip(ids, records, strict=True) if r]
