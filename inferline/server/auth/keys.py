"""API keys: their format, how they are hashed at rest, and what a key may do. No Redis, no web framework:
server/broker/keystore.py stores the records, server/gateway/security.py enforces them.

A key reads `il_<id>_<secret>`. The id (16 hex digits) is not secret: it names the record, so a request costs
one Redis read, and it shows in `inferline keys list` and in logs. The secret (32 random bytes, url-safe base64)
is shown once, at creation; only a salted scrypt hash of it is stored. The secret alone carries 256 bits of
entropy, so the hash guards against a leaked Redis dump, not against guessing; scrypt's cost is paid once per
key per gateway process (the gateway remembers secrets it has verified, see `Verifier`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from inferline.server.broker.keys import PRIORITIES

PREFIX = "il"
SCOPE_INFER = "infer"     # inference routes and model metadata, for the models in `models`
SCOPE_ADMIN = "admin"     # everything, every model, /metrics when it is not public
SCOPES = frozenset({SCOPE_INFER, SCOPE_ADMIN})
ALL_MODELS = "*"
_KEY = re.compile(r"^il_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}   # 16 MiB, ~40-90 ms here: once per key and gateway process


class BadKey(ValueError):
    """A key or key record that cannot be used (malformed, unknown scope)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's record as stored (the secret itself never is).

    rate_per_s / burst / concurrency of 0 mean "the gateway's default" (settings.security)."""

    key_id: str
    secret_hash: str
    name: str = ""
    scopes: frozenset[str] = field(default_factory=lambda: frozenset({SCOPE_INFER}))
    models: frozenset[str] = field(default_factory=lambda: frozenset({ALL_MODELS}))
    expires_at: float = 0.0           # epoch seconds; 0: never
    created_at: float = 0.0
    rate_per_s: float = 0.0
    burst: int = 0
    concurrency: int = 0
    max_priority: str = "high"        # the highest priority lane its requests may ask for (higher is clamped)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at > 0 and (now if now is not None else time.time()) >= self.expires_at

    def allows_model(self, model: str) -> bool:
        return SCOPE_ADMIN in self.scopes or ALL_MODELS in self.models or model in self.models

    def to_fields(self) -> dict[str, str]:
        """The record as a flat string mapping (a Redis hash)."""
        return {"hash": self.secret_hash, "name": self.name, "scopes": ",".join(sorted(self.scopes)),
                "models": ",".join(sorted(self.models)), "expires_at": repr(self.expires_at),
                "created_at": repr(self.created_at), "rate": repr(self.rate_per_s), "burst": str(self.burst),
                "concurrency": str(self.concurrency), "max_priority": self.max_priority}

    @classmethod
    def from_fields(cls, key_id: str, fields: dict[str, str]) -> ApiKey:
        """Inverse of to_fields. Raises BadKey when the record lacks its hash."""
        if not fields.get("hash"):
            raise BadKey(f"key record {key_id} has no hash")
        return cls(key_id=key_id, secret_hash=fields["hash"], name=fields.get("name", ""),
                   scopes=split(fields.get("scopes", SCOPE_INFER)), models=split(fields.get("models", ALL_MODELS)),
                   expires_at=float(fields.get("expires_at") or 0), created_at=float(fields.get("created_at") or 0),
                   rate_per_s=float(fields.get("rate") or 0), burst=int(fields.get("burst") or 0),
                   concurrency=int(fields.get("concurrency") or 0),
                   max_priority=fields.get("max_priority") or "high")


def split(value: str) -> frozenset[str]:
    return frozenset(v for v in value.split(",") if v)


def parse(presented: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None. Cheap: runs before any Redis read."""
    m = _KEY.match(presented)
    return (m.group(1), m.group(2)) if m else None


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """`scrypt$n$r$p$salt$digest` (base64): the parameters travel with the hash so they can change later."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "$".join(["scrypt", str(_SCRYPT["n"]), str(_SCRYPT["r"]), str(_SCRYPT["p"]), b64(salt), b64(digest)])


def verify_secret(secret: str, stored: str) -> bool:
    """Whether `secret` matches `stored` (from hash_secret). Constant-time in the comparison; False for a
    malformed stored hash. Costs one scrypt run."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = unb64(digest)
        got = hashlib.scrypt(secret.encode(), salt=unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(want),
                             maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def new_key(name: str = "", scopes: set[str] | frozenset[str] | None = None,
            models: set[str] | frozenset[str] | None = None, ttl_s: float = 0.0, rate_per_s: float = 0.0,
            burst: int = 0, concurrency: int = 0, max_priority: str = "high") -> tuple[str, ApiKey]:
    """A fresh key: (the full key to hand to the caller once, the record to store).
    Raises BadKey for an unknown scope or a bad limit."""
    scopes = frozenset(scopes or {SCOPE_INFER})
    if not scopes <= SCOPES:
        raise BadKey(f"unknown scope(s) {sorted(scopes - SCOPES)}; known: {sorted(SCOPES)}")
    if rate_per_s < 0 or burst < 0 or concurrency < 0 or ttl_s < 0:
        raise BadKey("rate, burst, concurrency and ttl must be >= 0")
    if max_priority not in PRIORITIES:
        raise BadKey(f"max priority must be one of {', '.join(PRIORITIES)} (given {max_priority!r})")
    for model in models or ():
        if model != ALL_MODELS and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", model):
            raise BadKey(f"bad model name {model!r}")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    now = time.time()
    record = ApiKey(key_id=key_id, secret_hash=hash_secret(secret), name=name, scopes=scopes,
                    models=frozenset(models or {ALL_MODELS}), expires_at=now + ttl_s if ttl_s else 0.0,
                    created_at=now, rate_per_s=rate_per_s, burst=burst, concurrency=concurrency,
                    max_priority=max_priority)
    return f"{PREFIX}_{key_id}_{secret}", record


class Verifier:
    """Remembers which (key id, secret) pairs matched which stored hash, so scrypt runs once per key per
    process rather than per request. An entry is only trusted while the stored hash is unchanged: a revoked
    or re-created key has no record or another hash, which the caller reads fresh from Redis each request.
    Only SHA-256 digests of secrets are kept, in a bounded LRU. Refusals are remembered the same way (against the
    stored hash they failed, "" for an id with no record), so the same wrong key sent again costs no scrypt either;
    an unknown id and a wrong secret are remembered alike, so neither is answered faster than the other."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self.known: OrderedDict[bytes, str] = OrderedDict()
        self.refused: OrderedDict[bytes, str] = OrderedDict()

    @staticmethod
    def _slot(key_id: str, secret: str) -> bytes:
        return hashlib.sha256(f"{key_id}:{secret}".encode()).digest()

    def remembered(self, key_id: str, secret: str) -> str | None:
        """The stored hash this secret was last verified against, or None."""
        slot = self._slot(key_id, secret)
        stored = self.known.get(slot)
        if stored is not None:
            self.known.move_to_end(slot)
        return stored

    def remember(self, key_id: str, secret: str, stored: str) -> None:
        """Record that `secret` matched `stored` (after verify_secret said so)."""
        self.known[self._slot(key_id, secret)] = stored
        while len(self.known) > self.max_entries:
            self.known.popitem(last=False)

    def was_refused(self, key_id: str, secret: str, stored: str) -> bool:
        """Whether this secret already failed against `stored` ("" : the id had no record either)."""
        return self.refused.get(self._slot(key_id, secret)) == stored

    def remember_refusal(self, key_id: str, secret: str, stored: str) -> None:
        """Record that `secret` did not match `stored` ("" for an id with no record)."""
        self.refused[self._slot(key_id, secret)] = stored
        while len(self.refused) > self.max_entries:
            self.refused.popitem(last=False)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
