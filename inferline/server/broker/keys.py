"""Every Redis key and stream name, and the sizes and TTLs that bound them. Nothing else names a key.

Cluster-safe layout: every key carries a hash tag (the part in braces, which alone decides a key's slot on a Redis
Cluster), one tag per owner: `{m:NAME}` for everything of model NAME (request stream, byte counter, dead letters,
cancels, workers, stats, metadata), `{k:ID}` for everything of API key ID (record, bucket, in-flight slots), `{g:ID}`
for gateway ID's reply stream, `{auth}` for the key index and marker. What one script or transaction touches shares
one tag (the groups below, `ATOMIC`, are what tests/test_key_layout.py checks with the real CRC16 slot function), so
nothing crosses a slot, and models spread over the shards by name while one model's stream is never split.
On one Redis the braces change nothing but the names (`inferline migrate-keys` renames a deployment's old ones).
"""

from __future__ import annotations

PREFIX = "inferline"
GROUP = "workers"                 # the consumer group every replica of a model reads with

UNANSWERED_GRACE_MS = 60_000      # a request nobody answered is trimmed from its stream this long after its deadline
REPLY_STREAM_TTL_S = 120          # a gateway refreshes its reply stream; a dead gateway's one expires
HEARTBEAT_TTL_S = 5.0             # a worker silent this long is not live
HEARTBEAT_EVERY_S = 1.0
DEAD_LETTER_MAXLEN = 10_000
CANCEL_MAXLEN = 10_000


def _model(model: str) -> str:
    return f"{{m:{model}}}"   # config.py allows [A-Za-z0-9_.-] in names: no brace can end a tag early


def _key(key_id: str) -> str:
    return f"{{k:{key_id}}}"


PRIORITIES = ("high", "normal", "low")   # the request lanes' names, highest first
PRIORITY_LANES: tuple[str, ...] = PRIORITIES   # the lanes workers read, in the order they prefer them


def request_stream(model: str, version: str = "", priority: str = "normal") -> str:
    """A model's request stream: the common one (version "", priority "normal"), a version's lane during a rollout
    (`:v=VERSION`), a priority lane (`:p=PRIORITY`). All in the model's hash tag (one slot per model)."""
    name = f"{PREFIX}:req:{_model(model)}"
    if version:
        name += f":v={version}"
    if priority != "normal":
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
        name += f":p={priority}"
    return name


def model_streams(model: str, versions: tuple[str, ...] = ("",)) -> list[str]:
    """Every request stream of a model that a worker may read: each version's lanes (the common stream's first),
    highest priority first. What reads a model's backlog (metrics, the autoscaler, KEDA's manifests, `inferline
    top`) lists its streams here and never spells a name itself."""
    return [request_stream(model, version, priority) for version in versions for priority in PRIORITY_LANES]


def queued_bytes(model: str, priority: str = "normal") -> str:
    """Counter: the payload bytes of the entries on one of the model's request lanes, kept exact by the scripts that
    add (enqueue.py) and delete (consumer.py) them. Spelt as the stream's name plus a suffix, so it hashes to the
    stream's slot whatever hash tag the stream's name carries (both are touched by one script)."""
    return f"{request_stream(model, priority=priority)}:bytes"


def reply_stream(gateway_id: str) -> str:
    return f"{PREFIX}:reply:{{g:{gateway_id}}}"


def dead_letter_stream(model: str) -> str:
    return f"{PREFIX}:dlq:{_model(model)}"


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
def enqueue_keys(model: str) -> list[str]:
    """The enqueue script's KEYS (enqueue.py): every priority lane's stream (PRIORITY_LANES order), then their byte
    counters (the queue cap counts all lanes)."""
    return [request_stream(model, priority=p) for p in PRIORITY_LANES] + [queued_bytes(model, p)
                                                                          for p in PRIORITY_LANES]


def ack_keys(model: str, priority: str = "normal") -> list[str]:
    """The acknowledge script's KEYS (consumer.py): one lane's stream and its byte counter."""
    return [request_stream(model, priority=priority), queued_bytes(model, priority)]


def dead_letter_keys(model: str) -> list[str]:
    """What a dead-lettering touches (consumer.py): the request and dead-letter streams, the model's stats."""
    return [request_stream(model), dead_letter_stream(model), stats(model)]


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
          "dead_letter": dead_letter_keys, "admit": admit_keys}
