"""What the tests and the benches that drive a whole `inferline up` (or `serve`) share: the user Model they serve,
the process and its readiness, and closed-loop clients that keep every answer.

    with cli_process(["up", "--no-build"], where, env, where / "up.log") as proc:
        wait_ready(proc, where / "up.log", [url])
        with Load([url], "slow", clients=8) as load:
            ...
        assert not load.failed()
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# A user model that sleeps BENCH_SLEEP_MS (default 80) per request, one request a batch: a replica answers ~12 a
# second, so a few dozen closed-loop clients overload it (tests/test_autoscale_up.py, bench/bench_autoscale.py).
SLOW_MODEL = '''
import os
import time
from pydantic import BaseModel
from inferline import Model


class Number(BaseModel):
    x: int


class Plus(BaseModel):
    y: int


class Slow(Model):
    max_batch_size = 1

    def predict(self, batch: list[Number]) -> list[Plus]:
        time.sleep(float(os.environ.get("BENCH_SLEEP_MS", "80")) / 1000)
        return [Plus(y=n.x + 1) for n in batch]
'''


@contextlib.contextmanager
def cli_process(args: list[str], cwd: Path, env: dict[str, str], log: Path,
                stop_s: float = 40) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m inferline.server.cli *args` in cwd, its output in `log`. At the end it gets SIGINT (a user's
    Ctrl-C: `up` stops what it started) and is killed if still running after stop_s."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_ready(proc: subprocess.Popen[bytes], log: Path, urls: list[str], timeout_s: float = 120,
               path: str = "/readyz") -> None:
    """Until GET url+path is 200 on every url; raises AssertionError with the end of `log` if proc exits first,
    TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if all(httpx.get(url + path, timeout=2).status_code == 200 for url in urls):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{urls} not ready within {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@dataclass
class Answer:
    at: float          # time.monotonic() when it came back
    seconds: float     # its latency
    x: int             # the request's {"x": x}
    status: int        # 0: the client failed (the body says how)
    version: str       # the x-model-version header ("" without)
    body: dict[str, Any]


@dataclass
class Load:
    """`clients` threads, each POSTing {"x": i} to /v1/models/<model>/predict on the urls in turn (i = k, k +
    clients, ...) until the block ends; every answer is kept. Entering waits for `warm` answers (at most 30 s)."""

    urls: list[str]
    model: str
    clients: int = 8
    warm: int = 20
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, k: int) -> None:
        with httpx.Client(timeout=90) as http:
            i = k
            while not self.stop.is_set():
                url = self.urls[i % len(self.urls)]
                started = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/models/{self.model}/predict", json={"x": i})
                    answer = Answer(time.monotonic(), time.perf_counter() - started, i, r.status_code,
                                    r.headers.get("x-model-version", ""), r.json())
                except (httpx.HTTPError, ValueError) as exc:   # counted as a failure
                    answer = Answer(time.monotonic(), time.perf_counter() - started, i, 0, "", {"error": repr(exc)})
                self.answers.append(answer)
                i += self.clients

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(self.answers) < self.warm and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.answers) >= self.warm, f"the load got {len(self.answers)} answers in 30 s"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def since(self, t: float) -> list[Answer]:
        return [a for a in self.answers if a.at > t]
