"""Every Redis key and stream name, and the sizes and TTLs that bound them. Nothing else names a key.

Cluster-safe layout: every key carries a hash tag (the part in braces, which alone decides a key's slot on a Redis
Cluster), one tag per owner: `{m:NAME}` for everything of model NAME (request stream, byte counter, dead letters,
cancels, workers, stats, metadata, answered ids), `{k:ID}` for everything of API key ID (record, bucket, in-flight
slots), `{g:ID}` for gateway ID's reply stream, `{auth}` for the key index and marker. What one script or transaction
touches shares one tag (the groups below, `ATOMIC`, are what tests/test_key_layout.py checks with the real CRC16 slot
function), so nothing crosses a slot, and models spread over the shards by name while one model's stream is never split.
On one Redis the braces change nothing but the names (`inferline migrate-keys` renames a deployment's old ones).
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "inferline"
GROUP = "workers"                 # the consumer group every replica of a model reads with

UNANSWERED_GRACE_MS = 60_000      # a request nobody answered is trimmed from its stream this long after its deadline
REPLY_STREAM_TTL_S = 120          # a gateway refreshes its reply stream; a dead gateway's one expires
HEARTBEAT_TTL_S = 5.0             # a worker silent this long is not live
HEARTBEAT_EVERY_S = 1.0
DEAD_LETTER_MAXLEN = 10_000
# A dead letter keeps its request's payload (for a replay) when it is at most this big; the kept payloads are trimmed to
# the newest DEAD_PAYLOAD_MAXLEN per model: at most 64 MiB of a model's payloads outlive their requests.
DEAD_PAYLOAD_BYTES = 65_536
DEAD_PAYLOAD_MAXLEN = 1_000
DRAIN_FLAG_TTL_S = 60             # a drain request a worker never read (it died first) is gone after this
CANCEL_MAXLEN = 10_000


def _model(model: str) -> str:
    return f"{{m:{model}}}"   # config.py allows [A-Za-z0-9_.-] in names: no brace can end a tag early


def _key(key_id: str) -> str:
    return f"{{k:{key_id}}}"


LANE = ":v="       # a version's request lane: the model's stream name plus this and the version
PRIORITY = ":p="   # a priority lane: the (version's) stream name plus this and the priority, unless normal
PRIORITIES = ("high", "normal", "low")   # the request lanes' names, highest first
PRIORITY_LANES: tuple[str, ...] = PRIORITIES   # the lanes workers read, in the order they prefer them


def request_stream(model: str, version: str = "", priority: str = "normal") -> str:
    """A model's request stream: `inferline:req:{m:NAME}` + (`:v=VERSION`) + (`:p=PRIORITY` unless normal). Version
    "" is the common stream, the only one outside a rollout; during a rollout the gateways fill the two versions'
    lanes by the split in `routing` (enqueue.py), and only that version's workers read a lane. Every worker reads the
    common stream and its own version's, each in its priority lanes, highest first (consumer.py). All in the model's
    hash tag (one slot per model); the enqueue script builds the same names (enqueue.py)."""
    name = f"{PREFIX}:req:{_model(model)}"
    if version:
        name += f"{LANE}{version}"
    if priority != "normal":
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
        name += f"{PRIORITY}{priority}"
    return name


def model_streams(model: str, versions: Iterable[str] = ()) -> list[str]:
    """Every request stream of a model: the common stream's priority lanes (highest first), then each version's.
    What reads a model's backlog (metrics, the autoscaler, KEDA's manifests, `inferline top`, the rollout's drain)
    lists its streams here, never by retyping names."""
    return [s for v in ("", *(v for v in versions if v)) for s in lane_streams(model, v)]


def lane_streams(model: str, version: str = "") -> list[str]:
    """One version's streams (version "": the common stream's): its priority lanes, highest first."""
    return [request_stream(model, version, p) for p in PRIORITY_LANES]


def lane_of(stream: str | bytes, model: str) -> tuple[str, str]:
    """The (version, priority) of one of the model's request streams (version "" for the common stream)."""
    name = stream.decode() if isinstance(stream, bytes) else stream
    rest = name[len(request_stream(model)):]
    priority = "normal"
    if PRIORITY in rest:
        rest, priority = rest.rsplit(PRIORITY, 1)
    return (rest[len(LANE):] if rest.startswith(LANE) else ""), priority


def lane_version(stream: str | bytes, model: str) -> str:
    """The version whose lane `stream` is ("" for the common stream)."""
    return lane_of(stream, model)[0]


def queued_bytes(model: str) -> str:
    """Counter: the payload bytes of the entries on all of the model's request streams (every version's and priority
    lane), kept exact by the scripts that add (enqueue.py) and delete (sender.py) them. Spelt as the common stream's
    name plus a suffix, so it hashes to the stream's slot whatever hash tag the stream's name carries (both are
    touched by one script)."""
    return f"{request_stream(model)}:bytes"


