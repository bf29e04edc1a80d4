"""The gateway's side of a model's request stream: `Enqueuer` puts requests on it, one pipelined round trip for all
the requests of one event-loop tick, the queue cap checked atomically in the same script. The worker's side (reading,
answering, acknowledging) is consumer.py with sender.py.

A request is one stream entry, its payload inline: the worker gets everything in the read that finds it
(a payload under its own key cost one more round trip per batch, ~0.17 ms of every lone request here).
Streams have no per-entry TTL, but entry ids are arrival times (Redis's clock): every enqueue trims, with XADD's MINID,
the entries that arrived longer ago than the model's timeout plus a grace, so a request nobody answered
expires. An answered one is deleted at once (by its worker, sender.py).
"""

from __future__ import annotations

from inferline.server.broker import keys
from inferline.server.broker.client import Redis
from inferline.server.broker.ticks import TickBatcher
from inferline.server.protocol import ENVELOPE_FIELDS, PAYLOAD_FIELD, Envelope

# KEYS: keys.enqueue_keys (the common request stream, the model's byte counter, the traffic split): one hash tag, one
# slot. ARGV: the cap this request's priority may fill the model's queue to (all streams counted: lane_cap), how long
# (ms) to keep entries, payload, the byte cap (0: none; also the priority's share), '1' to follow a rollout's split,
# the priority lane's index in KEYS (its common stream's; a version's lane adds the same suffix), then the envelope's
# values in protocol.ENVELOPE_FIELDS order.
# Returns the queue length (all streams) before the add, or FULL_ENTRIES / FULL_BYTES when the queue is at that cap for
# this priority (nothing written). The gateway's reply stream is not touched here (it hashes to another slot on a
# Cluster): its gateway keeps it (replies.py), and a worker's reply makes it again if Redis lost it (sender.py).
# The trim threshold comes from Redis's own clock, the one its entry ids come from: a gateway whose clock is
# ahead would otherwise trim fresh entries, its own new one included.
# The byte cap reads the counters that this script raises by each payload's length and the workers' acknowledge script
# (sender.py) lowers when the entry is deleted: exact, where MEMORY USAGE sampled 5 entries (16 small requests queued
# first hid 400 MB behind them under a 128 MiB cap). One way out of the stream is not counted down: an entry XADD's
# MINID trims (nobody answered it within its timeout and a grace). That drift only over-counts (refusing early, never
# admitting more than the cap), and the counter is cleared whenever an enqueue finds all the model's streams empty,
# which a queue at its cap reaches as its workers drain it. An empty queue always takes one request, so a body over
# the cap is not refused forever.
# The entry's field names come from protocol.py (the codec workers read entries with), not typed here: the XADD is
# generated once, at import, one branch per combination of optional fields present (Lua's unpack of a table built per
# call cost 0.4 µs more a call in Redis). A request costs what it did: eleven ARGV, one EVALSHA.
FULL_ENTRIES = -1
FULL_BYTES = -2
_ENVELOPE_ARGV = 7   # ARGV index of the envelope's first value; Enqueuer.enqueue passes them in ENVELOPE_FIELDS order
# The share of a model's queue_cap (and queue_cap_bytes) each priority may fill, all streams counted: at the cap, `low`
# is refused first (once the queue is half full), `normal` at the cap as before lanes, and `high` has a quarter more
# of its own, so interactive requests are still admitted while a batch client holds the queue at its cap.
LANE_SHARE = {"high": 1.25, "normal": 1.0, "low": 0.5}
# The priority lanes' suffixes on a stream's name (keys.request_stream): what the script appends.
_SUFFIX = {p: keys.request_stream("m", priority=p)[len(keys.request_stream("m")):] for p in keys.PRIORITY_LANES}
_OTHERS = [p for p in keys.PRIORITY_LANES if p != "normal"]
# Each priority's stream among keys.enqueue_keys (1-based, Lua's): normal first, the others after the byte counter,
# then the split's key (named only when the gateway follows a rollout).
_KEY_OF = {"normal": 1, **{p: 3 + i for i, p in enumerate(_OTHERS)}}
_SPLIT_KEY = 3 + len(_OTHERS)
_OTHER_KEYS = [_KEY_OF[p] for p in _OTHERS]
_SUFFIXES = ", ".join(f"[{k}] = '{_SUFFIX[p]}'" for p, k in _KEY_OF.items())   # Lua: a KEYS index -> its suffix


def lane_cap(cap: int, priority: str) -> int:
    """What a `priority` request may fill the queue to, of a cap (entries or bytes): at least 1."""
    return max(1, int(cap * LANE_SHARE[priority]))


def _xadd(fields: list[str], optional: list[tuple[int, str]]) -> str:
    """Lua: the request entry's XADD to `stream` with `fields` (name, value pairs), and each optional field only when
    its ARGV (index, name) is not ''."""
    if not optional:
        return f"redis.call('XADD', stream, 'MINID', string.format('%.0f', oldest), '*', {', '.join(fields)})"
    (i, name), rest = optional[0], optional[1:]
    present = _xadd([*fields, f"'{name}', ARGV[{i}]"], rest)
    return f"if ARGV[{i}] ~= '' then\n{present}\nelse\n{_xadd(fields, rest)}\nend"


