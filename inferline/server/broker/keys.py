"""Every Redis key and stream name, and the sizes and TTLs that bound them. Nothing else names a key."""

from __future__ import annotations

PREFIX = "inferline"
GROUP = "workers"                 # the consumer group every replica of a model reads with

UNANSWERED_GRACE_MS = 60_000      # a request nobody answered is trimmed from its stream this long after its deadline
REPLY_STREAM_TTL_S = 120          # a gateway refreshes its reply stream; a dead gateway's one expires
HEARTBEAT_TTL_S = 5.0             # a worker silent this long is not live
HEARTBEAT_EVERY_S = 1.0
DEAD_LETTER_MAXLEN = 10_000
CANCEL_MAXLEN = 10_000


def request_stream(model: str) -> str:
    return f"{PREFIX}:req:{model}"


def queued_bytes(model: str) -> str:
    """Counter: the payload bytes of the entries on the model's request stream, kept exact by the scripts that add
    (enqueue.py) and delete (consumer.py) them. Spelt as the stream's name plus a suffix, so it hashes to the
    stream's slot whatever hash tag the stream's name carries (both are touched by one script)."""
    return f"{request_stream(model)}:bytes"


def reply_stream(gateway_id: str) -> str:
    return f"{PREFIX}:reply:{gateway_id}"


def dead_letter_stream(model: str) -> str:
    return f"{PREFIX}:dlq:{model}"


def cancel_stream(model: str) -> str:
    """Cancellations (client gone) fan out to every replica of a model; each drops what it holds."""
    return f"{PREFIX}:cancel:{model}"


def worker(model: str, worker_id: str) -> str:
    """Hash: device, pid, host, version, batches, items, max_batch, active. Expires with the heartbeat."""
    return f"{PREFIX}:worker:{model}:{worker_id}"


def workers_index(model: str) -> str:
    """Sorted set of a model's worker ids scored by last heartbeat (epoch ms)."""
    return f"{PREFIX}:workers:{model}"


def stats(model: str) -> str:
    """Hash: a model's counters, kept across worker restarts (server/metrics.py). Fields are metric sample names
    ("name|le" for a histogram bucket); workers add their increments with each heartbeat, the broker adds the
    STAT_* fields when it reclaims or dead-letters. No TTL: a counter must not reset while anyone reads it."""
    return f"{PREFIX}:stats:{model}"


STAT_RECLAIMED = "reclaimed"
STAT_REDELIVERED = "redelivered"
STAT_DEAD_LETTERED = "dead_lettered"


def model_info(model: str) -> str:
    """JSON the workers publish at start: version, platform, kind, v2 inputs/outputs. Read by gateways."""
    return f"{PREFIX}:model:{model}"


# API keys (server/auth/keys.py). Workers' Redis ACL user is denied everything under inferline:auth:*.
AUTH_PREFIX = f"{PREFIX}:auth"
API_KEY_INDEX = f"{AUTH_PREFIX}:keys"     # set of key ids, for `inferline keys list`
# Hash {updated: epoch s}: "keys have been managed in this Redis", written with every key and kept when keys are
# revoked, so "no key left" reads as "all revoked" while it exists and as "this Redis lost its keys" once it is gone.
# Under the key-record prefix because the gateway and admin ACL users may already read and write there
# (SECURITY.md); "_managed" can never be a key id (16 hex digits).
AUTH_MARKER = f"{AUTH_PREFIX}:key:_managed"


def api_key(key_id: str) -> str:
    """Hash: the key's record (salted hash of its secret, scopes, models, expiry, limits). Never the secret."""
    return f"{AUTH_PREFIX}:key:{key_id}"


def rate_bucket(key_id: str) -> str:
    """Hash: the key's token bucket (tokens, ts in ms). Expires once it would be full again."""
    return f"{AUTH_PREFIX}:bucket:{key_id}"


def in_flight(key_id: str) -> str:
    """Sorted set: the key's requests in flight, scored by when their slot lapses (a dead gateway's slots do)."""
    return f"{AUTH_PREFIX}:inflight:{key_id}"