def reply_stream(gateway_id: str) -> str:
    return f"{PREFIX}:reply:{{g:{gateway_id}}}"


def dead_letter_stream(model: str) -> str:
    return f"{PREFIX}:dlq:{_model(model)}"


def dead_payloads(model: str) -> str:
    """Stream: the payloads (and ops) of the newest dead letters, each entry naming its dead-letter entry (`dl`):
    what a replay re-enqueues (broker/deadletters.py). Trimmed to DEAD_PAYLOAD_MAXLEN; purged with its dead letters."""
    return f"{PREFIX}:dlq:{_model(model)}:payloads"


def drain(model: str, worker_id: str) -> str:
    """String: "drain this worker" (POST /admin/workers/{id}/drain); the worker reads it with its heartbeat, then
    drains as on SIGTERM. Expires after DRAIN_FLAG_TTL_S."""
    return f"{PREFIX}:drain:{_model(model)}:{worker_id}"


def cancel_stream(model: str) -> str:
    """Cancellations (client gone) fan out to every replica of a model; each drops what it holds."""
    return f"{PREFIX}:cancel:{_model(model)}"


def worker(model: str, worker_id: str) -> str:
    """Hash: device, pid, host, version, batches, items, max_batch, active. Expires with the heartbeat."""
    return f"{PREFIX}:worker:{_model(model)}:{worker_id}"


def workers_index(model: str) -> str:
    """Sorted set of a model's worker ids scored by last heartbeat (epoch ms)."""
    return f"{PREFIX}:workers:{_model(model)}"


def stats(model: str) -> str:
    """Hash: a model's counters, kept across worker restarts (server/metrics.py). Fields are metric sample names
    ("name|le" for a histogram bucket); workers add their increments with each heartbeat, the broker adds the
    STAT_* fields when it reclaims or dead-letters. No TTL: a counter must not reset while anyone reads it."""
    return f"{PREFIX}:stats:{_model(model)}"


STAT_RECLAIMED = "reclaimed"
STAT_REDELIVERED = "redelivered"
STAT_DEAD_LETTERED = "dead_lettered"
STAT_ROLLBACKS = "rollbacks_automatic"   # rollouts the controller rolled back by itself (server/rollout.py)


def answered(model: str) -> str:
    """Sorted set: the request-stream entry ids a model's workers answered lately (scored by when, epoch ms; trimmed
    to the model's timeout), written only with durable enqueue (broker.min_replicas_ack). A failover can lose the
    acknowledgement of an answered entry and deliver it again: a worker that finds it here acknowledges it without
    running it (sender.py)."""
    return f"{PREFIX}:answered:{_model(model)}"


def cache_entry(model: str, version: str, digest: str) -> str:
    """String with a TTL: one cached answer of the model's `version` to the request whose hash is `digest`
    (broker/cache.py). The version is in the name: a new version never reads another's entries."""
    return f"{PREFIX}:cache:{_model(model)}:e:{version}:{digest}"


def cache_index(model: str) -> str:
    """Sorted set: the model's cached entries (their keys), scored by when they expire (epoch ms): the eviction order
    (every entry of a model has the same TTL, so the soonest to expire is the oldest)."""
    return f"{PREFIX}:cache:{_model(model)}:index"


def cache_sizes(model: str) -> str:
    """Hash: each cached entry's key -> its size in bytes, to count it off when it expires or is evicted."""
    return f"{PREFIX}:cache:{_model(model)}:sizes"


def cache_bytes(model: str) -> str:
    """Counter: the bytes of the model's cached entries, kept at most its cache.max_bytes by the store script."""
    return f"{PREFIX}:cache:{_model(model)}:bytes"


def model_info(model: str) -> str:
    """JSON the workers publish at start: version, platform, kind, v2 inputs/outputs. Read by gateways."""
    return f"{PREFIX}:model:{_model(model)}"


def routing(model: str) -> str:
    """Hash: the traffic split of a rollout, read by the enqueue script (enqueue.py) in the stream's slot: `a` (the
    old version), `b` (the new one), `share` (percent of requests to b, 0..100), `n` (the requests split so far: n
    mod 100 < share goes to b, an exact share over every 100 requests of all gateways), and while the rollout's
    window is open `limit` (failures of b that trip the automatic rollback, checked by b's workers: sender.py)
    and `tripped` (why it tripped). Absent outside a rollout: every request goes to the common stream."""
    return f"{PREFIX}:route:{_model(model)}"


def deployment(model: str) -> str:
    """Hash: the run-time replicas wanted of a model: `r:VERSION` = replicas for each version that should run,
    `version` (the one served outside a rollout), `previous` (the one before it, for `inferline rollback`). Written
    by the admin API, the CLI, the rollout controller and the autoscaler (broker/fleet.py); the supervisor of
    `inferline up` / `inferline serve` starts and drains workers to match it."""
    return f"{PREFIX}:deploy:{_model(model)}"


