"""`inferline up`: Redis (a private one unless REDIS_URL is set), the demo models (built if missing),
the gateway and one process per model replica. Restarts a process that dies, with backoff, so a dead
worker's pending requests are claimed by its successor; the private Redis too (empty unless broker.persist:
every part recreates what it lost; the gateway puts the API keys back from their durable copy, auth/keyfile.py).
The first Ctrl-C drains (SIGTERM to the gateway and workers, wait, then Redis), the second kills. No process is
left behind, even when `up` itself is killed with -9: every child gets SIGTERM from the kernel when its parent
dies (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from inferline.server import store
from inferline.server.auth import keyfile
from inferline.server.broker import embedded, fleet
from inferline.server.broker.client import BROKER_ERRORS, connect
from inferline.server.config import ModelSpec, Settings
from inferline.server.logs import RepeatingError
from inferline.server.scaling import Autoscaler
from inferline.server.worker.watchdog import EXIT_HUNG

log = logging.getLogger("inferline.up")

DRAIN_S = 30.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0   # a process that ran this long has its backoff reset
POLL_S = 1.0      # how often the start-up progress asks the gateway
RECONCILE_S = 0.5   # how often the replicas wanted are read from Redis (keys.deployment)
STATE_FILE = "up.json"   # in state_dir: the running `up` for `inferline status` and `inferline down`


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    path = state_dir / STATE_FILE
    path.write_text(json.dumps(state))


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The state of the `inferline up` running from this state_dir, or None when none runs (a stale file from a
    killed one is ignored)."""
    try:
        state: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


class Progress:
    """Start-up progress, read from the gateway like any client would: each model's state when it changes, and the
    banner once /readyz says 200 and every model has its replicas live (not before: a Keras model may need many
    seconds after its process starts)."""

    def __init__(self, url: str, banner: str) -> None:
        self.url = url
        self.banner = banner
        self.ready = False
        self.states: dict[str, str] = {}
        self.next_poll = 0.0

    def poll(self) -> None:
        now = time.monotonic()
        if self.ready or now < self.next_poll:
            return
        self.next_poll = now + POLL_S
        try:
            with httpx.Client(base_url=self.url, timeout=2.0, verify=False) as http:
                ready = http.get("/readyz").status_code == 200
                models = http.get("/v1/models")
        except httpx.HTTPError:
            return   # the gateway is still starting
        if models.status_code == 200:
            # /readyz says 200 once any model can serve (one unservable model must not take the others down);
            # `up` says it is up once every model with replicas is.
            ready = ready and all(m.get("live_replicas", 0) >= m.get("replicas", 0)
                                  for m in models.json().get("data", []))
            for m in models.json().get("data", []):
                live, want = m.get("live_replicas", 0), m.get("replicas", 0)
                state = f"ready ({live}/{want} live, version {m.get('version')})" if live >= want > 0 else \
                    f"loading ({live}/{want} live)"
                if self.states.get(m["id"]) != state:
                    self.states[m["id"]] = state
                    print(f"inferline: model {m['id']} {state}", flush=True)
        if ready:
            self.ready = True
            print(self.banner, flush=True)


def configured_version(spec: ModelSpec) -> str:
    """The store version a deployment serves at start: the pinned one, else the newest; "" for a model without store
    versions (its workers load what the config names, and it cannot be rolled out)."""
    if spec.version:
        return spec.version
    path = Path(spec.artifact) if spec.artifact is not None else None
    if path is None:
        return ""
    if (path / store.MANIFEST).is_file():
        return path.name
    done = store.versions(path)
    return done[-1].name if done else ""


