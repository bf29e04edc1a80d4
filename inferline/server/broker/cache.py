"""The response cache (opt-in per deployment: `[models.NAME] cache = {ttl_s, max_bytes}`): a model's answers kept in
Redis under the model, the version that answered and a hash of the request, with a TTL and a byte bound. One cache
for both kinds of answer: a one-answer op's reply body, and a reproducible generation's token events
(TokenEvent.encode_all); the gateway's Dispatcher.look_up / keep decide what is asked and kept.

The bound is exact and enforced in the one script that stores (Redis 6.2 command set): each entry's size is kept in
a hash and their total in a counter; entries that expired are counted off first, then the oldest are evicted until
the new one fits; an answer larger than the whole bound is not kept. Every key is in the model's hash tag (one slot).
A read is one GET (pipelined with the tick's other commands by the gateway's TickBatcher)."""

from __future__ import annotations

from typing import Any

from inferline.server.broker import keys
from inferline.server.broker.ticks import TickBatcher

# KEYS: keys.cache_keys (entry, index, sizes, bytes). ARGV: value, ttl ms, max bytes.
# Returns 1 stored, 0 already there, -1 too big to keep. The loop evicts at most every entry the index holds.
_STORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local size = string.len(ARGV[1])
local cap = tonumber(ARGV[3])
if size > cap then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = 0
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  gone = gone + tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('HDEL', KEYS[3], k)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local used = tonumber(redis.call('GET', KEYS[4]) or '0') - gone
while used + size > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then used = 0 break end
  local k = oldest[1]
  used = used - tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('DEL', k)
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
end
if used < 0 then used = 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('SET', KEYS[4], used + size)
return 1
"""


class ResponseCache:
    def __init__(self, batcher: TickBatcher) -> None:
        self.batcher = batcher

    async def get(self, model: str, version: str, digest: str) -> bytes | None:
        """The cached answer, or None. Raises redis errors."""
        found: Any = await self.batcher.command("GET", keys.cache_entry(model, version, digest))
        return found if found is None or isinstance(found, bytes) else str(found).encode()

    async def put(self, model: str, version: str, digest: str, value: bytes, ttl_s: float, max_bytes: int) -> int:
        """Keep an answer (see _STORE for the result). Raises redis errors."""
        stored: Any = await self.batcher.script(_STORE, keys.cache_keys(model, version, digest),
                                                [value, max(1, int(ttl_s * 1000)), max_bytes])
        return int(stored)
