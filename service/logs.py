"""Logging an error that repeats: the first one with its traceback, then one line with a count while it goes on,
not a traceback a second (a Redis outage used to grow the logs by ~20 KB/s)."""

from __future__ import annotations

import logging
import time

SUMMARY_EVERY_S = 30.0


class RepeatingError:
    """One per loop that retries. Call failed() in its except block and ok() after a success."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.count = 0
        self.since = 0.0
        self.said = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.since = self.said = now
            self.log.warning("%s failed: %s", self.what, exc, exc_info=exc)
        elif now - self.said >= SUMMARY_EVERY_S:
            self.said = now
            self.log.warning("%s still failing: %d times in %.0f s, last %s: %s", self.what, self.count,
                             now - self.since, type(exc).__name__, exc)

    def ok(self) -> None:
        if self.count:
            self.log.warning("%s recovered after %d failures in %.0f s", self.what, self.count,
                             time.monotonic() - self.since)
            self.count = 0


# --- process-wide logging ------------------------------------------------------------------------------------
# The gateway's access log: one line per request, from service/gateway/edge.py. Its arguments, in this order, are
# the JSON keys of the line. No payload ever goes into a log line (a prompt, a text, an image or a tensor).
ACCESS_LOGGER = "inferline.access"
ACCESS_FORMAT = ("request id=%s method=%s route=%s model=%s status=%d ms=%.1f queue_ms=%.1f compute_ms=%.1f "
                 "batch=%d tokens=%d")
ACCESS_KEYS = ("id", "method", "route", "model", "status", "ms", "queue_ms", "compute_ms", "batch", "tokens")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg; an access line's fields as keys of their own; exc for a
    traceback."""

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        out: dict[str, object] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        if record.name == ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == len(ACCESS_KEYS):
            out["msg"] = "request"
            out.update(zip(ACCESS_KEYS, record.args, strict=True))
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """Logging for a gateway, worker or supervisor process: INFERLINE_LOG_LEVEL (default INFO) and
    INFERLINE_LOG_FORMAT: "text" (default, readable) or "json" (JSON lines). Raises ValueError on another format."""
    import os
    import sys

    fmt = (fmt or os.environ.get("INFERLINE_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"INFERLINE_LOG_FORMAT must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level or os.environ.get("INFERLINE_LOG_LEVEL", "INFO"), handlers=[handler])