def rollout(model: str) -> str:
    """Hash: the model's current or last rollout (broker/fleet.py: state, versions, canary share, window, why it
    ended), written by the API and the rollout controller (server/rollout.py)."""
    return f"{PREFIX}:rollout:{_model(model)}"


def rollout_lock(model: str) -> str:
    """String with a TTL: which gateway drives the model's rollout controller now (one at a time)."""
    return f"{PREFIX}:rollout:{_model(model)}:lock"


def version_stats(model: str, version: str) -> str:
    """Hash: a version's counters since its rollout began: `requests`, `failures` (5xx-type answers: internal,
    generation, dead letter; not client errors), `dead_lettered`, and `load_error` when a worker's setup failed."""
    return f"{PREFIX}:vstats:{_model(model)}:{version}"


# API keys (server/auth/keys.py). Workers' Redis ACL user is denied everything under inferline:auth:*.
AUTH_PREFIX = f"{PREFIX}:auth"
API_KEY_INDEX = f"{AUTH_PREFIX}:keys:{{auth}}"     # set of key ids, for `inferline keys list`
# Hash {updated: epoch s}: "keys have been managed in this Redis", written with every key and kept when keys are
# revoked, so "no key left" reads as "all revoked" while it exists and as "this Redis lost its keys" once it is gone.
# Under the key-record prefix because the gateway and admin ACL users may already read and write there
# (SECURITY.md); "_managed" can never be a key id (16 hex digits).
AUTH_MARKER = f"{AUTH_PREFIX}:key:{{auth}}:_managed"


def api_key(key_id: str) -> str:
    """Hash: the key's record (salted hash of its secret, scopes, models, expiry, limits). Never the secret."""
    return f"{AUTH_PREFIX}:key:{_key(key_id)}"


def rate_bucket(key_id: str) -> str:
    """Hash: the key's token bucket (tokens, ts in ms). Expires once it would be full again."""
    return f"{AUTH_PREFIX}:bucket:{_key(key_id)}"


def in_flight(key_id: str) -> str:
    """Sorted set: the key's requests in flight, scored by when their slot lapses (a dead gateway's slots do)."""
    return f"{AUTH_PREFIX}:inflight:{_key(key_id)}"


# What must share one slot: each group is the keys one script or transaction touches together (the callers build
# their key lists from these same functions). tests/test_key_layout.py computes every group's slots with CRC16.
def enqueue_keys(model: str, split: bool = True) -> list[str]:
    """The enqueue script's KEYS (enqueue.py): the common request stream, the model's byte counter, the common
    stream's other priority lanes (PRIORITY_LANES order, normal left out), then, when the gateway follows a rollout
    (`split`), its traffic split. During a rollout the script adds to a version's lane (and its priority lane), whose
    name it makes from the first key (LANE, PRIORITY): same tag, same slot. Every key named exists while a worker
    serves the model (its consumer group is on each lane) but the split, which exists only during a rollout: it is
    named only then, as a Cluster answers a script naming a key that is on neither side of a slot being moved with
    TRYAGAIN until the move ends."""
    return [request_stream(model), queued_bytes(model),
            *(request_stream(model, priority=p) for p in PRIORITY_LANES if p != "normal"),
            *([routing(model)] if split else [])]


def ack_keys(model: str, version: str = "", priority: str = "normal") -> list[str]:
    """The acknowledge script's KEYS (sender.py): the stream the entries are on, the model's byte counter."""
    return [request_stream(model, version, priority), queued_bytes(model)]


def guard_keys(model: str, version: str) -> list[str]:
    """The rollout guard's KEYS (sender.py): the version's counters and the model's traffic split."""
    return [version_stats(model, version), routing(model)]


def dead_letter_keys(model: str) -> list[str]:
    """What a dead-lettering touches (claims.py): the request and dead-letter streams, the kept payloads, the
    model's stats."""
    return [request_stream(model), dead_letter_stream(model), dead_payloads(model), stats(model)]


def cache_keys(model: str, version: str, digest: str) -> list[str]:
    """The cache store script's KEYS (cache.py): the entry, the index, the sizes, the byte counter."""
    return [cache_entry(model, version, digest), cache_index(model), cache_sizes(model), cache_bytes(model)]


def admit_keys(key_id: str) -> list[str]:
    """The admission script's KEYS (ratelimit.py): the key's record, bucket and in-flight slots."""
    return [api_key(key_id), rate_bucket(key_id), in_flight(key_id)]


def auth_index_keys() -> list[str]:
    """The key index and the managed marker, written together (keystore.py)."""
    return [API_KEY_INDEX, AUTH_MARKER]


ATOMIC = {"cache": lambda m: cache_keys(m, "1", "d"), "enqueue": enqueue_keys, "ack": ack_keys,
          "ack_lane": lambda m: ack_keys(m, "2", "high"), "guard": lambda m: guard_keys(m, "2"),
          "dead_letter": dead_letter_keys, "admit": admit_keys}
