"""Rollouts: a model moves from one store version to another under live traffic, with no failed request, and rolls
back by itself when the new version cannot load or fails too often.

    POST /admin/models/NAME/rollout {"version": "2", "canary_percent": 20}    (or `inferline rollout NAME 2`)

How a rollout goes (every step is a field in Redis, in the model's hash tag, so every gateway and supervisor sees the
same; broker/fleet.py):
1. `starting`: the split (keys.routing) sends every request to the old version's lane, which only old workers read,
   and the deployment wants `replicas` workers of the new version: the supervisor starts them beside the old ones.
   No request goes to the new version until its workers beat (live).
2. `canary` (share = canary_percent) or `rolling` (share = 100): the split sends that share of the requests to the new
   version's lane, exactly (a shared counter, enqueue.py). Its window opens: the first `window_requests` answers or
   `window_s` seconds. The new version's workers count their answers and failures (5xx-type: internal errors and
   dead letters, never a caller's bad input) and, the moment failures pass `max_failure_rate` of the window, set the
   share back to 0 in the same Redis step (sender.py's guard): the rollback needs no poll to begin.
3. `POST .../promote` moves a canary to `rolling`. Once the window closed within the threshold, `draining`: when the
   old lane is empty (every request on it answered, by the old workers), the deployment stops wanting old workers:
   the supervisor sends them SIGTERM, they finish the batch in hand, answer it and exit 0. Then the split is cleared
   (every request goes to the common stream again) and the rollout is `done`.
   A rollback (`rolling_back`, then `rolled_back`) is the same in reverse: share 0, the new lane answered by the new
   workers, then they drain. Automatic ones are logged, counted (inferline_automatic_rollbacks_total) and say why.

Who drives it: `Controller`, in every gateway, one at a time per model (a lock in Redis with a TTL: a gateway that
dies hands over within LOCK_TTL_MS). Under Kubernetes, where no supervisor starts workers, the same controller sets
the split; the operator runs the new version as a second worker Deployment (README: Operate)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from inferline.server import store
from inferline.server.broker import fleet
from inferline.server.broker.client import BROKER_ERRORS, Redis
from inferline.server.broker.registry import Registry
from inferline.server.config import ModelSpec
from inferline.server.errors import Conflict, NotFound
from inferline.server.logs import RepeatingError

log = logging.getLogger("inferline.rollout")

TICK_S = 0.25
LOCK_TTL_MS = 3000
WINDOW_REQUESTS = 200
WINDOW_S = 60.0
MAX_FAILURE_RATE = 0.05
LOAD_TIMEOUT_S = 300.0
ACTIVE = ("starting", "canary", "rolling", "draining", "rolling_back")


def now_ms() -> int:
    return int(time.time() * 1000)


class Controller:
    """Moves each model's rollout along (see the module docstring); started by the gateway (core.py)."""

    def __init__(self, redis: Redis, registry: Registry, models: list[str], owner: str) -> None:
        self.redis = redis
        self.registry = registry
        self.models = models
        self.owner = owner

    async def run(self) -> None:
        errors = RepeatingError(log, f"rollout controller {self.owner}", BROKER_ERRORS)
        while True:
            try:
                for model in self.models:
                    state = await self.redis.hget(fleet.keys.rollout(model), "state")  # type: ignore[misc]
                    if state is not None and fleet.text(state) in ACTIVE and \
                            await fleet.lead(self.redis, model, self.owner, LOCK_TTL_MS):
                        await self.step(model)
                errors.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # noqa: BLE001 - Redis away: the next tick tries again
                errors.failed(exc)
            await asyncio.sleep(TICK_S)

    async def live(self, model: str) -> Counter[str]:
        return Counter(w.version for w in await self.registry.live_workers(model))

    async def step(self, model: str) -> None:
        """One look at the model's rollout, and the move it calls for."""
        r = await fleet.rollout(self.redis, model)
        state, old, new = r.get("state", ""), r.get("from", ""), r.get("to", "")
        now = now_ms()
        live = await self.live(model)
        counts = (await fleet.version_counts(self.redis, model, [new])).get(new, {})
        rate, window_requests = float(r["max_failure_rate"]), int(r["window_requests"])
        if state == "starting":
            if counts.get("load_error"):
                await self.roll_back(model, r, f"version {new} failed to load: {counts['load_error']}")
            elif live[new] >= max(1, int(r["replicas"])):
                share = int(r["canary"])
                await fleet.set_split(self.redis, model, share, fleet.failure_limit(rate, window_requests))
                await fleet.update_rollout(self.redis, model, {"state": "canary" if share < 100 else "rolling",
                                                               "live_ms": now})
                log.info("rollout model=%s %s -> %s: version %s live, %d%% of traffic", model, old, new, new, share)
            elif now - int(r["started_ms"]) > float(r["load_timeout_s"]) * 1000:
                await self.roll_back(model, r, f"version {new} had no live worker within {r['load_timeout_s']} s")
        elif state in ("canary", "rolling"):
            route = await fleet.routing(self.redis, model)
            requests, failures = int(counts.get("requests", 0)), int(counts.get("failures", 0))
            if route.get("tripped"):
                await self.roll_back(model, r, f"version {new}: {route['tripped']} "
                                               f"({rate:.0%} of a {window_requests}-request window)")
            elif live[new] == 0 and counts.get("load_error"):
                await self.roll_back(model, r, f"version {new} failed to load: {counts['load_error']}")
            elif r.get("window") != "closed":
                if requests >= window_requests or now - int(r["live_ms"]) >= float(r["window_s"]) * 1000:
                    if requests and failures / requests > rate:
                        await self.roll_back(model, r, f"version {new}: {failures} of {requests} answers failed in "
                                                       f"its window, over {rate:.0%}")
                        return
                    await fleet.set_split(self.redis, model, int(route.get("share", 0)), None)
                    await fleet.update_rollout(self.redis, model, {"window": "closed"})
                    log.info("rollout model=%s version %s passed its window: %d failed of %d", model, new,
                             failures, requests)
            elif state == "rolling":
                await fleet.update_rollout(self.redis, model, {"state": "draining"})
                await fleet.served(self.redis, model, new, old)
        elif state == "draining":
            await self.retire(model, r, old, live, "done")
        elif state == "rolling_back":
            await self.retire(model, r, new, live, "rolled_back")

    async def retire(self, model: str, r: dict[str, str], version: str, live: Counter[str], final: str) -> None:
        """The version no longer gets traffic: once its lane is answered, want none of its workers; once they are
        gone, clear the split (back to the common stream) and finish."""
        if await fleet.lane_depth(self.redis, model, version):
            return
        await fleet.drop_version(self.redis, model, version)
        if live[version] == 0:
            await fleet.clear_split(self.redis, model)
            await fleet.update_rollout(self.redis, model, {"state": final, "finished_ms": now_ms()})
            log.info("rollout model=%s %s -> %s %s", model, r.get("from"), r.get("to"), final)

    async def roll_back(self, model: str, r: dict[str, str], reason: str, automatic: bool = True) -> None:
        """Traffic back to the old version now; the new one is retired once its lane is answered."""
        await fleet.set_split(self.redis, model, 0, None)
        await fleet.update_rollout(self.redis, model, {"state": "rolling_back", "reason": reason,
                                                       "automatic": int(automatic)})
        if automatic:
            await fleet.count_rollback(self.redis, model)
            log.warning("automatic rollback model=%s %s -> %s: %s", model, r.get("to"), r.get("from"), reason)
        else:
            log.info("rollback model=%s %s -> %s: %s", model, r.get("to"), r.get("from"), reason)


