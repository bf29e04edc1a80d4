"""`inferline up`: Redis (a private one unless REDIS_URL is set), the demo models (built if missing),
the gateway and one process per model replica. Restarts a process that dies, with backoff, so a dead
worker's pending requests are claimed by its successor. The first Ctrl-C drains (SIGTERM to all, wait),
the second kills. No process is left behind."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.broker import embedded
from service.config import Settings

log = logging.getLogger("inferline.up")

DRAIN_S = 30.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0   # a process that ran this long has its backoff reset


def _die_with_parent() -> None:
    """Children get SIGTERM if the supervisor itself is killed (Linux), so none is left behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self) -> None:
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        out.close()
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class Supervisor:
    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.children: list[Child] = []
        self.stopping = 0
        logs = settings.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        py = sys.executable
        self.children.append(Child("gateway", [py, "-m", "service.cli", "gateway"], env, logs / "gateway.log"))
        for name, spec in settings.models.items():
            for i in range(spec.replicas):
                self.children.append(Child(f"worker {name}#{i}", [py, "-m", "service.worker.main", name,
                                                                  "--replica", str(i)], env,
                                           logs / f"worker-{name}-{i}.log"))

    def run(self) -> int:
        """Start everything and watch it until Ctrl-C/SIGTERM. Returns the exit code."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for child in self.children:
            child.start()
            log.info("started %s pid=%d log=%s", child.name, child.proc.pid if child.proc else -1, child.log_path)
        print(self.banner(), flush=True)
        while not self.stopping:
            self._watch()
            time.sleep(0.25)
        return self._shutdown()

    def banner(self) -> str:
        """The line printed once everything is started; the Redis URL without its password."""
        gw = self.settings.gateway
        return (f"inferline is up: gateway http://{gw.host}:{gw.port} (docs /docs, metrics /metrics), "
                f"redis {embedded.redacted(self.redis_url)}, logs {self.settings.state_dir / 'logs'}")

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            code = child.poll()
            if code is None:
                if child.failures and now - child.started > STABLE_S:
                    child.failures = 0
                continue
            if child.restart_at == 0.0:
                child.failures += 1
                delay = min(BACKOFF_MAX_S, 0.5 * 2 ** (child.failures - 1))
                child.restart_at = now + delay
                log.warning("%s exited with %s; restarting in %.1f s (see %s)", child.name, code, delay, child.log_path)
            elif now >= child.restart_at:
                child.restart_at = 0.0
                child.restarts += 1
                child.start()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping += 1
        if self.stopping == 1:
            print("\ninferline: draining (Ctrl-C again to kill)", flush=True)
        else:
            self._kill_all()

    def _kill_all(self) -> None:
        for child in self.children:
            if child.poll() is None and child.proc is not None:
                child.proc.kill()

    def _shutdown(self) -> int:
        live = [c for c in self.children if c.poll() is None and c.proc is not None]
        for child in live:   # workers first finish the batch in hand, then exit
            assert child.proc is not None
            child.proc.terminate()
        deadline = time.monotonic() + DRAIN_S
        while any(c.poll() is None for c in live) and time.monotonic() < deadline and self.stopping < 2:
            time.sleep(0.1)
        self._kill_all()
        for child in live:
            assert child.proc is not None
            child.proc.wait()
        print("inferline: stopped", flush=True)
        return 0
