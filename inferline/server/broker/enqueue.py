"""The gateway's side of a model's request stream: `Enqueuer` puts requests on it, one pipelined round trip for all
the requests of one event-loop tick, the queue cap checked atomically in the same script. The worker's side (reading,
answering, acknowledging) is consumer.py.

A request is one stream entry, its payload inline: the worker gets everything in the read that finds it
(a payload under its own key cost one more round trip per batch, ~0.17 ms of every lone request here).
Streams have no per-entry TTL, but entry ids are arrival times (Redis's clock): every enqueue trims, with XADD's MINID,
the entries that arrived longer ago than the model's timeout plus a grace, so a request nobody answered
expires. An answered one is deleted at once (by its worker, consumer.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from inferline.server.broker import keys
from inferline.server.broker.ticks import TickBatcher
from inferline.server.protocol import ENVELOPE_FIELDS, PAYLOAD_FIELD, Envelope

# KEYS: keys.enqueue_keys (every priority lane's stream, then their byte counters): one hash tag, one slot. ARGV: the
# cap this request's lane may fill the model's queue to (all lanes counted: lane_cap), how long (ms) to keep entries,
# payload, the byte cap (0: none; also the lane's share), the lane's index in keys.PRIORITY_LANES (1-based), then the
# envelope's values in protocol.ENVELOPE_FIELDS order.
# Returns the queue length (all lanes) before the add, or FULL_ENTRIES / FULL_BYTES when the queue is at that cap for
# this lane (nothing written). The gateway's reply stream is not touched here (it hashes to another slot on a
# Cluster): its gateway keeps it (replies.py), and a worker's reply makes it again if Redis lost it (consumer.py).
# The trim threshold comes from Redis's own clock, the one its entry ids come from: a gateway whose clock is
# ahead would otherwise trim fresh entries, its own new one included.
# The byte cap reads the counters that this script raises by each payload's length and the workers' acknowledge script
# (consumer.py) lowers when the entry is deleted: exact, where MEMORY USAGE sampled 5 entries (16 small requests queued
# first hid 400 MB behind them under a 128 MiB cap). One way out of the stream is not counted down: an entry XADD's
# MINID trims (nobody answered it within its timeout and a grace). That drift only over-counts (refusing early, never
# admitting more than the cap), and a lane's counter is cleared whenever an enqueue finds that lane empty, which a
# queue at its cap reaches as its workers drain it. An empty queue always takes one request, so a body over the cap is
# not refused forever.
# The entry's field names come from protocol.py (the codec workers read entries with), not typed here: the XADD is
# generated once, at import, one branch per combination of optional fields present (Lua's unpack of a table built per
# call cost 0.4 µs more a call in Redis). A request costs what it did: eleven ARGV, one EVALSHA.
FULL_ENTRIES = -1
FULL_BYTES = -2
_ENVELOPE_ARGV = 6   # ARGV index of the envelope's first value; Enqueuer.enqueue passes them in ENVELOPE_FIELDS order
LANES = len(keys.PRIORITY_LANES)
# The share of a model's queue_cap (and queue_cap_bytes) each lane may fill, all lanes counted: at the cap, `low` is
# refused first (once the queue is half full), `normal` at the cap as before lanes, and `high` has a quarter more
# of its own, so interactive requests are still admitted while a batch client holds the queue at its cap.
LANE_SHARE = {"high": 1.25, "normal": 1.0, "low": 0.5}


def lane_cap(cap: int, priority: str) -> int:
    """What a `priority` request may fill the queue to, of a cap (entries or bytes): at least 1."""
    return max(1, int(cap * LANE_SHARE[priority]))


def _xadd(fields: list[str], optional: list[tuple[int, str]]) -> str:
    """Lua: the request entry's XADD with `fields` (name, value pairs), and each optional field only when its ARGV
    (index, name) is not ''."""
    if not optional:
        return f"redis.call('XADD', stream, 'MINID', string.format('%.0f', oldest), '*', {', '.join(fields)})"
    (i, name), rest = optional[0], optional[1:]
    present = _xadd([*fields, f"'{name}', ARGV[{i}]"], rest)
    return f"if ARGV[{i}] ~= '' then\n{present}\nelse\n{_xadd(fields, rest)}\nend"


_ENQUEUE = """
local lane = tonumber(ARGV[5])
local stream, counter = KEYS[lane], KEYS[""" + str(LANES) + """ + lane]
local n, mine = 0, 0
for i = 1, """ + str(LANES) + """ do
  local len = redis.call('XLEN', KEYS[i])
  n = n + len
  if i == lane then mine = len end
end
if n >= tonumber(ARGV[1]) then return """ + str(FULL_ENTRIES) + """ end
local size = string.len(ARGV[3])
if mine == 0 then redis.call('SET', counter, 0) end
if n > 0 and tonumber(ARGV[4]) > 0 then
  local used = 0
  for i = """ + str(LANES + 1) + """, """ + str(2 * LANES) + """ do
    used = used + tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  if used + size > tonumber(ARGV[4]) then return """ + str(FULL_BYTES) + """ end
end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
""" + _xadd([f"'{PAYLOAD_FIELD}', ARGV[3]"] + [f"'{f.name}', ARGV[{_ENVELOPE_ARGV + i}]"
                                              for i, f in enumerate(ENVELOPE_FIELDS) if not f.optional],
            [(_ENVELOPE_ARGV + i, f.name) for i, f in enumerate(ENVELOPE_FIELDS) if f.optional]) + """
redis.call('INCRBY', counter, size)
return n
"""
_LANE_INDEX = {p: i + 1 for i, p in enumerate(keys.PRIORITY_LANES)}


class Enqueuer:
    """Puts requests on model streams. The enqueues of one event-loop tick share one Redis round trip (a
    TickBatcher, which a gateway also shares with its rate limiter)."""

    def __init__(self, redis: aioredis.Redis, batcher: TickBatcher | None = None) -> None:
        self.batcher = batcher if batcher is not None else TickBatcher(redis)

    async def enqueue(self, model: str, envelope: Envelope, payload: bytes, cap: int, keep_ms: int,
                      cap_bytes: int = 0, priority: str = "normal") -> int:
        """Queue one request on its priority lane, and drop that lane's entries that arrived more than keep_ms ago
        (nobody waits for them any more). Returns the queue depth it found (all lanes), or FULL_ENTRIES when the
        model's queue holds the lane's share of cap entries (lane_cap), FULL_BYTES when adding this payload would
        pass the lane's share of cap_bytes of queued payloads (when cap_bytes > 0). Raises redis errors (the caller
        answers 503) and KeyError for an unknown priority."""
        depth = await self.batcher.script(_ENQUEUE, keys.enqueue_keys(model), [
            lane_cap(cap, priority), keep_ms, payload, lane_cap(cap_bytes, priority) if cap_bytes else 0,
            _LANE_INDEX[priority],
            # in ENVELOPE_FIELDS order (test_ticks checks the entry against Envelope.fields()): read one by one,
            # as protocol.envelope_values would cost 70-95 ns more a request
            envelope.request_id, envelope.reply_to, envelope.deadline_ms, envelope.op, envelope.traceparent])
        return int(depth)
