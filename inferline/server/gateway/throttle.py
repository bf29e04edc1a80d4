"""Failed API key checks per peer (client address), so a flood of wrong secrets costs little CPU.

Each check of a secret the gateway has not verified before runs scrypt (~40-90 ms of a core here, 16 MiB). One
client sending wrong secrets at full speed kept KDF_CONCURRENCY (2) cores busy and starved every other caller's
first request. A token bucket per address, in this process's memory (no Redis round trip: it must cost less than
what it saves): a check takes a token before scrypt runs and gives it back when the secret was right, so only
failures spend them. BURST failures at once, then RATE_PER_S a second; beyond that 429 with Retry-After, without
scrypt. A peer holding a key this gateway has verified before is never throttled (no scrypt runs for it).

Behind a proxy every client shares the proxy's address: the bucket is then the proxy's (SECURITY.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

BURST = 10            # failed checks a peer may make at once (a person mistyping a key a few times)
RATE_PER_S = 1.0      # then this many a second: one scrypt a second costs ~5 % of a core
MAX_PEERS = 10_000    # buckets remembered (LRU, ~200 B each); a forgotten peer starts full again


class FailureThrottle:
    """Token buckets of failed authentications by peer. Not thread-safe: the gateway's event loop only."""

    def __init__(self, burst: int = BURST, rate_per_s: float = RATE_PER_S, max_peers: int = MAX_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.rate = rate_per_s
        self.max_peers = max_peers
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # peer -> (tokens, at)

    def _tokens(self, peer: str, now: float) -> float:
        tokens, at = self.buckets.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, peer: str) -> float:
        """Take a token for one check. Returns 0.0 when taken, else the seconds until one is free (the caller
        answers 429 and runs no check)."""
        now = self.clock()
        tokens = self._tokens(peer, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.rate
        self.buckets[peer] = (tokens - 1.0, now)
        self.buckets.move_to_end(peer)
        while len(self.buckets) > self.max_peers:
            self.buckets.popitem(last=False)
        return 0.0

    def give_back(self, peer: str) -> None:
        """The check did not fail (right secret, or it could not run): its token returns."""
        now = self.clock()
        if peer in self.buckets:
            self.buckets[peer] = (min(self.burst, self._tokens(peer, now) + 1.0), now)
