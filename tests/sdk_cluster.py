"""One deployment with every route served, for the client, CLI and API-document tests: the classic zoo on its task
routes, gpt2 on the generation routes, and three Echo models for backpressure and failure (tests/runtimes.py):
`echo` (plain), `capped` (one request at a time, queue_cap 1: the next gets 503 + Retry-After) and `poison`
(kill=True dead-letters after two deliveries)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Cluster
from tests.zoo_cluster import TASKS

ECHO = "tests.runtimes:Echo"
ZOO = ("cnn", "lstm", "sentiment", "transformer")


class Deployment(Cluster):
    """A Cluster that knows which worker process serves which model."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        super().__init__(redis_url, tmp)
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}

    def start_worker(self, model: str, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = super().start_worker(model, wait)
        self.procs.setdefault(model, []).append(proc)
        return proc

    def replace_dead(self, model: str) -> int:
        """Start a successor for each dead worker of `model` (a poison pill kills them); how many died so far."""
        dead = [p for p in self.procs.get(model, []) if p.poll() is not None]
        for _ in range(len(dead) - getattr(self, "_replaced_" + model, 0)):
            self.start_worker(model, wait=False)
        setattr(self, "_replaced_" + model, len(dead))
        return len(dead)


def start_deployment(redis_url: str, store: Path, gpt2_store: Path, tmp: Path) -> Deployment:
    """Every model's worker live and /readyz 200, or the cluster closed and the worker's log raised."""
    cluster = Deployment(redis_url, tmp)
    cluster.client.flushdb()
    for name in ZOO:
        cluster.spec(name, artifact=str(store / name), task=TASKS[name])
    cluster.spec("gpt2", artifact=str(gpt2_store / "gpt2"), task="generate", max_batch_size=8, timeout_s=60)
    cluster.spec("echo", model=ECHO)
    cluster.spec("capped", model=ECHO, max_batch_size=1, queue_cap=1, timeout_s=30)
    cluster.spec("poison", model=ECHO, visibility_timeout_s=0.5, max_tries=2, timeout_s=60)
    cluster.start_all({"retry_after_s": 1}, 240)
    return cluster
