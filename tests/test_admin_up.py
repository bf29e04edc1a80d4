"""The management API under `inferline up`, whose supervisor acts on it: tritonclient's unload drains the model's
workers and the supervisor starts none again; load has the configured replicas started and answers once one is
live; draining one worker has the supervisor start a fresh one in its place; the SDK's typed scale and rollout
calls. The same `up` serving a store model as tests/test_rollouts.py (its module fixture, started once here)."""

from __future__ import annotations

import time

import httpx
import pytest

from inferline.client import Client
from inferline.client.admin import RolloutState, ScaleAnswer
from tests.conftest import wait_for
from tests.test_rollouts import Fleet, fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
__all__ = ["fleet"]   # the fixture, imported for this module


def live_pids(client: Client) -> list[int]:
    return sorted(w.pid for w in client.admin.deployments()["echo"].workers)


def test_unload_and_load_under_up_with_tritonclient(fleet: Fleet) -> None:
    tritonclient = pytest.importorskip("tritonclient.http")
    triton = tritonclient.InferenceServerClient(fleet.url.removeprefix("http://"), network_timeout=120.0)
    assert triton.get_model_repository_index() == [{"name": "echo", "version": "1", "state": "READY", "reason": ""}]
    triton.unload_model("echo")   # answers once no worker is live
    [entry] = triton.get_model_repository_index()
    assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]
    wait_for(lambda: "worker echo@1#0 drained (exit 0)" in fleet.up_log.read_text(), 30, "the supervisor drained it")
    time.sleep(2.0)   # the supervisor starts none again: 0 replicas are wanted
    with Client(fleet.url) as client:
        assert live_pids(client) == [] and client.admin.deployments()["echo"].replicas == 0
    triton.load_model("echo")   # answers once a replica is live
    assert triton.is_model_ready("echo")
    r = httpx.post(fleet.url + "/v1/models/echo/predict", json={"x": 1}, timeout=30)
    assert r.status_code == 200 and r.json() == {"model": "echo", "y": 2, "version": "1"}


def test_drain_one_worker_under_up_has_the_supervisor_start_a_fresh_one(fleet: Fleet) -> None:
    with Client(fleet.url) as client:
        wait_for(lambda: len(live_pids(client)) == 1, 60, "one live worker")
        [worker] = client.admin.deployments()["echo"].workers
        drained = client.admin.drain(worker.id)
        assert (drained.worker, drained.model) == (worker.id, "echo")
        wait_for(lambda: live_pids(client) not in ([], [worker.pid]), 60, "a fresh worker in its place")
        scaled = client.admin.scale("echo", 1)
        assert isinstance(scaled, ScaleAnswer) and (scaled.model, scaled.replicas) == ("echo", 1)
        status = client.admin.rollout_status("echo") if fleet.admin("GET", "/admin/models/echo/rollout").status_code \
            == 200 else None
        assert status is None or isinstance(status, RolloutState)
