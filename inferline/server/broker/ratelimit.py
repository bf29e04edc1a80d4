"""Per-key admission in one atomic Lua script (Redis 6.2 command set), shared by every gateway replica:
the key's record must still carry the hash the gateway verified (so a revocation or rotation holds at once),
must not be expired, and the key must be within its token bucket (rate and burst) and its concurrency cap.
A refused request changes nothing. The same round trip returns the key's scopes and models, so a gateway
never acts on a stale copy of them.

Slots of the concurrency cap are members of a sorted set scored by when they lapse: a gateway that dies
holding slots cannot lock a key out for longer than the lease."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferline.server.broker import keys
from inferline.server.broker.client import Redis
from inferline.server.broker.ticks import TickBatcher

UNKNOWN, EXPIRED, ADMITTED, LIMITED = 0, 1, 2, 3

# KEYS: keys.admit_keys (record, bucket, in-flight set: one hash tag, one slot).
# ARGV: expected hash, default rate/s, burst, concurrency, slot id, lease ms.
# Returns {code, scopes, models, burst, remaining, retry_ms, reason, slot_taken, rate, concurrency cap, max priority}.
_ADMIT = """
local rec = redis.call('HMGET', KEYS[1], 'hash', 'scopes', 'models', 'expires_at', 'rate', 'burst', 'concurrency',
                      'max_priority')
if (not rec[1]) or rec[1] ~= ARGV[1] then return {0, '', '', 0, 0, 0, '', 0, '0', 0, ''} end
local maxp = rec[8] or ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local scopes, models = rec[2] or '', rec[3] or ''
local exp = tonumber(rec[4] or '0') or 0
if exp > 0 and now >= exp * 1000 then return {1, scopes, models, 0, 0, 0, 'expired', 0, '0', 0, maxp} end
local rate = tonumber(rec[5] or '0') or 0
if rate <= 0 then rate = tonumber(ARGV[2]) end
local burst = tonumber(rec[6] or '0') or 0
if burst <= 0 then burst = tonumber(ARGV[3]) end
local cap = tonumber(rec[7] or '0') or 0
if cap <= 0 then cap = tonumber(ARGV[4]) end
local tokens = burst
if rate > 0 then
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  if b[1] then tokens = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate / 1000) end
  if tokens < 1 then
    return {3, scopes, models, burst, 0, math.ceil((1 - tokens) * 1000 / rate), 'rate', 0,
            tostring(rate), cap, maxp}
  end
end
local slot = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= cap then
    return {3, scopes, models, burst, math.floor(tokens), 1000, 'concurrency', 0, tostring(rate), cap, maxp}
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
  slot = 1
end
if rate > 0 then
  tokens = tokens - 1
  redis.call('HSET', KEYS[2], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst * 1000 / rate) + 1000)
end
return {2, scopes, models, burst, math.floor(tokens), 0, '', slot, tostring(rate), cap, maxp}
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """The gateway's defaults, used for a key whose record sets none. 0 disables that limit."""

    rate_per_s: float
    burst: int
    concurrency: int
    lease_ms: int


@dataclass(frozen=True, slots=True)
class Admission:
    code: int                 # UNKNOWN (no record or another hash), EXPIRED, ADMITTED or LIMITED
    scopes: str = ""
    models: str = ""
    limit: int = 0            # the burst: what x-ratelimit-limit reports
    remaining: int = 0
    retry_after_ms: int = 0
    reason: str = ""          # "rate" | "concurrency" when LIMITED
    slot_taken: bool = False  # release() it when the request ends
    rate_per_s: float = 0.0   # the key's effective limits, for headers and messages
    concurrency: int = 0
    max_priority: str = ""   # the key's highest priority lane ("": none set, any)


class RateLimiter:
    """Admissions and slot releases go through a TickBatcher: those of one event-loop tick (and, when the batcher
    is the gateway's shared one, its enqueues too) cost one Redis round trip together."""

    def __init__(self, redis: Redis, limits: Limits, batcher: TickBatcher | None = None) -> None:
        self.limits = limits
        self.batcher = batcher if batcher is not None else TickBatcher(redis)

    async def admit(self, key_id: str, expected_hash: str, slot_id: str) -> Admission:
        """Check the key and take one token and (when capped) one concurrency slot named slot_id, atomically.
        Raises redis errors (the caller answers 503)."""
        lim = self.limits
        res: Any = await self.batcher.script(
            _ADMIT, keys.admit_keys(key_id),
            [expected_hash, repr(lim.rate_per_s), lim.burst, lim.concurrency, slot_id, lim.lease_ms])
        code, scopes, models, limit, remaining, retry_ms, reason, slot, rate, cap, maxp = res
        return Admission(int(code), text(scopes), text(models), int(limit), int(remaining), int(retry_ms),
                         text(reason), bool(slot), float(text(rate)), int(cap), text(maxp))

    async def release(self, key_id: str, slot_id: str) -> None:
        """Give back a concurrency slot taken by admit()."""
        await self.batcher.command("ZREM", keys.in_flight(key_id), slot_id)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
