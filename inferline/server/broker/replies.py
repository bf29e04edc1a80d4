"""A gateway's reply inbox: the one stream every worker answers that gateway's requests on (each send one entry per
gateway, sender.py), read here with a blocking XREAD on a held connection."""

from __future__ import annotations

from typing import Any

from inferline.server.broker import keys, roundtrip
from inferline.server.broker.client import BROKER_ERRORS, Redis
from inferline.server.broker.reads import xread
from inferline.server.protocol import Reply, unpack_replies


class ReplyInbox:
    """A gateway's reply stream: made here with its TTL, refreshed while the gateway lives, so a dead gateway's stream
    expires. Recreated on the spot when Redis lost it (a restart or FLUSHALL); a worker's reply makes it too, with
    the same TTL, so an answer sent in between is not dropped."""

    def __init__(self, redis: Redis, gateway_id: str) -> None:
        self.redis = redis
        self.stream = keys.reply_stream(gateway_id)
        self.last: Any = None
        self.reads = roundtrip.HeldConnection(redis, self.stream)

    async def create(self) -> None:
        """Make the stream (one empty entry) with its TTL, and read from that entry on."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.stream, {"pack": b""})
            pipe.expire(self.stream, keys.REPLY_STREAM_TTL_S)
            last, _ = await pipe.execute()
        self.last = last

    async def read(self, block_s: float) -> list[Reply]:
        """The replies that arrived since the last read, waiting up to block_s for the first."""
        if self.last is None:
            await self.create()
        res = await xread(self.reads, self.stream, self.last, 1000, block_s)
        if not res and not await self.redis.exists(self.stream):
            # Redis lost the stream (restart, FLUSHALL): make it again now rather than at the next refresh, so the
            # read position restarts at a known entry. An empty read is the cheap moment to look: one EXISTS per
            # idle block.
            await self.create()
            return []
        replies: list[Reply] = []
        for entry_id, fields in res:
            self.last = entry_id
            version = fields.get(b"v")
            replies += unpack_replies(fields.get(b"pack", b""), version.decode() if version else "")
        return replies

    async def trim(self) -> None:
        """Drop the entries already read."""
        if self.last is not None:
            await self.redis.xtrim(self.stream, minid=self.last)

    async def refresh(self) -> None:
        """Extend the TTL; recreate the stream if Redis lost it."""
        if not await self.redis.expire(self.stream, keys.REPLY_STREAM_TTL_S):
            await self.create()

    async def delete(self) -> None:
        try:
            await self.redis.delete(self.stream)
        except BROKER_ERRORS:
            pass
