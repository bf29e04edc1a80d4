"""Redis Cluster routing for the hot paths that bypass redis-py's command layer (ticks.py's pipelined round trips,
roundtrip.py's held blocking reads): which node serves a key's slot, a plain client per node, and what a MOVED, ASK or
TRYAGAIN refusal asks for. Everything else (the registry, key store, reclaims) goes through redis-py's own
RedisCluster, which discovers the slot map and follows redirects itself; `Cluster` is that client with a `Router`.

Rules:
- The slot map is CLUSTER SLOTS, read when first needed, and again (in the background, at most one read at a time
  and not more often than every REFRESH_EVERY_S) after a MOVED or a broken node connection. A MOVED also points its
  slot at the named node at once, so the next call goes there without waiting for the refresh.
- A call is redirected at most MAX_REDIRECTS times (MOVED, ASK), and retried on TRYAGAIN (a multi-key call whose
  keys are half-migrated: it did not run) at most TRYAGAIN_TRIES times, TRYAGAIN_WAIT_S apart: nothing loops.
- A node client is made exactly as connect() makes a client (timeouts, TLS, ACL user and password, the one
  retry on a broken connection): the same URL with that node's host and port.
On one Redis none of this runs: `router_of` is None and the hot paths hash no slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, MovedError, TryAgainError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
TRYAGAIN_TRIES = 200
# 200 x 25 ms = 5 s: a script's keys (up to 5 of a model's) stay half-migrated until the reshard has moved them all;
# redis-cli moves 10 keys in a few ms, a slow reshard (test_cluster_serving: one key each 0.3 s) takes seconds. The
# request still ends at its own deadline.
TRYAGAIN_WAIT_S = 0.025
REFRESH_EVERY_S = 0.2
SLOT_CACHE = 10_000


class Router:
    """The slot map of one Redis Cluster and a client per node. `ready` once the map was read (`ensure`)."""

    def __init__(self, cluster: RedisCluster, make_client: Callable[[str], aioredis.Redis]) -> None:
        self.cluster = cluster
        self.make_client = make_client
        self.owner: list[str] = []            # slot -> "host:port" of its primary; empty until the first read
        self.clients: dict[str, aioredis.Redis] = {}
        self.refreshing: asyncio.Task[None] | None = None
        self.refreshed_at = 0.0
        self.refreshes = 0                    # maps read (for tests)
        self.redirects: dict[str, int] = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0}   # refusals followed (for tests)
        # key -> slot, for node_of: the hot paths name the same few keys (a model's stream, a gateway's reply
        # stream, an API key's bucket) every call; a dict lookup is one call where key_slot is five (encode, two
        # finds for the hash tag, the CRC, a modulo). Cleared whole when full (SLOT_CACHE keys: ~1 MB).
        self.slots: dict[str | bytes, int] = {}

    @property
    def ready(self) -> bool:
        return bool(self.owner)

    async def ensure(self) -> None:
        """Read the slot map unless it was read. Raises the cluster's error when no node answers."""
        if not self.owner:
            await self.refresh()

    async def refresh(self) -> None:
        """Read CLUSTER SLOTS (redis-py's client asks a node it knows, and tries another when one is down)."""
        slots: Any = await self.cluster.execute_command("CLUSTER SLOTS")
        owner = [""] * REDIS_CLUSTER_HASH_SLOTS
        for (start, end), nodes in slots.items():
            host, port = nodes["primary"][:2]
            name = f"{_text(host) or '127.0.0.1'}:{int(port)}"
            owner[int(start):int(end) + 1] = [name] * (int(end) - int(start) + 1)
        if any(not name for name in owner):
            log.warning("cluster slot map: %d slots not served", owner.count(""))
        self.owner = owner
        self.refreshed_at = time.monotonic()
        self.refreshes += 1

    def refresh_soon(self) -> None:
        """Read the map again in the background (a MOVED, a node that broke): at most one read at a time, and at
        most one every REFRESH_EVERY_S. Errors are logged: the next redirect or failure asks again."""
        if self.refreshing is not None and not self.refreshing.done():
            return
        wait = max(0.0, self.refreshed_at + REFRESH_EVERY_S - time.monotonic())
        self.refreshing = asyncio.get_running_loop().create_task(self._refresh_after(wait))

    async def _refresh_after(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        try:
            await self.refresh()
        except Exception as exc:   # noqa: BLE001 - logged; the map stays as it was
            log.warning("cluster slot map refresh failed: %s", type(exc).__name__)

    def node_of(self, key: str | bytes) -> str:
        """The "host:port" of the primary serving `key`'s slot (call `ensure` first)."""
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= SLOT_CACHE:
                self.slots.clear()
            slot = self.slots[key] = key_slot(key.encode() if isinstance(key, str) else key)
        return self.owner[slot]

    def client(self, node: str) -> aioredis.Redis:
        found = self.clients.get(node)
        if found is None:
            found = self.clients[node] = self.make_client(node)
        return found

    def moved(self, slot: int, node: str) -> None:
        """Redis said `slot` is served by `node` now: send there from now on, and read the whole map again soon."""
        if self.owner:
            self.owner[slot] = node
        self.refresh_soon()

    async def aclose(self) -> None:
        if self.refreshing is not None:
            self.refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self.refreshing
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


class Cluster(RedisCluster):
    """redis-py's RedisCluster (for ordinary commands and pipelines) and the Router of our hot paths. Made by
    client.connect(url, cluster=True)."""

    router: Router

    async def aclose(self) -> None:
        await self.router.aclose()
        await super().aclose()


def router_of(redis: Any) -> Router | None:
    """The Router of a cluster client; None for a client of one Redis."""
    return redis.router if isinstance(redis, Cluster) else None


def redirect(error: Any) -> tuple[str, int, str] | None:
    """("MOVED" | "ASK" | "TRYAGAIN", slot, "host:port") for a refusal that asks to send the call elsewhere or
    again (TRYAGAIN: slot -1, node ''); None for anything else."""
    if isinstance(error, AskError):   # redis-py's parser makes "-MOVED slot host:port" a MovedError (an AskError)
        host, port = error.node_addr
        return "MOVED" if isinstance(error, MovedError) else "ASK", error.slot_id, f"{host}:{port}"
    if isinstance(error, TryAgainError):
        return "TRYAGAIN", -1, ""
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
