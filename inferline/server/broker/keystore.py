"""API key records in Redis: one hash per key (keys.api_key) and an index set. Every gateway reads the record on
each request, so a revocation holds everywhere at once. Records are flat string mappings; their meaning lives
in server/auth/keys.py. keys.AUTH_MARKER says keys have been managed here (see `state`)."""

from __future__ import annotations

import time
from typing import Any

from inferline.server.broker import keys
from inferline.server.broker.client import Redis


async def save(redis: Redis, key_id: str, fields: dict[str, str]) -> None:
    """Store (or replace) a key's record, index it, and mark this Redis as one where keys are managed."""
    await restore(redis, {key_id: fields})


async def restore(redis: Redis, records: dict[str, dict[str, str]]) -> None:
    """Store (or replace) several records, each replaced atomically (one transaction per record: a record and its
    index live in different slots on a Cluster), then index them and set the marker. Used by `save` and by a
    gateway putting back the durable copy of `inferline up`'s keys after its private Redis lost them. A crash in
    between leaves a record the index does not list yet: it works, and `list_all` misses it until it is saved again."""
    for key_id, fields in records.items():
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(key_id))
            pipe.hset(keys.api_key(key_id), mapping=dict[Any, Any](fields))
            await pipe.execute()
    async with redis.pipeline(transaction=True) as pipe:   # keys.auth_index_keys: one slot
        if records:
            pipe.sadd(keys.API_KEY_INDEX, *records)
        pipe.hset(keys.AUTH_MARKER, "updated", repr(time.time()))   # HSET: the admin ACL user has no HSETNX
        await pipe.execute()


async def load(redis: Redis, key_id: str) -> dict[str, str] | None:
    """A key's record, or None when there is none (never created, or revoked). One round trip."""
    raw: Any = await redis.hgetall(keys.api_key(key_id))
    return {k.decode(): v.decode() for k, v in raw.items()} if raw else None


async def state(redis: Redis) -> tuple[int, bool]:
    """(how many keys are indexed, whether keys have ever been managed in this Redis). One round trip (SCARD,
    EXISTS). (0, True): every key was revoked; (0, False): none was ever created here, or this Redis lost them."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.scard(keys.API_KEY_INDEX)
        pipe.exists(keys.AUTH_MARKER)
        count, marker = await pipe.execute()
    return int(count), bool(marker)


async def list_all(redis: Redis) -> dict[str, dict[str, str]]:
    """Every indexed key's record by id; index entries whose record is gone are dropped from the index."""
    members: Any = await redis.smembers(keys.API_KEY_INDEX)
    ids = sorted(i.decode() for i in members)
    if not ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for key_id in ids:
            pipe.hgetall(keys.api_key(key_id))
        records: list[dict[bytes, bytes]] = await pipe.execute()
    stale = [key_id for key_id, r in zip(ids, records, strict=True) if not r]
    if stale:
        await redis.srem(keys.API_KEY_INDEX, *stale)  # type: ignore[misc]
    return {key_id: {k.decode(): v.decode() for k, v in r.items()}
            for key_id, r in zip(ids, records, strict=True) if r}


async def revoke(redis: Redis, key_id: str) -> bool:
    """Delete a key's record, rate state and slots. True when it existed. Effective for the very next request
    on every gateway: each reads the record (or checks its hash) per request."""
    async with redis.pipeline(transaction=True) as pipe:   # keys.admit_keys: one slot
        pipe.delete(keys.api_key(key_id))
        pipe.delete(keys.rate_bucket(key_id), keys.in_flight(key_id))
        deleted, _ = await pipe.execute()
    await redis.srem(keys.API_KEY_INDEX, key_id)  # type: ignore[misc]
    return bool(deleted)
