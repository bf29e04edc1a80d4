"""Logging an error that repeats: the first one with its traceback, then one line with a count while it goes on,
not a traceback a second (a Redis outage used to grow the logs by ~20 KB/s)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import logging.handlers
import time
from pathlib import Path
from typing import IO

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


# --- process-wide logging ------------------------------------------------------------------------------------
# The gateway's access log: one line per request, from server/gateway/edge.py. Its arguments, in this order, are
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


FLUSH_EVERY_S = 0.2       # an access line reaches the log at most this long after its request ended
FLUSH_BYTES = 64 * 1024   # or as soon as this much is waiting
_OUTPUT: tuple[logging.Handler, IO[str], str] | None = None   # configure()'s handler, its stream and format
_ACCESS_FILE: logging.handlers.RotatingFileHandler | None = None   # route_access()'s, when the access log has a file


class AccessLog:
    """The gateway's access lines, one per request, written without logging's per-record machinery (LogRecord,
    findCaller, formatter, handler lock: ~39 µs a line, a tenth of a request's gateway CPU). Each line is one
    f-string (or one orjson object) in the very shape configure()'s formatter would give it; lines wait in a buffer
    and go out in one write FLUSH_EVERY_S after the first of a block (sooner past FLUSH_BYTES), and at exit.
    The `inferline.access` logger's level still decides whether lines are written. In a process whose logging
    configure() did not set up (an application embedding the gateway, tests), lines go through that logger as
    before, so its handlers see them. With route_access() they go to a file of their own, rotated at its size: no
    file ever passes it, unless one line alone does."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)
        self.lines: list[str] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.second = -1
        self.stamp = ""
        atexit.register(self.flush)

    def write(self, request_id: str, method: str, route: str, model: str, status: int, ms: float, queued_ms: float,
              compute_ms: float, batch: int, tokens: int) -> None:
        """One request's line (model "" is written as "-"). Call on the event loop's thread."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        output = _OUTPUT
        if output is None or not _direct(self.logger):
            self.logger.info(ACCESS_FORMAT, request_id, method, route, model or "-", status, ms, queued_ms,
                             compute_ms, batch, tokens)
            return
        now = time.time()
        if output[2] == "json":
            import orjson

            line = orjson.dumps({"ts": round(now, 3), "level": "INFO", "logger": ACCESS_LOGGER, "msg": "request",
                                 "id": request_id, "method": method, "route": route, "model": model or "-",
                                 "status": status, "ms": ms, "queue_ms": queued_ms, "compute_ms": compute_ms,
                                 "batch": batch, "tokens": tokens}).decode() + "\n"
        else:
            second = int(now)
            if second != self.second:   # logging.Formatter's asctime, its strftime done once a second
                self.second, self.stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = (f"{self.stamp},{int((now - second) * 1000):03d} INFO {ACCESS_LOGGER} request id={request_id} "
                    f"method={method} route={route} model={model or '-'} status={status} ms={ms:.1f} "
                    f"queue_ms={queued_ms:.1f} compute_ms={compute_ms:.1f} batch={batch} tokens={tokens}\n")
        self.lines.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self.flush)
            except RuntimeError:   # no event loop (a synchronous caller): write now
                self.flush()

    def flush(self) -> None:
        """Write the waiting lines in one block."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.lines or _OUTPUT is None:
            return
        lines, self.lines, self.size = self.lines, [], 0
        rotating = _ACCESS_FILE
        handler: logging.Handler = rotating if rotating is not None else _OUTPUT[0]
        handler.acquire()   # not mid-way through another thread's log line
        try:
            if rotating is not None:
                _write_rotating(rotating, lines)
            else:
                _OUTPUT[1].write("".join(lines))
                _OUTPUT[1].flush()
        except (OSError, ValueError):   # stderr closed or gone, or a full disk: the lines are lost, the request is not
            pass
        finally:
            handler.release()


def _direct(access: logging.Logger) -> bool:
    """Whether access lines may go straight to their output: configure() (and route_access(), if called) set it up,
    and nobody gave the access logger other handlers since."""
    if _ACCESS_FILE is not None:
        return access.handlers == [_ACCESS_FILE]
    return _OUTPUT is not None and _OUTPUT[0] in logging.getLogger().handlers and not access.handlers


def _write_rotating(handler: logging.handlers.RotatingFileHandler, lines: list[str]) -> None:
    """Append `lines` to the handler's file, rolling it over (access.log -> access.log.1 ...) before the line that
    would take it past maxBytes. The lines are ASCII (ids, routes, model names, numbers), so a character is a byte."""
    if handler.stream is None:   # a handler opened with delay, or closed by a failed rollover
        handler.stream = handler._open()  # noqa: SLF001
    size = handler.stream.tell()
    start = 0
    for i, line in enumerate(lines):
        if size + len(line) > handler.maxBytes and size > 0:
            handler.stream.write("".join(lines[start:i]))
            handler.doRollover()
            start, size = i, 0
        size += len(line)
    handler.stream.write("".join(lines[start:]))
    handler.stream.flush()


def route_access(path: Path, max_bytes: int, backups: int) -> None:
    """Send the access log to `path` (its directory is made), rotated at max_bytes with `backups` old files kept, in
    configure()'s format; nothing else goes there, and access lines no longer go to stderr. Call after configure()."""
    global _ACCESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(JsonLines() if _OUTPUT is not None and _OUTPUT[2] == "json" else
                         logging.Formatter(TEXT_FORMAT))
    access = logging.getLogger(ACCESS_LOGGER)
    for old in list(access.handlers):
        access.removeHandler(old)
    access.addHandler(handler)
    access.propagate = False
    _ACCESS_FILE = handler


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
    # httpx logs each request it makes at INFO: `inferline up`'s readiness polls printed two lines a second while
    # models loaded. What a process's own calls did is in its own lines; httpx's warnings still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    global _OUTPUT
    if handler in logging.getLogger().handlers:   # basicConfig leaves logging alone when it was set up already
        _OUTPUT = (handler, handler.stream, fmt)
