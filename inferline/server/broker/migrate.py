"""`inferline migrate-keys`: rename a deployment's keys from the names before the Cluster-safe layout (keys.py: no hash
tags, e.g. `inferline:req:NAME`) to today's (`inferline:req:{m:NAME}`), on the one Redis they live on. Run it with every
gateway and worker stopped: a stream keeps its entries, consumer groups and pending entries through RENAME, so
requests queued before the upgrade are served after it.

What is renamed: each model's request stream, its byte counter, dead letters, cancels, metadata and stats; each API
key's record, the key index and the managed marker. What is dropped: what lapses by itself and is rebuilt at once
(rate buckets, in-flight slots, worker heartbeats and their index, gateways' reply streams). A key whose new name
already exists is left as it is and reported (RENAMENX: nothing is overwritten); so is an old-looking key this table
does not know. Running it twice does nothing the second time."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from inferline.server.broker import keys
from inferline.server.broker.client import Redis

OLD_PREFIX = f"{keys.PREFIX}:"
SCAN_COUNT = 500


@dataclass(frozen=True, slots=True)
class Step:
    old: str
    new: str | None     # None: dropped
    done: bool          # False: left as it was (the new name exists, or the key is unknown)
    why: str = ""


def new_name(old: str) -> str | None:
    """Today's name for a key of the old layout; None for one that is dropped. Raises KeyError for a name this
    table does not know. Model names and key ids contain no ':' (config.py, auth/keys.py)."""
    parts = old.split(":")
    if len(parts) < 3 or parts[0] != keys.PREFIX:
        raise KeyError(old)
    kind, rest = parts[1], parts[2:]
    if kind == "req" and len(rest) == 2 and rest[1] == "bytes":
        return keys.queued_bytes(rest[0])
    if len(rest) == 1:
        models = {"req": keys.request_stream, "dlq": keys.dead_letter_stream, "cancel": keys.cancel_stream,
                  "model": keys.model_info, "stats": keys.stats}
        if kind in models:
            return models[kind](rest[0])
        if kind in ("reply", "workers"):
            return None
    if kind == "worker" and len(rest) == 2:
        return None
    if kind == "auth":
        if rest == ["keys"]:
            return keys.API_KEY_INDEX
        if rest == ["key", "_managed"]:
            return keys.AUTH_MARKER
        if len(rest) == 2 and rest[0] == "key":
            return keys.api_key(rest[1])
        if len(rest) == 2 and rest[0] in ("bucket", "inflight"):
            return None
    raise KeyError(old)


async def migrate(redis: Redis, dry_run: bool = False) -> list[Step]:
    """Rename (or drop) every key of the old layout on this Redis; what was done to each, in name order. dry_run:
    only say what would be done. Keys that carry a hash tag (today's layout) are not touched. Raises ValueError
    for a Cluster client (the old layout never ran on one; a rename across slots cannot be done there)."""
    if not isinstance(redis, aioredis.Redis):
        raise ValueError("migrate-keys runs on the one Redis of a deployment from before the upgrade, not a Cluster")
    found: list[str] = []
    async for raw in redis.scan_iter(match=f"{OLD_PREFIX}*", count=SCAN_COUNT):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if "{" not in name:
            found.append(name)
    steps = []
    for old in sorted(found):
        try:
            new = new_name(old)
        except KeyError:
            steps.append(Step(old, old, False, "not a name of the old layout: left as it is"))
            continue
        if dry_run:
            steps.append(Step(old, new, False, "dry run"))
        elif new is None:
            await redis.delete(old)
            steps.append(Step(old, None, True))
        elif await redis.renamenx(old, new):
            steps.append(Step(old, new, True))
        else:
            steps.append(Step(old, new, False, "the new name exists already: left as it is"))
    return steps


def describe(step: Step) -> str:
    """One line for the operator: OLD, what happens to it, and why not when it did not happen."""
    action = "dropped" if step.new is None else f"-> {step.new}"
    return f"{step.old}\t{action}" + ("" if step.done else f"\t(not done: {step.why})")
