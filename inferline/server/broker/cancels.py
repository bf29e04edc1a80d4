"""A model's cancel stream: gateways publish the requests whose caller left; every replica of the model reads them
all (no consumer group), and drops the request if it holds it or has not read it yet."""

from __future__ import annotations

from typing import Any

from inferline.server.broker import keys, roundtrip
from inferline.server.broker.client import Redis
from inferline.server.broker.reads import xread
from inferline.server.broker.registry import entry_ms
from inferline.server.protocol import Cancel


def publish_command(model: str, cancel: Cancel) -> list[Any]:
    """The XADD that publishes `cancel` on `model`'s cancel stream, as a TickBatcher command: the gateway sends its
    cancels this way, so the cancels of one event-loop tick go out in one round trip on the batcher's connection
    (a client that left 30 `n=8` completions at once published 240, each on a pool connection of its own)."""
    args: list[Any] = ["XADD", keys.cancel_stream(model), "MAXLEN", "~", keys.CANCEL_MAXLEN, "*"]
    for name, value in cancel.fields().items():
        args += [name, value]
    return args


class Cancels:
    """A model's cancel stream: gateways announce callers that left; every replica reads them all (no group)."""

    def __init__(self, redis: Redis, model: str) -> None:
        self.redis = redis
        self.stream = keys.cancel_stream(model)
        self.last: Any = None
        self.reads = roundtrip.HeldConnection(redis, self.stream)

    async def publish(self, cancel: Cancel) -> None:
        await self.redis.xadd(self.stream, cancel.fields(), maxlen=keys.CANCEL_MAXLEN,  # type: ignore[arg-type]
                              approximate=True)

    async def read(self, block_s: float) -> list[tuple[Cancel, int]]:
        """Cancels published since the last read (since the first read's call, the first time), each with when it
        was published (ms, Redis's clock: the one request entry ids are made from, see entry_ms)."""
        if self.last is None:
            newest: Any = await self.redis.xrevrange(self.stream, count=1)
            self.last = newest[0][0] if newest else b"0-0"
        res = await xread(self.reads, self.stream, self.last, 100, block_s)
        out = []
        for entry_id, fields in res:
            self.last = entry_id
            out.append((Cancel.from_fields(fields), entry_ms(entry_id)))
        return out

