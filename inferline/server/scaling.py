"""The autoscaler's loop in `inferline up` / `inferline serve`: once a second, for each deployment whose
`[models.NAME.autoscale]` has `enabled = true`, read its backlog (broker/registry.py's health over all its streams),
fold it into the replicas it asks for (backlog.py), run the policy (autoscaler.py: delays, bounds, the machine's
ceiling) and write what it decides as the replicas wanted (broker/fleet.set_replicas, the write `inferline scale`
makes). It never starts or stops a process: the supervisor reconciles its workers to that key, draining one on
scale-in (SIGTERM: it answers the batch in hand and exits), so nothing queued is lost.

A model in a rollout (its deployment wants replicas of more than one version) is left alone: the rollout machinery
sets each version's replicas until it is promoted or rolled back. Redis away: nothing changes (the next tick retries).
"""

from __future__ import annotations

import logging
import time

from inferline.server.autoscaler import ScalePolicy, machine_ceiling
from inferline.server.backlog import BacklogTracker
from inferline.server.broker import fleet
from inferline.server.broker.client import Redis
from inferline.server.broker.registry import Registry
from inferline.server.config import ModelSpec

log = logging.getLogger(__name__)

TICK_S = 1.0


class Autoscaler:
    """The loop's state: a policy per autoscaled deployment and one backlog tracker (drain rates between readings)."""

    def __init__(self, redis: Redis, specs: dict[str, ModelSpec], tick_s: float = TICK_S) -> None:
        self.redis = redis
        self.registry = Registry(redis)
        self.specs = {name: spec for name, spec in specs.items() if spec.autoscale.enabled}
        self.policies = {name: ScalePolicy(spec.autoscale, machine_ceiling(spec.device, spec.threads))
                         for name, spec in self.specs.items()}
        self.tracker = BacklogTracker()
        self.tick_s = tick_s
        self.last_tick = 0.0
        self.decisions: list[tuple[float, str, int, int]] = []   # (at, model, from, to): the last 100, for logs/tests

    @property
    def active(self) -> bool:
        return bool(self.specs)

    def due(self, now: float) -> bool:
        return self.active and now - self.last_tick >= self.tick_s

    async def tick(self, now: float | None = None) -> dict[str, int]:
        """One round over the autoscaled deployments: the replicas written, by model (none when nothing changed).
        Raises redis errors (the caller logs them and tries again on its next tick)."""
        now = time.monotonic() if now is None else now
        self.last_tick = now
        names = list(self.specs)
        deployments = await fleet.deployments(self.redis, names)
        health = await self.registry.health(names)
        written: dict[str, int] = {}
        for name in names:
            dep = deployments.get(name)
            backlog = self.tracker.update(name, health[name], now, self.specs[name].autoscale)
            if dep is None or len(dep.replicas) != 1:   # not written yet, or in a rollout: not ours to move
                continue
            (version, current), = dep.replicas.items()
            target = self.policies[name].step(backlog.desired, current, now)
            if target is None or target == current:
                continue
            await fleet.set_replicas(self.redis, name, version, target)
            written[name] = target
            self.decisions = [*self.decisions[-99:], (now, name, current, target)]
            log.info("autoscale model=%s replicas %d -> %d (waiting=%d in_flight=%d drain=%s/s busy=%.2f)", name,
                     current, target, backlog.waiting, backlog.in_flight,
                     "-" if backlog.drain_rate is None else f"{backlog.drain_rate:.1f}", backlog.busy_replicas)
        return written
