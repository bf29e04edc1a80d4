"""The parts of the fault suite (tests/test_faults.py): a Redis the test may kill, stop and flush (never the session's
one), a bounded HTTP load that records what became of every request, and the fault table it prints."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferline.server.broker import embedded

STEADY_S = 1.0         # the load runs this long before a fault (hundreds of requests at 16 clients)
GRACE_S = 2.0          # an answer later than its deadline by more than this counts as lost
PAUSE_AFTER_REFUSAL_S = 0.1


def start_sentinel(tmp: Path, primary_port: int, binary: str | None = None,
                   down_after_ms: int = 1000) -> tuple[subprocess.Popen[bytes], int]:
    """One Sentinel (quorum 1) watching the primary on primary_port as "main" (down after down_after_ms, failover
    timeout 5 s), its config in tmp; returns the process and its port. binary: a redis-sentinel; without, the server
    binary in sentinel mode (no separate package needed). The caller kills it."""
    port = embedded.free_port()
    conf = tmp / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp}\nsentinel monitor main 127.0.0.1 {primary_port} 1\n"
                    f"sentinel down-after-milliseconds main {down_after_ms}\nsentinel failover-timeout main 5000\n")
    command = [binary, str(conf)] if binary else [embedded.find_redis_server(), str(conf), "--sentinel"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


class PrivateRedis:
    """A redis-server of the test's own (server/broker/embedded.py, the code path of `inferline up`), restartable
    at the same URL: kill -9, start again empty, SIGSTOP / SIGCONT."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.plan = embedded.plan(workdir, port=port or embedded.free_port(), open_tcp=True)
        self.argv = [*self.plan.argv, *(extra or [])]
        self.url = self.plan.url
        self.tcp_url = f"redis://127.0.0.1:{self.plan.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        embedded.wait_ready(self.proc, self.plan)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)   # a stopped one must not stay stopped
        self.proc.kill()
        self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@dataclass
class Outcome:
    """One request: when it started and ended (monotonic s) and how: an HTTP status, "refused" (no connection:
    the gateway was down), "dropped" (the connection broke while the gateway held it) or "lost" (no answer by its
    deadline plus GRACE_S)."""

    target: str
    started: float
    ended: float
    status: int | str
    request_id: str

    @property
    def seconds(self) -> float:
        return self.ended - self.started


Request = Callable[[int], tuple[str, str, dict[str, Any]]]   # i -> (target name, url, JSON body)


async def run_load(request: Request, deadline_s: dict[str, float], clients: int, duration_s: float,
                   fault: Callable[[], Awaitable[None]], probe_every_s: float = 0.25) -> list[Outcome]:
    """`clients` concurrent clients send requests back to back for duration_s while `fault` runs; returns every
    request's outcome. A client waits each request's deadline (per target) plus GRACE_S, then counts it lost. A
    refused or 503 request is retried after a short pause, as a client honouring Retry-After briefly would.
    Besides, every probe_every_s one fresh request per target starts, whatever the clients wait on: when the service
    comes back is read from these, not from clients still waiting out the deadline of a request Redis lost."""
    outcomes: list[Outcome] = []
    counter = itertools.count()
    end = time.monotonic() + duration_s
    run = uuid.uuid4().hex[:8]   # request ids never repeat across runs: a worker remembers cancelled ones

    async def send(http: httpx.AsyncClient, i: int) -> int | str:
        target, url, body = request(i)
        rid = f"load-{run}-{i}"
        started = time.monotonic()
        status: int | str
        try:
            response = await http.post(url, json=body, headers={"x-request-id": rid},
                                       timeout=deadline_s[target] + GRACE_S)
            status = response.status_code
        except httpx.TimeoutException:
            status = "lost"
        except httpx.ConnectError:
            status = "refused"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            status = "dropped"
        outcomes.append(Outcome(target, started, time.monotonic(), status, rid))
        return status

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            if await send(http, next(counter)) in ("refused", "dropped", 503):
                await asyncio.sleep(PAUSE_AFTER_REFUSAL_S)

    async def probe(http: httpx.AsyncClient) -> None:
        sending: set[asyncio.Task[int | str]] = set()
        while time.monotonic() < end:
            targets: set[str] = set()
            while len(targets) < len(deadline_s):   # one of each target, in the request plan's own mix
                i = next(counter)
                if request(i)[0] not in targets:
                    targets.add(request(i)[0])
                    sending.add(asyncio.create_task(send(http, i)))
            await asyncio.sleep(probe_every_s)
        await asyncio.gather(*sending)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=clients)   # a pool wait is no "lost"
    async with httpx.AsyncClient(limits=limits) as http:
        faulting = asyncio.create_task(fault())
        await asyncio.gather(probe(http), *[client(http) for _ in range(clients)])
        await faulting
    return outcomes


@dataclass
class Row:
    """One line of the fault table."""

    fault: str
    outcomes: list[Outcome]
    notes: list[str] = field(default_factory=list)

    def count(self, status: int | str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def other(self) -> int:
        known = {200, 503, 504, "refused", "dropped", "lost"}
        return sum(o.status not in known for o in self.outcomes)

    def cells(self) -> list[str]:
        slowest = max((o.seconds for o in self.outcomes if o.status not in ("lost",)), default=0.0)
        return [self.fault, str(len(self.outcomes)), str(self.count(200)), str(self.count(503)), str(self.count(504)),
                str(self.other), str(self.count("refused")), str(self.count("dropped")), str(self.count("lost")),
                f"{slowest:.1f}", "; ".join(self.notes)]


HEADER = ["fault", "sent", "200", "503", "504", "other", "refused", "dropped", "lost", "slowest s", "notes"]


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table (also pasted in README's "Faults and recovery")."""
    lines = [HEADER, *[r.cells() for r in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    return "\n".join(" | ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]]).rstrip()
                     for line in lines)


def first_ok_after(outcomes: list[Outcome], target: str, since: float) -> float | None:
    """Seconds from `since` to the end of the first 200 for `target` among requests started after `since`."""
    ends = [o.ended for o in outcomes if o.target == target and o.status == 200 and o.started >= since]
    return min(ends) - since if ends else None


def printed_rows(request: pytest.FixtureRequest, title: str) -> Iterator[list[Row]]:
    """For a module-scoped fixture: the list a module's tests add their Rows to, printed as one table with `title`
    when the module ends (shown with or without -s)."""
    collected: list[Row] = []
    yield collected
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if collected and capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n\n{title}:")
            print(table(collected), flush=True)