class FleetLink:
    """The supervisor's Redis link (broker/fleet.py), on an event loop of its own driven from the supervisor's
    loop: each call is bounded by broker.timeout_s."""

    def __init__(self, redis_url: str, timeout_s: float, specs: dict[str, ModelSpec] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.redis = connect(redis_url, timeout_s)
        self.errors = RepeatingError(log, "reading the replicas wanted", BROKER_ERRORS)
        self.started = False
        # The autoscaler (off unless a deployment's autoscale.enabled): writes the replicas wanted, never a process.
        self.autoscaler = Autoscaler(self.redis, specs or {})
        self.autoscale_errors = RepeatingError(log, "autoscaling", BROKER_ERRORS)

    def autoscale(self, now: float) -> None:
        """One autoscaler tick when one is due (every TICK_S); reconcile() then acts on what it wrote."""
        if not self.started or not self.autoscaler.due(now):
            return
        try:
            self.loop.run_until_complete(self.autoscaler.tick(now))
            self.autoscale_errors.ok()
        except BROKER_ERRORS as exc:
            self.autoscale_errors.failed(exc)

    def start(self, wanted: dict[str, dict[str, int]]) -> None:
        """Write the configuration's deployments (the truth at start)."""
        try:
            for model, versions in wanted.items():
                (version, n), = versions.items()
                self.loop.run_until_complete(fleet.init_deployment(self.redis, model, version, n))
            self.started = True
        except BROKER_ERRORS as exc:
            self.errors.failed(exc)

    def wanted(self, last: dict[str, dict[str, int]]) -> dict[str, dict[str, int]] | None:
        """The replicas wanted per model and version now; None when Redis cannot say. A record Redis lost (a restart
        without persistence) is written again from `last`."""
        if not self.started:
            self.start(last)
            if not self.started:
                return None
        try:
            found = self.loop.run_until_complete(fleet.deployments(self.redis, last))
            out: dict[str, dict[str, int]] = {}
            for model, dep in found.items():
                if dep is None:
                    for version, n in last[model].items():
                        self.loop.run_until_complete(fleet.set_replicas(self.redis, model, version, n))
                    out[model] = last[model]
                else:
                    out[model] = dep.replicas
            self.errors.ok()
            return out
        except BROKER_ERRORS as exc:
            self.errors.failed(exc)
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.redis.aclose())
        self.loop.close()


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
    # Its own session: a Ctrl-C to the terminal's process group must not reach it (Redis outlives the drain).
    own_session: bool = False
    # A worker's deployment: its model, version ("": the configured one of a model without store versions) and
    # replica index; draining once it was sent SIGTERM to go (it is not restarted: it leaves the list when it exits).
    model: str = ""
    version: str = ""
    replica: int = 0
    draining: bool = False

    def start(self) -> None:
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                     start_new_session=self.own_session)
        out.close()
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class Supervisor:
    def __init__(self, settings: Settings, redis_url: str | None) -> None:
        """redis_url None: run a private Redis (server/broker/embedded.py) in <state_dir>/redis, supervised."""
        self.settings = settings
        self.children: list[Child] = []
        self.stopping = 0
        logs = settings.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.redis: Child | None = None
        self.redis_plan: embedded.Plan | None = None
        if redis_url is None:
            self.redis_plan = embedded.plan(settings.state_dir / "redis", persist=settings.broker.persist)
            redis_url = self.redis_plan.url
            self.redis = Child("redis", self.redis_plan.argv, dict(os.environ), logs / "redis.log", own_session=True)
        self.redis_url = redis_url
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        if self.redis_plan is not None:   # the gateway restores the keys of a private Redis that lost them
            env["INFERLINE_SECURITY__KEYS_FILE"] = str(keyfile.location(settings.state_dir).resolve())
        py = sys.executable
        # The access log (a line per request) goes to a file of its own that the gateway rotates (gateway.access_log_*
        # bounds it); gateway.log keeps the rest, which grows with events, not with requests.
        gateway_env = env if settings.gateway.access_log_file else {
            **env, "INFERLINE_GATEWAY__ACCESS_LOG_FILE": str((logs / "access.log").resolve())}
        self.children.append(Child("gateway", [py, "-m", "inferline.server.cli", "gateway"], gateway_env,
                                   logs / "gateway.log"))
        self.env = env
        self.logs = logs
        # The replicas wanted of each model's versions, as last read from Redis (keys.deployment): the configuration
        # at start; `inferline scale`, rollouts and the autoscaler change it there, and reconcile() follows.
        self.served = {name: configured_version(spec) for name, spec in settings.models.items()}
        self.wanted: dict[str, dict[str, int]] = {name: {self.served[name]: spec.replicas}
                                                  for name, spec in settings.models.items()}
        for name, spec in settings.models.items():
            for i in range(spec.replicas):
                self.children.append(self.worker(name, self.served[name], i))
        self.fleet = FleetLink(redis_url, settings.broker.timeout_s, settings.models)
        self.reconciled_at = 0.0

    def worker(self, model: str, version: str, replica: int) -> Child:
        """A worker process of `version` of `model` (not started)."""
        tag = f"{model}@{version}" if version else model
        argv = [sys.executable, "-m", "inferline.server.worker.main", model, "--replica", str(replica)]
        log_name = f"worker-{model}-{version + '-' if version else ''}{replica}.log"
        return Child(f"worker {tag}#{replica}", [*argv, *(["--version", version] if version else [])], self.env,
                     self.logs / log_name,
                     model=model, version=version, replica=replica)

    def reconcile(self) -> None:
        """Start or drain workers so that each model runs the replicas of each version its deployment record wants
        (polled every RECONCILE_S; Redis away: nothing changes). A drained worker gets SIGTERM: it finishes the
        batch in hand, answers it and exits; it is not restarted."""
        now = time.monotonic()
        if now - self.reconciled_at < RECONCILE_S:
            return
        self.reconciled_at = now
        wanted = self.fleet.wanted(self.wanted)
        if wanted is None:
            return
        self.wanted = wanted
        for model, versions in wanted.items():
            running = [c for c in self.children if c.model == model and not c.draining]
            for version, n in versions.items():
                mine = sorted((c for c in running if c.version == version), key=lambda c: c.replica)
                taken = {c.replica for c in self.children if c.model == model and c.version == version}
                for i in (i for i in range(64) if i not in taken):
                    if len(mine) >= n:
                        break
                    child = self.worker(model, version, i)
                    child.start()
                    self.children.append(child)
                    mine.append(child)
                    taken.add(i)
                    log.info("started %s pid=%d (scale or rollout)", child.name, child.proc.pid if child.proc else -1)
                for child in mine[n:]:
                    self.drain(child)
            for child in running:
                if child.version not in versions:
                    self.drain(child)

    def drain(self, child: Child) -> None:
        child.draining = True
        if child.poll() is None and child.proc is not None:
            child.proc.terminate()
            log.info("draining %s pid=%d", child.name, child.proc.pid)

    def run(self) -> int:
        """Start everything and watch it until Ctrl-C/SIGTERM. Returns the exit code."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        if self.redis is not None and self.redis_plan is not None:
            self.redis.start()
            assert self.redis.proc is not None
            embedded.wait_ready(self.redis.proc, self.redis_plan)
            print(f"inferline: started a private Redis at {embedded.redacted(self.redis_url)} (set REDIS_URL to use "
                  f"your own{'' if self.settings.broker.persist else '; broker.persist = true keeps its data'})",
                  flush=True)
        for child in self.children:
            child.start()
            log.info("started %s pid=%d log=%s", child.name, child.proc.pid if child.proc else -1, child.log_path)
        gw = self.settings.gateway
        scheme = "https" if gw.tls_certfile else "http"
        url = f"{scheme}://{gw.host}:{gw.port}"
        local = f"{scheme}://{'127.0.0.1' if gw.host in ('0.0.0.0', '::', '') else gw.host}:{gw.port}"
        logs = self.settings.state_dir / "logs"
        write_state(self.settings.state_dir, {"pid": os.getpid(), "url": local, "logs": str(logs)})
        print(f"inferline: starting the gateway on {url} and {len(self.children) - 1} worker(s); logs in {logs}",
              flush=True)
        progress = Progress(local, f"inferline is up: gateway {url} (docs /docs, metrics /metrics), "
                                   f"logs {logs}; `inferline status` and `inferline down` from this directory")
        self.fleet.start(self.wanted)
        try:
            while not self.stopping:
                self._watch()
                self.fleet.autoscale(time.monotonic())
                self.reconcile()
                progress.poll()
                time.sleep(0.25)
            return self._shutdown()
        finally:
            (self.settings.state_dir / STATE_FILE).unlink(missing_ok=True)
            self.fleet.close()

    def _watch(self) -> None:
        now = time.monotonic()
        for child in [*([self.redis] if self.redis else []), *self.children]:
            code = child.poll()
            if code is None:
                if child.failures and now - child.started > STABLE_S:
                    child.failures = 0
                continue
            if child.draining:   # scaled down or retired by a rollout: gone for good
                self.children.remove(child)
                log.info("%s drained: exited with %s", child.name, code)
                print(f"inferline: {child.name} drained (exit {code})", flush=True)
                continue
            if child.restart_at == 0.0:
                child.failures += 1
                delay = min(BACKOFF_MAX_S, 0.5 * 2 ** (child.failures - 1))
                child.restart_at = now + delay
                why = " (a model call hung past predict_timeout_s)" if code == EXIT_HUNG else ""
                log.warning("%s exited with %s%s; restarting in %.1f s (see %s)", child.name, code, why, delay,
                            child.log_path)
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
        for child in [*self.children, *([self.redis] if self.redis else [])]:
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
        for child in self.children:
            if child.poll() is None and child.proc is not None:
                child.proc.kill()
        for child in live:
            assert child.proc is not None
            child.proc.wait()
        self._stop_redis()
        print("inferline: stopped", flush=True)
        return 0

    def _stop_redis(self) -> None:
        """Last, once nothing uses it: SIGTERM (it writes its append-only file when persisting), then SIGKILL."""
        if self.redis is None or self.redis.proc is None:
            return
        if self.redis.poll() is None:
            self.redis.proc.terminate()
        try:
            self.redis.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.redis.proc.kill()
            self.redis.proc.wait()
