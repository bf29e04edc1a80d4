"""What the gateway knows of each model, read from Redis: the metadata its workers published, its live
workers and its queue depth. Cached briefly: status routes must not cost a round trip per call."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from service.broker import keys
from service.broker.registry import live_workers

INFO_TTL_S = 2.0


class Directory:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def info(self, model: str) -> dict[str, Any] | None:
        """The model's published metadata (version, platform, kind, v2 inputs/outputs), or None."""
        hit = self.cache.get(model)
        if hit is not None and time.monotonic() - hit[0] < INFO_TTL_S:
            return hit[1]
        raw = await self.redis.get(keys.model_info(model))
        info = orjson.loads(raw) if raw else None
        if info is not None:   # a miss is not cached: a worker that just published must be seen at once
            self.cache[model] = (time.monotonic(), info)
        return info

    async def status(self, model: str) -> dict[str, Any]:
        """Version, live replicas with their devices, queue depth."""
        info = await self.info(model)
        workers = await live_workers(self.redis, model)
        depth = await self.redis.xlen(keys.request_stream(model))
        return {"version": info.get("version") if info else None,
                "kind": info.get("kind") if info else None,
                "live_replicas": len(workers),
                "devices": sorted({w.get("device", "?") for w in workers}),
                "queue_depth": int(depth),
                "batches": sum(int(w.get("batches", 0)) for w in workers),
                "items": sum(int(w.get("items", 0)) for w in workers),
                "max_batch": max((int(w.get("max_batch", 0)) for w in workers), default=0),
                "active": sum(int(w.get("active", 0)) for w in workers)}
