"""Each client's share of a gateway's connections: how many it holds, and how many of those are idle. Pure
bookkeeping for the connection layer (connlimits.py), one `Shares` per server process.

A client is its peer address: an IPv4 address, or an IPv6 /64 (the block one host is normally given, so a client
cannot take a fresh share per address of its own). It is not the API key: at this layer, below the ASGI app, no key
has been checked (the security layer checks it, with a Redis lookup, once the headers are in), and a key that has
not been checked is whatever the client wrote, so a share per key would be a share per invented key. What a key may
have in flight is the security layer's bound (security.concurrency). Behind a proxy every client is the proxy's
address: give the share the whole (max_connections_per_client = max_connections) and bound clients at the proxy.

Bounds: `total` connections in all and `per_client` of them from one client, checked as a connection opens; and
`idle_per_client` of a client's connections idle at once (no request in progress: new and silent past a grace,
still sending its headers then, or kept alive after a response). The grace lets a client open many connections at
once (httpx opens up to 100 for a burst) and have them all served. Idle connections are the cheap way to hold a
server's slots (a connection that never sends a byte, sends its headers a byte at a time, or is kept alive unused),
so their share is the smaller one: every client can still open connections for the requests it actually sends.
"""

from __future__ import annotations

import ipaddress


def client_of(peer: tuple[str, int] | None) -> str:
    """The share a peer address counts against: the IPv4 address, or the IPv6 /64 ('' for a unix socket)."""
    if not peer:
        return ""
    host = peer[0]
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class Shares:
    """Open and idle connections per client, and in all. Call on the event loop's thread only."""

    def __init__(self, total: int, per_client: int, idle_per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.idle_per_client = idle_per_client
        self.open = 0
        self.opened: dict[str, int] = {}   # client -> its open connections (no entry at 0: the dict stays small)
        self.idle: dict[str, int] = {}     # client -> those of them idle
        self.lingering = 0                 # connections turned away, not closed yet (connlimits.LINGER_S)

    def admit(self, client: str) -> str | None:
        """Count a new connection against `client`'s share, or return the setting it would break. It is not idle
        yet: the connection layer calls rest() once it stayed silent past its grace."""
        if self.open >= self.total:
            return "max_connections"
        if self.opened.get(client, 0) >= self.per_client:
            return "max_connections_per_client"
        self.open += 1
        self.opened[client] = self.opened.get(client, 0) + 1
        return None

    def busy(self, client: str) -> None:
        """One of the client's idle connections began a request."""
        _down(self.idle, client)

    def rest(self, client: str) -> bool:
        """One of the client's connections is idle (silent past its grace, or done with its requests and to be kept
        alive): True if it may stay (it is counted idle), False if the client's idle share is full (close it)."""
        if self.idle.get(client, 0) >= self.idle_per_client:
            return False
        self.idle[client] = self.idle.get(client, 0) + 1
        return True

    def leave(self, client: str, idle: bool) -> None:
        """One of the client's connections closed (`idle`: it was counted idle)."""
        self.open -= 1
        _down(self.opened, client)
        if idle:
            _down(self.idle, client)


def _down(counts: dict[str, int], client: str) -> None:
    left = counts.get(client, 0) - 1
    if left > 0:
        counts[client] = left
    else:
        counts.pop(client, None)
