"""The management API's gate and audit log: an ASGI layer just inside the Edge, in front of the security layer, that
acts on the route table's admin routes (`Route.scope == "admin"`) only and passes every other request on untouched
(one `str.startswith` on the table's admin path heads, ~0.1 µs).

For an admin call it
- refuses it (403, the body says why) from any address but loopback while no API key exists: with no key there is
  nobody to authenticate, so only a caller on the gateway's own machine may manage it. With security.auth = "off"
  (no security layer at all) that holds whether keys exist or not. Behind a proxy on the same machine every caller
  looks local: put the gateway behind keys there (SECURITY.md);
- leaves the key and its `admin` scope to the security layer (security.py: 401 without a key once keys exist or are
  required, 403 without the scope);
- logs it once answered, allowed or not, on the `inferline.audit` logger: who (the key id; "loopback" for a call
  allowed without a key; else "anonymous"; and the peer's address), what (method, path, model, a summary of the
  JSON body with scalar fields only: never a payload), when (the log line's time and `at=`, UTC), the status and
  the time taken."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferline.server.errors import Forbidden, InferlineError
from inferline.server.gateway import record
from inferline.server.gateway.errors import kind_of
from inferline.server.gateway.security import KEYS_RECHECK_S, Security, is_loopback
from inferline.server.gateway.table import RouteTable, read_body

audit = logging.getLogger("inferline.audit")

SUMMARY_CHARS = 240      # a logged body summary is cut here
SUMMARY_STRING = 64      # a string field longer than this is logged as its length
NO_KEY_REMOTE = ("the admin API is refused from {peer}: no API key exists, so only loopback callers may use it. "
                 "Create an admin key (`inferline keys create --scope admin`) and send it as "
                 "`Authorization: Bearer <key>`")
AUTH_OFF_REMOTE = ("the admin API is refused from {peer}: security.auth = \"off\" serves it to loopback callers only "
                   "(there are no keys to check); turn keys on to manage this gateway from elsewhere")


def summarize(body: bytes) -> str:
    """A JSON body's scalar fields for the audit log, as compact JSON: numbers, booleans and short strings as they
    are; long strings, lists and objects by their size (a load's `file:` parameters, a replay's ids). Not JSON: its
    size. At most SUMMARY_CHARS."""
    if not body:
        return "-"
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"<{len(body)} bytes>"
    if not isinstance(parsed, dict):
        return f"<{type(parsed).__name__}>"
    out = {str(k)[:SUMMARY_STRING]: _scalar(v) for k, v in parsed.items()}
    text = orjson.dumps(out).decode()
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 3] + "..."


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= SUMMARY_STRING else f"<string {len(value)}>"
    if isinstance(value, list):
        return f"<list {len(value)}>"
    if isinstance(value, dict):
        return f"<object {len(value)} keys: {','.join(sorted(str(k)[:32] for k in value)[:8])}>"
    return f"<{type(value).__name__}>"


class AdminGate:
    def __init__(self, app: ASGIApp, table: RouteTable, security: Security | None) -> None:
        """app: the next layer (the security layer, or the hot path with security.auth = "off"). security: whether
        keys exist comes from it (None: no keys are ever checked)."""
        self.app = app
        self.table = table
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.table.admin_route(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        local = is_loopback(peer)
        body, receive = await read_body(receive)
        found = self.table.match(scope["method"], scope["path"])
        model = found[1].get("model", "") if found is not None else ""
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not local:
                if self.security is None:
                    raise Forbidden(AUTH_OFF_REMOTE.format(peer=peer or "an unknown address"), field="scope")
                if not await self.keys_exist(self.security):
                    raise Forbidden(NO_KEY_REMOTE.format(peer=peer or "an unknown address"), field="scope")
            await self.app(scope, receive, send_status)
        except InferlineError as err:
            status = kind_of(err).status
            raise
        finally:
            current = record.current.get()
            key_id = current.key_id if current is not None else ""
            who = key_id or ("loopback" if local and status < 400 else "anonymous")
            audit.info("admin call who=%s peer=%s method=%s path=%s model=%s body=%s status=%d ms=%.1f id=%s at=%s",
                       who, peer or "-", scope["method"], scope["path"],
                       model or "-", summarize(body), status, (time.perf_counter() - started) * 1e3,
                       current.request_id if current is not None else "-",
                       datetime.now(UTC).isoformat(timespec="milliseconds"))

    @staticmethod
    async def keys_exist(security: Security) -> bool:
        """Whether any API key exists now (read at most every KEYS_RECHECK_S). Raises Unavailable while the keys are
        lost or Redis cannot say (security.LOST): guessing "none" would open the gate."""
        await security.refresh(KEYS_RECHECK_S)
        await security.enforced()   # raises Unavailable while the keys are lost
        return security.keys_exist