async def status(redis: Redis, registry: Registry, model: str) -> dict[str, Any] | None:
    """The rollout's state as the API answers it (schemas.fleet.RolloutState), or None when the model never had
    one."""
    r = await fleet.rollout(redis, model)
    if not r:
        return None
    old, new = r.get("from", ""), r.get("to", "")
    route = await fleet.routing(redis, model)
    counts = await fleet.version_counts(redis, model, [old, new])
    live = Counter(w.version for w in await registry.live_workers(model))
    share = int(route.get("share", 0)) if route else (100 if r.get("state") == "done" else 0)
    retiring = {"draining": old, "rolling_back": new}.get(r.get("state", ""))
    retired = retiring is not None and await fleet.lane_depth(redis, model, retiring) == 0
    return {
        "model": model, "state": r.get("state", ""), "from_version": old, "to_version": new,
        "canary_percent": int(r.get("canary", 100)),
        "weights": {old: 100 - share, new: share},
        "live_replicas": {old: live[old], new: live[new]},
        "requests": {v: int(counts.get(v, {}).get("requests", 0)) for v in (old, new)},
        "failures": {v: int(counts.get(v, {}).get("failures", 0)) for v in (old, new)},
        "dead_lettered": {v: int(counts.get(v, {}).get("dead_lettered", 0)) for v in (old, new)},
        "window": {"requests": int(r.get("window_requests", WINDOW_REQUESTS)),
                   "seconds": float(r.get("window_s", WINDOW_S)),
                   "max_failure_rate": float(r.get("max_failure_rate", MAX_FAILURE_RATE)),
                   "closed": r.get("window") == "closed"},
        "automatic_rollback": r.get("automatic") == "1",
        "retired_version_may_stop": retired,
        "reason": r.get("reason") or None,
        "started_ms": int(r.get("started_ms", 0)), "finished_ms": int(r["finished_ms"]) if "finished_ms" in r else None,
    }


