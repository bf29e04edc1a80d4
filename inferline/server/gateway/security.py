"""API keys and per-key limits at the gateway: an ASGI layer between the Edge (request ids, error shapes) and
the routes. Raises InferlineErrors; the Edge renders each in its route's protocol family shape.

Per request: parse `Authorization: Bearer il_<id>_<secret>`; if this process has not yet verified that secret,
read the key's record (one Redis read) and check the secret against its salted hash (scrypt, off the event
loop); then one atomic script (server/broker/ratelimit.py) checks that the record still carries that hash
(a revocation holds at once, on every gateway), its expiry, the key's rate and concurrency, and returns the
key's current scopes and models. The admission, the slot's release and the request's enqueue go through the
gateway's TickBatcher (server/broker/ticks.py): all of those of one event-loop tick share one Redis round trip.

Exempt: the probes (/healthz, /readyz and KServe's /v2/health/live and /v2/health/ready), and /metrics while
security.metrics_public is on. security.auth = "auto" on a loopback address requires keys only while any key
exists (SECURITY.md).

Fail closed: once this gateway has seen keys, finding none left in Redis *and* no record there that they were
revoked (keys.AUTH_MARKER) means Redis lost them: every request then gets 503 naming that, never a pass without a
key. For `inferline up`'s private Redis the gateway first puts the records back from their durable copy
(server/auth/keyfile.py), which also covers a gateway restarted after Redis lost everything.
An unknown key id costs the same scrypt run as a wrong secret (checked against a dummy hash), so the time of a
refusal does not tell whether an id exists; failed checks are throttled per client address (gateway/throttle.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferline.server.auth import keyfile
from inferline.server.auth.keys import (
    SCOPE_ADMIN,
    SCOPE_INFER,
    ApiKey,
    BadKey,
    Verifier,
    hash_secret,
    parse,
    split,
    verify_secret,
)
from inferline.server.broker import keystore
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.ratelimit import ADMITTED, EXPIRED, LIMITED, Admission, Limits, RateLimiter
from inferline.server.config import Settings
from inferline.server.errors import Forbidden, RateLimited, Unauthorized, Unavailable
from inferline.server.gateway import record as records
from inferline.server.gateway.throttle import FailureThrottle
from inferline.server.ids import new_id

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

log = logging.getLogger(__name__)

# Probes: a Kubernetes or KServe liveness/readiness probe carries no key.
EXEMPT = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
KDF_CONCURRENCY = 2       # scrypt runs at once (16 MiB each): a flood of wrong secrets costs at most this much
KDF_QUEUE = 64            # callers waiting for one; more get 429
KEYS_RECHECK_S = 2.0      # how old the "do keys exist, were they lost" answer may be
MISS_RECHECK_S = 0.25     # ... when a presented key has no record (Redis may just have lost them): at most 4/s
LOST = ("the API keys were lost: this deployment required keys, but its Redis now has none and no record that they "
        "were revoked (Redis restarted without persistence, or was flushed). Requests are refused until a key "
        "exists again: `inferline keys create`")


def auth_enforced(settings: Settings) -> bool:
    """Whether API keys are always required: security.auth = "required", or "auto" on a non-loopback address.
    "auto" on loopback requires them only while any key exists (Security.enforced)."""
    mode = settings.security.auth
    if mode != "auto":
        return mode == "required"
    return not is_loopback(settings.gateway.host)


def auth_possible(settings: Settings) -> bool:
    """Whether the gateway needs the security layer at all: every mode but "off"."""
    return settings.security.auth != "off"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe(settings: Settings) -> str:
    """One line for the start banner: whether keys are required, and why."""
    if auth_enforced(settings):
        return "API keys required (create one with `inferline keys create`)"
    if settings.security.auth == "off":
        return "API keys NOT required (security.auth = off); set INFERLINE_SECURITY__AUTH=required to require them"
    return (f"API keys NOT required while none exists (gateway on loopback {settings.gateway.host}, "
            "security.auth = auto); once `inferline keys create` makes one, they are")


class Security:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        """app: the next layer. The key store and the rate limiter use the gateway's Redis client and its dispatcher's
        tick batcher; which model a request is for comes from its route table."""
        self.app = app
        self.redis = gateway.redis
        self.table = gateway.table
        sec = gateway.settings.security
        self.exempt = EXEMPT | ({"/metrics"} if sec.metrics_public else set())
        self.limits = Limits(sec.rate_per_s, sec.burst, sec.concurrency, int(sec.concurrency_lease_s * 1000))
        self.verifier = Verifier()
        self.kdf = asyncio.Semaphore(KDF_CONCURRENCY)
        self.kdf_waiting = 0
        # An unknown id runs scrypt against this, so it costs what a wrong secret costs (~50 ms, once, at start).
        self.dummy_hash = hash_secret(secrets.token_urlsafe(32))
        self.failures = FailureThrottle()
        # the dispatcher's batcher: admissions, releases and enqueues of one tick share a round trip
        self.limiter = RateLimiter(gateway.redis, self.limits, gateway.dispatcher.batcher)
        self.always = auth_enforced(gateway.settings)
        self.keys_file: Path | None = sec.keys_file
        self.keys_exist = False
        self.had_keys = False     # this process saw keys and not their revocation: none left then means lost
        self.lost = False
        self.restores = 0
        self.checked_at = -math.inf
        self.checking: asyncio.Future[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt or not await self.enforced():
            await self.app(scope, receive, send)
            return
        key_id, stored = await self.authenticate(scope)
        current = records.current.get()
        if current is not None:
            current.key_id = key_id   # the audit log's "who" (gateway/audit.py)
        slot = new_id()
        admission = await self.admit(key_id, stored, slot)
        try:
            receive = await self.authorize(scope, receive, admission)
            extra = rate_headers(admission)
            current = records.current.get()
            if current is not None and admission.max_priority:   # the key's ceiling, read in the same round trip
                current.max_priority = admission.max_priority

            async def send_with_limits(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), *extra]
                await send(message)

            await self.app(scope, receive, send_with_limits)
        finally:
            if admission.slot_taken:
                with contextlib.suppress(*BROKER_ERRORS):
                    await self.limiter.release(key_id, slot)

    async def enforced(self) -> bool:
        """Whether this request needs a key: always, unless security.auth = "auto" on loopback, where it does
        while any key exists. Raises Unavailable while the keys are lost (LOST), and while Redis cannot say:
        guessing "no keys" would open the gateway."""
        await self.refresh(KEYS_RECHECK_S)
        if self.lost:
            raise Unavailable(LOST)
        return self.always or self.keys_exist

    async def refresh(self, max_age_s: float) -> None:
        """Read the keys' state again when the last read is older than max_age_s; one read shared by the requests
        waiting on it. Raises Unavailable."""
        if time.monotonic() - self.checked_at < max_age_s:
            return
        if self.checking is None:
            self.checking = asyncio.ensure_future(self.check_keys())
        await asyncio.shield(self.checking)

    async def check_keys(self) -> None:
        """Read how many keys exist and whether keys were ever managed in this Redis (one round trip); with a key
        file and a Redis that has neither, put the file's records back first. Raises Unavailable."""
        try:
            count, managed = await keystore.state(self.redis)
            if count == 0 and not managed and self.keys_file is not None:
                count = await self.restore(self.keys_file)
                managed = count > 0
        except BROKER_ERRORS as exc:
            raise Unavailable(f"the key store is unreachable: {type(exc).__name__}") from None
        finally:
            self.checking = None
        exist = count > 0
        lost = not exist and not managed and self.had_keys
        if exist != self.keys_exist or lost != self.lost:
            if lost:
                log.error("API keys lost: Redis has none and no record of their revocation; refusing requests (503)")
            elif exist:
                log.warning("API keys exist: now required")
            else:
                log.warning("API keys all revoked: %s", "no key is valid" if self.always else "no longer required")
        self.had_keys = exist or (self.had_keys and not managed)
        self.keys_exist, self.lost = exist, lost
        self.checked_at = time.monotonic()

    async def restore(self, path: Path) -> int:
        """Put the durable copy's records back into a Redis that lost them; returns how many. Raises Unavailable
        for a file that cannot be read (fail closed), and the broker's errors."""
        try:
            records = keyfile.load(path)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"the API key file {path} cannot be read: {type(exc).__name__}") from None
        if records:
            await keystore.restore(self.redis, records)
            self.restores += 1
            log.warning("restored %d API key(s) from %s: Redis had lost them", len(records), path)
        return len(records)

    async def start(self) -> None:
        """At gateway start: read whether keys exist (and restore them), so the log says it before any request."""
        with contextlib.suppress(Unavailable):
            await self.check_keys()

    async def authenticate(self, scope: Scope) -> tuple[str, str]:
        """(key id, the stored hash its secret matched). Raises Unauthorized, Unavailable or RateLimited (this
        client address failed too often: no scrypt runs for it)."""
        presented = bearer(scope)
        if presented is None:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", reason="")
        parsed = parse(presented)
        if parsed is None:
            raise Unauthorized("invalid API key")
        key_id, secret = parsed
        stored = self.verifier.remembered(key_id, secret)
        if stored is not None:
            return key_id, stored
        client = scope.get("client")
        record = await self.verify(key_id, secret, str(client[0]) if client else "")
        return key_id, record.secret_hash

    async def verify(self, key_id: str, secret: str, peer: str) -> ApiKey:
        """The key's record once the secret matched it. An unknown id, an unusable record and a wrong secret
        each cost one scrypt run (the first time: refusals are remembered) and give the same 401, so neither the
        answer nor its time tells whether the id exists; only the key's holder learns that it expired. A run of
        scrypt takes a token of `peer`'s failure throttle, given back when the secret matched.
        Raises Unauthorized, Unavailable, RateLimited."""
        record = await self.lookup(key_id)
        stored = record.secret_hash if record else ""
        if self.verifier.was_refused(key_id, secret, stored):
            raise Unauthorized("invalid API key")
        wait = self.failures.take(peer)
        if wait > 0:
            err = RateLimited(f"too many failed API key checks from this address; retry in {math.ceil(wait)} s")
            err.headers["retry-after"] = str(math.ceil(wait))
            raise err
        try:
            ok = await self.kdf_check(secret, stored or self.dummy_hash)
        except BaseException:
            self.failures.give_back(peer)   # it could not run: not a failure of this peer's
            raise
        if record is None or not ok:
            self.verifier.remember_refusal(key_id, secret, stored)   # the token stays spent
            log.info("failed key check key=%s", key_id)
            raise Unauthorized("invalid API key")
        self.failures.give_back(peer)
        if record.expired():
            raise Unauthorized(f"API key {key_id} has expired")
        self.verifier.remember(key_id, secret, record.secret_hash)
        self.had_keys = True   # seen here, between two reads of the keys' state: their loss must still fail closed
        return record

    async def lookup(self, key_id: str) -> ApiKey | None:
        """The key's record; when there is none while keys were seen, read the keys' state first (Redis may just
        have lost them: restored, or 503 LOST). Raises Unavailable."""
        record = await self.record(key_id)
        if record is None:
            restores = self.restores
            if self.had_keys:   # Redis may just have lost the keys: look now, not within KEYS_RECHECK_S
                await self.refresh(MISS_RECHECK_S)
            if self.lost:
                raise Unavailable(LOST)
            if self.restores != restores:
                record = await self.record(key_id)
        return record

    async def kdf_check(self, secret: str, stored: str) -> bool:
        """verify_secret off the event loop, at most KDF_CONCURRENCY at once. Raises RateLimited past KDF_QUEUE."""
        if self.kdf_waiting >= KDF_QUEUE:
            raise RateLimited("too many API keys are being verified at once; retry shortly")
        self.kdf_waiting += 1
        try:
            async with self.kdf:
                return await asyncio.to_thread(verify_secret, secret, stored)
        finally:
            self.kdf_waiting -= 1

    async def record(self, key_id: str) -> ApiKey | None:
        """The key's record from Redis; None when there is none or it is unusable. Raises Unavailable."""
        try:
            fields = await keystore.load(self.redis, key_id)
        except BROKER_ERRORS as exc:
            raise Unavailable(f"the key store is unreachable: {type(exc).__name__}") from None
        try:
            return ApiKey.from_fields(key_id, fields) if fields else None
        except (BadKey, ValueError):
            log.warning("unusable key record key=%s", key_id)
            return None

    async def admit(self, key_id: str, stored: str, slot: str) -> Admission:
        try:
            admission = await self.limiter.admit(key_id, stored, slot)
        except BROKER_ERRORS as exc:
            raise Unavailable(f"the key store is unreachable: {type(exc).__name__}") from None
        if admission.code == ADMITTED:
            return admission
        if admission.code == EXPIRED:
            raise Unauthorized(f"API key {key_id} has expired")
        if admission.code == LIMITED:
            err = RateLimited(limit_message(key_id, admission))
            err.headers.update({k.decode(): v.decode() for k, v in rate_headers(admission)})
            err.headers["retry-after"] = str(max(1, math.ceil(admission.retry_after_ms / 1000)))
            raise err
        raise Unauthorized("invalid API key")   # revoked or replaced since this process verified it

    async def authorize(self, scope: Scope, receive: Receive, admission: Admission) -> Receive:
        """Check the key's scopes and models for this route: the admin routes (the table's Route.admin) and /metrics
        need the `admin` scope, every other route `infer` and the model. Returns the receive to pass on (a replay when
        the body had to be read for its model name). Raises Forbidden."""
        scopes = split(admission.scopes)
        if SCOPE_ADMIN in scopes:
            return receive
        path: str = scope["path"]
        if path == "/metrics":
            raise Forbidden("/metrics needs a key with the `admin` scope", field="scope")
        if self.table.admin_route(scope["method"], path) is not None:
            raise Forbidden(f"{scope['method']} {path} is part of the admin API: it needs a key with the "
                            f"`{SCOPE_ADMIN}` scope (this key has {sorted(scopes)})", field="scope")
        if SCOPE_INFER not in scopes:
            raise Forbidden(f"this key has no `{SCOPE_INFER}` scope (it has {sorted(scopes)})", field="scope")
        model, receive = await self.table.model_of(scope["method"], path, receive)
        models = split(admission.models)
        if model is not None and "*" not in models and model not in models:
            raise Forbidden(f"this key may not use model {model!r} (it may use {sorted(models)})", field="model")
        return receive


def bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def rate_headers(a: Admission) -> list[tuple[bytes, bytes]]:
    if a.rate_per_s <= 0:
        return []
    reset = math.ceil(max(0, a.limit - a.remaining) / a.rate_per_s)
    return [(b"x-ratelimit-limit", str(a.limit).encode()), (b"x-ratelimit-remaining", str(a.remaining).encode()),
            (b"x-ratelimit-reset", str(reset).encode())]


def limit_message(key_id: str, a: Admission) -> str:
    if a.reason == "concurrency":
        return f"key {key_id} already has {a.concurrency} requests in flight (its concurrency limit)"
    return f"key {key_id} is over its rate limit of {a.rate_per_s:g} requests/s (burst {a.limit})"
