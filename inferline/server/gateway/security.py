"""API keys and per-key limits at the gateway: an ASGI layer between the Edge (request ids, error shapes) and
the routes. Raises InferlineErrors; the Edge renders each in its route's protocol family shape.

Per request: parse `Authorization: Bearer il_<id>_<secret>`; if this process has not yet verified that secret,
read the key's record (one Redis read) and check the secret against its salted hash (scrypt, off the event
loop); then one atomic script (server/broker/ratelimit.py) checks that the record still carries that hash
(a revocation holds at once, on every gateway), its expiry, the key's rate and concurrency, and returns the
key's current scopes and models. The admission, the slot's release and the request's enqueue go through the
gateway's TickBatcher (server/broker/ticks.py): all of those of one event-loop tick share one Redis round trip.

Exempt: /healthz and /readyz (probes), and /metrics while security.metrics_public is on.
security.auth = "auto" on a loopback address requires keys only while any key exists (SECURITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferline.server.auth.keys import SCOPE_ADMIN, SCOPE_INFER, ApiKey, BadKey, Verifier, parse, split, verify_secret
from inferline.server.broker import keystore
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.ratelimit import ADMITTED, EXPIRED, LIMITED, Admission, Limits, RateLimiter
from inferline.server.config import Settings
from inferline.server.errors import Forbidden, RateLimited, Unauthorized, Unavailable
from inferline.server.ids import new_id

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

log = logging.getLogger(__name__)

EXEMPT = frozenset({"/healthz", "/readyz"})
KDF_CONCURRENCY = 2       # scrypt runs at once (16 MiB each): a flood of wrong secrets costs at most this much
KDF_QUEUE = 64            # callers waiting for one; more get 429
KEYS_RECHECK_S = 2.0      # auto on loopback: how old the "does any key exist" answer may be


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
        # the dispatcher's batcher: admissions, releases and enqueues of one tick share a round trip
        self.limiter = RateLimiter(gateway.redis, self.limits, gateway.dispatcher.batcher)
        self.always = auth_enforced(gateway.settings)
        self.keys_exist = False
        self.keys_checked_until = 0.0
        self.checking: asyncio.Future[bool] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt or not await self.enforced():
            await self.app(scope, receive, send)
            return
        key_id, stored = await self.authenticate(scope)
        slot = new_id()
        admission = await self.admit(key_id, stored, slot)
        try:
            receive = await self.authorize(scope, receive, admission)
            extra = rate_headers(admission)

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
        while any key exists (read at most every KEYS_RECHECK_S, one read shared by the requests waiting on it).
        Raises Unavailable while Redis cannot say: guessing "no keys" would open the gateway."""
        if self.always:
            return True
        if time.monotonic() < self.keys_checked_until:
            return self.keys_exist
        if self.checking is None:
            self.checking = asyncio.ensure_future(self.check_keys())
        return await asyncio.shield(self.checking)

    async def check_keys(self) -> bool:
        """Read whether any key exists and remember it for KEYS_RECHECK_S. Raises Unavailable."""
        try:
            exist = await keystore.any_exist(self.redis)
        except BROKER_ERRORS as exc:
            raise Unavailable(f"the key store is unreachable: {type(exc).__name__}") from None
        finally:
            self.checking = None
        if exist != self.keys_exist:
            log.warning("API keys %s (security.auth = auto on loopback)",
                        "exist: now required" if exist else "all revoked: no longer required")
        self.keys_exist = exist
        self.keys_checked_until = time.monotonic() + KEYS_RECHECK_S
        return exist

    async def start(self) -> None:
        """At gateway start: read whether keys exist (auto on loopback), so the log says it before any request."""
        if not self.always:
            with contextlib.suppress(Unavailable):
                await self.check_keys()

    async def authenticate(self, scope: Scope) -> tuple[str, str]:
        """(key id, the stored hash its secret matched). Raises Unauthorized, Unavailable or RateLimited."""
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
        try:
            fields = await keystore.load(self.redis, key_id)
        except BROKER_ERRORS as exc:
            raise Unavailable(f"the key store is unreachable: {type(exc).__name__}") from None
        try:
            record = ApiKey.from_fields(key_id, fields) if fields else None
        except (BadKey, ValueError):
            log.warning("unusable key record key=%s", key_id)
            record = None
        if record is None:
            raise Unauthorized("invalid API key")
        if record.expired():
            raise Unauthorized(f"API key {key_id} has expired")
        if self.kdf_waiting >= KDF_QUEUE:
            raise RateLimited("too many API keys are being verified at once; retry shortly")
        self.kdf_waiting += 1
        try:
            async with self.kdf:
                ok = await asyncio.to_thread(verify_secret, secret, record.secret_hash)
        finally:
            self.kdf_waiting -= 1
        if not ok:
            log.info("wrong secret key=%s", key_id)
            raise Unauthorized("invalid API key")
        self.verifier.remember(key_id, secret, record.secret_hash)
        return key_id, record.secret_hash

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
        """Check the key's scopes and models for this route. Returns the receive to pass on (a replay when the
        body had to be read for its model name). Raises Forbidden."""
        scopes = split(admission.scopes)
        if SCOPE_ADMIN in scopes:
            return receive
        path: str = scope["path"]
        if path == "/metrics":
            raise Forbidden("/metrics needs a key with the `admin` scope", field="scope")
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