# --- what the admin API asks (gateway/routes/fleet.py) ---------------------------------------------------------
async def current_version(redis: Redis, registry: Registry, model: str) -> tuple[str, fleet.Deployment | None]:
    """The version the model serves outside a rollout, and its deployment record (None without a supervisor: then
    the one version its live workers run). Raises Conflict when it cannot tell."""
    dep = await fleet.deployment(redis, model)
    if dep is not None and dep.version:
        return dep.version, dep
    running = {w.version for w in await registry.live_workers(model)}
    if len(running) == 1:
        return running.pop(), dep
    raise Conflict(f"model {model} serves no single store version now (live workers run {sorted(running)}); "
                   "a rollout needs one", field="version")


async def begin(redis: Redis, registry: Registry, spec: ModelSpec, request: dict[str, Any]) -> None:
    """Start a rollout of spec's model to request["version"] (schemas.fleet.RolloutRequest's fields). A rollout to
    the old version while one is in progress rolls it back now. Raises NotFound (no such store version), Conflict
    (another rollout is in progress, or the version is the one served)."""
    model, version = spec.name, request["version"]
    store_dir = Path(spec.artifact) if spec.artifact is not None else None
    if store_dir is not None and store_dir.is_dir() and store.versions(store_dir) and \
            version not in [p.name for p in store.versions(store_dir)]:
        raise NotFound(f"model {model} has no version {version!r} in its store; versions: "
                       f"{[p.name for p in store.versions(store_dir)]}", field="version")
    r = await fleet.rollout(redis, model)
    if r.get("state") in ("starting", "canary", "rolling"):
        if version == r.get("from"):
            await Controller(redis, registry, [model], "api").roll_back(
                model, r, f"rolled back to {version} by an operator", automatic=False)
            return
        raise Conflict(f"model {model} is already rolling out {r.get('from')} -> {r.get('to')} ({r.get('state')}); "
                       f"promote it, or roll out {r.get('from')} to roll it back", field="version")
    if r.get("state") in ACTIVE:
        raise Conflict(f"model {model}'s last rollout is still {r.get('state')}; retry once it finished",
                       field="version")
    old, dep = await current_version(redis, registry, model)
    if version == old:
        raise Conflict(f"model {model} already serves version {version}", field="version")
    replicas = max(1, dep.replicas.get(old, spec.replicas) if dep is not None else spec.replicas)
    canary = request.get("canary_percent") or 100
    record = {"model": model, "from": old, "to": version, "canary": canary, "state": "starting",
              "started_ms": now_ms(), "replicas": replicas, "window_requests": request["window_requests"],
              "window_s": request["window_s"], "max_failure_rate": request["max_failure_rate"],
              "load_timeout_s": request["load_timeout_s"], "automatic": 0, "window": "open"}
    limit = fleet.failure_limit(request["max_failure_rate"], request["window_requests"])
    if not await fleet.begin_rollout(redis, model, record, old, version, replicas, limit):
        raise Conflict(f"model {model} has a rollout in progress", field="version")
    log.info("rollout model=%s %s -> %s started (canary %d%%, %d replicas)", model, old, version, canary, replicas)


async def promote(redis: Redis, model: str) -> None:
    """Finish a canary: all traffic to the new version (once its workers are live, when they are not yet).
    Raises Conflict when no canary is in progress."""
    r = await fleet.rollout(redis, model)
    if r.get("state") == "canary":
        await fleet.set_share(redis, model, 100)
        await fleet.update_rollout(redis, model, {"state": "rolling", "canary": 100})
    elif r.get("state") == "starting":
        await fleet.update_rollout(redis, model, {"canary": 100})
    else:
        raise Conflict(f"model {model} has no canary to promote (rollout state: {r.get('state') or 'none'})",
                       field="model")


async def scale(redis: Redis, registry: Registry, model: str, replicas: int) -> str:
    """Want `replicas` workers of the version the model serves; returns that version. Raises Conflict during a
    rollout, or when no supervisor keeps this model's deployment record (under Kubernetes: scale the Deployment)."""
    r = await fleet.rollout(redis, model)
    if r.get("state") in ACTIVE:
        raise Conflict(f"model {model} is rolling out ({r.get('state')}); scale it once the rollout finished",
                       field="replicas")
    dep = await fleet.deployment(redis, model)
    if dep is None:
        raise Conflict(f"no supervisor runs model {model}'s workers (`inferline up` / `inferline serve` keep its "
                       "replicas); under Kubernetes scale its worker Deployment", field="replicas")
    await fleet.set_replicas(redis, model, dep.version, replicas)
    log.info("scale model=%s version=%s replicas=%d", model, dep.version or "-", replicas)
    return dep.version
