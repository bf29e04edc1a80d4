"""The request streams one worker of a model reads, and their consumer group: the common stream and, for a worker
that knows its version, that version's lane (keys.request_stream), each in its priority lanes (keys.PRIORITY_LANES);
one consumer group on each stream, made here and made again when Redis lost it. consumer.py reads them, claims.py
takes over what dead workers left on them."""

from __future__ import annotations

from redis.exceptions import ResponseError

from inferline.server.broker import keys
from inferline.server.broker.client import Redis


class Lanes:
    def __init__(self, redis: Redis, model: str, version: str = "") -> None:
        """version: the store version whose lane the worker reads beside the common stream ("": none)."""
        self.redis = redis
        self.model = model
        self.stream = keys.request_stream(model)
        self.versions = ["", version] if version else [""]      # the versions it reads: "" is the common stream
        # every (version, priority) stream it reads, highest priority first, the common stream before the version's
        self.by_lane = {(v, p): keys.request_stream(model, v, p) for p in keys.PRIORITY_LANES for v in self.versions}
        self.streams = list(self.by_lane.values())
        self.lane_of = {name.encode(): lane for lane, name in self.by_lane.items()}

    async def ensure_group(self) -> None:
        """Create the streams and their consumer group if missing (idempotent, safe across replicas)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def recreate_on_nogroup(self, exc: ResponseError) -> None:
        """Redis lost the stream or its group (a restart without persistence, FLUSHALL): make them again here, on
        the spot, rather than failing the same call every round. Redis 7 also ends a blocked group read with
        UNBLOCKED when its stream is deleted: FLUSHALL, or on a Cluster the stream migrated to another node (then
        ensure_group finds it there, and the next read follows the redirect at once, where a failed read would
        have held the worker back a second). Other errors are raised."""
        text = str(exc)
        if "NOGROUP" not in text and "no such key" not in text.lower() and not text.startswith("UNBLOCKED"):
            raise exc
        await self.ensure_group()
