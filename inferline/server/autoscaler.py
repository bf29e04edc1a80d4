"""The autoscaler's decision: from the replicas the backlog asks for (server/backlog.py) to the replicas a deployment
should run, with an up delay, a longer down delay and a ceiling from the machine. Pure (no Redis, no processes): the
loop in `inferline up` / `inferline serve` feeds it each model's backlog once a second and writes what it returns as
the deployment's wanted replicas, the key the supervisor reconciles (the same write as `inferline scale`).

    policy = ScalePolicy(spec.autoscale, ceiling=machine_ceiling(spec.device, spec.threads))
    target = policy.step(desired=backlog.desired, current=live, now=time.monotonic())   # None: leave it

Rules:
  * never above min(max_replicas, ceiling), never below min_replicas;
  * up: the backlog asked for more than `current` for up_delay_s without a break; then to the most it asked for in
    that spell. From zero at once: a request is waiting and nothing serves it, a delay only adds to its wait;
  * down: it asked for fewer for down_delay_s without a break; then to the most it asked for in that spell (a dip
    inside the spell does not cut below what the rest of it needed). The down delay is the longer one: a model load
    (seconds to minutes) is not repeated on every lull.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from inferline.server.backlog import Bounds


class AutoscaleBounds(Bounds, Protocol):
    up_delay_s: float
    down_delay_s: float


def machine_ceiling(device: str, threads: int = 1, cpus: int | None = None, gpus: int | None = None) -> int:
    """The most replicas of a deployment this machine can run: one per visible GPU for cuda / auto (CUDA_VISIBLE_DEVICES
    when set, else `gpus`), else the cores over the threads each replica uses (at least 1). `cpus`/`gpus` default to
    what the machine has (no framework is imported: CUDA_VISIBLE_DEVICES, else 0 GPUs)."""
    if device.startswith("cuda") or device == "auto":
        if gpus is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            gpus = len([d for d in visible.split(",") if d.strip()]) if visible else 0
        if device.startswith("cuda:"):
            return 1 if gpus else 0   # pinned to one device: one replica's memory per device is the safe bound
        if gpus or device != "auto":
            return gpus
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads))


@dataclass
class _Spell:
    since: float
    peak: int


class ScalePolicy:
    """One deployment's scaling decisions (module docstring). Holds only the current up or down spell."""

    def __init__(self, bounds: AutoscaleBounds, ceiling: int) -> None:
        self.bounds = bounds
        self.ceiling = ceiling
        self._up: _Spell | None = None
        self._down: _Spell | None = None

    def limit(self, replicas: int) -> int:
        """replicas within [min_replicas, min(max_replicas, ceiling)]."""
        top = min(self.bounds.max_replicas, self.ceiling)
        return max(min(self.bounds.min_replicas, top), min(top, replicas))

    def step(self, desired: int, current: int, now: float) -> int | None:
        """The replicas to run from now, or None to leave `current` as it is."""
        want = self.limit(desired)
        if want > current:
            self._down = None
            if current == 0:
                self._up = None
                return want
            spell = self._up = self._up or _Spell(now, want)
            spell.peak = max(spell.peak, want)
            if now - spell.since >= self.bounds.up_delay_s:
                self._up = None
                return spell.peak
            return None
        if want < current:
            self._up = None
            spell = self._down = self._down or _Spell(now, want)
            spell.peak = max(spell.peak, want)
            if now - spell.since >= self.bounds.down_delay_s:
                self._down = None
                return spell.peak
            return None
        self._up = self._down = None
        return None
