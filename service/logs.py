"""Logging an error that repeats: the first one with its traceback, then one line with a count while it goes on,
not a traceback a second (a Redis outage used to grow the logs by ~20 KB/s)."""

from __future__ import annotations

import logging
import time

SUMMARY_EVERY_S = 30.0


class RepeatingError:
    """One per loop that retries. Call failed() in its except block and ok() after a success. Exceptions of the
    `expected` types (Redis away: service.broker.client.BROKER_ERRORS) are logged without a traceback, which would
    only say where the call was; any other keeps its traceback the first time."""

    def __init__(self, log: logging.Logger, what: str, expected: tuple[type[BaseException], ...] = ()) -> None:
        self.log = log
        self.what = what
        self.expected = expected
        self.count = 0
        self.since = 0.0
        self.said = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.since = self.said = now
            self.log.warning("%s failed: %s: %s", self.what, type(exc).__name__, exc,
                             exc_info=None if isinstance(exc, self.expected) else exc)
        elif now - self.said >= SUMMARY_EVERY_S:
            self.said = now
            self.log.warning("%s still failing: %d times in %.0f s, last %s: %s", self.what, self.count,
                             now - self.since, type(exc).__name__, exc)

    def ok(self) -> None:
        if self.count:
            self.log.warning("%s recovered after %d failures in %.0f s", self.what, self.count,
                             time.monotonic() - self.since)
            self.count = 0