# The traffic split (keys.routing) is read only when ARGV[5] is '1': the gateway passes it for a model it saw in a
# rollout (its watcher looks every 0.5 s, gateway/dispatch.py), so the path without a rollout costs what it did before
# the split (an HMGET of the missing key cost 1.0 µs more a call, 6.8 -> 7.8 µs of Redis CPU: bench/bench_rollout.py).
# A gateway that has not seen a new rollout yet puts its requests on the common stream, which the old workers read,
# for at most that 0.5 s: the new version's workers take seconds to start. During a rollout the request goes to a
# version's lane, the common stream's name plus keys.LANE and the version (same hash tag, so the same slot as KEYS[1]);
# the counter n makes the share exact over every 100 requests, whichever gateway sent them. Then its priority lane:
# that name plus ARGV[6] (keys.PRIORITY and the priority; '' for normal). The queue cap counts every stream of the
# model (each version's priority lanes), as its byte counter does: the XLEN of the two empty priority lanes is what
# lanes cost the path without a rollout (bench/RESULTS.md).
_ENQUEUE = """
local function queued(s)
  return """ + " + ".join(["redis.call('XLEN', s)"] + ["redis.call('XLEN', s .. '" + _SUFFIX[p] + "')"
                                                      for p in _OTHERS]) + """
end
local stream = KEYS[tonumber(ARGV[6])]
local n = """ + " + ".join(f"redis.call('XLEN', KEYS[{i}])" for i in (1, *_OTHER_KEYS)) + """
if ARGV[5] == '1' then
  local route = redis.call('HMGET', KEYS[""" + str(_SPLIT_KEY) + """], 'a', 'b', 'share')
  if route[1] then
    local la = KEYS[1] .. '""" + keys.LANE + """' .. route[1]
    local lb = KEYS[1] .. '""" + keys.LANE + """' .. route[2]
    n = n + queued(la) + queued(lb)
    local n_split = redis.call('HINCRBY', KEYS[""" + str(_SPLIT_KEY) + """], 'n', 1)
    if n_split % 100 < tonumber(route[3]) then stream = lb else stream = la end
    stream = stream .. ({""" + _SUFFIXES + """})[tonumber(ARGV[6])]
  end
end
if n >= tonumber(ARGV[1]) then return """ + str(FULL_ENTRIES) + """ end
local size = string.len(ARGV[3])
if n == 0 then
  redis.call('SET', KEYS[2], 0)
elseif tonumber(ARGV[4]) > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + size > tonumber(ARGV[4]) then return """ + str(FULL_BYTES) + """ end
end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
""" + _xadd([f"'{PAYLOAD_FIELD}', ARGV[3]"] + [f"'{f.name}', ARGV[{_ENVELOPE_ARGV + i}]"
                                              for i, f in enumerate(ENVELOPE_FIELDS) if not f.optional],
            [(_ENVELOPE_ARGV + i, f.name) for i, f in enumerate(ENVELOPE_FIELDS) if f.optional]) + """
redis.call('INCRBY', KEYS[2], size)
return n
"""


class Enqueuer:
    """Puts requests on model streams. The enqueues of one event-loop tick share one Redis round trip (a
    TickBatcher, which a gateway also shares with its rate limiter)."""

    def __init__(self, redis: Redis, batcher: TickBatcher | None = None) -> None:
        self.batcher = batcher if batcher is not None else TickBatcher(redis)

    async def enqueue(self, model: str, envelope: Envelope, payload: bytes, cap: int, keep_ms: int,
                      cap_bytes: int = 0, split: bool = False, priority: str = "normal") -> int:
        """Queue one request on its priority lane (of its version's lane when split and the model is in a rollout),
        and drop that stream's entries that arrived more than keep_ms ago (nobody waits for them any more). Returns
        the queue depth it found (all the model's streams), or FULL_ENTRIES when the model's queue holds the
        priority's share of cap entries (lane_cap), FULL_BYTES when adding this payload would pass the priority's
        share of cap_bytes of queued payloads (when cap_bytes > 0).
        split: the model may be in a rollout: follow its traffic split (keys.routing) when it has one.
        Raises redis errors (the caller answers 503), KeyError for an unknown priority, and ticks.NotReplicated when
        the batcher asks for replicas (durable enqueue) and too few had the entry in time: it is queued on the primary
        all the same."""
        depth = await self.batcher.script(_ENQUEUE, keys.enqueue_keys(model, split), replicated=True, args=[
            lane_cap(cap, priority), keep_ms, payload, lane_cap(cap_bytes, priority) if cap_bytes else 0,
            "1" if split else "", _KEY_OF[priority],
            # in ENVELOPE_FIELDS order (test_ticks checks the entry against Envelope.fields()): read one by one,
            # as protocol.envelope_values would cost 70-95 ns more a request
            envelope.request_id, envelope.reply_to, envelope.deadline_ms, envelope.op, envelope.traceparent])
        return int(depth)
