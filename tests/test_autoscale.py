"""Scaling with the backlog, with real processes: a deployment that scales to zero (autoscale.min_replicas = 0)
takes a request with no worker alive, the request waits on its stream and is answered once a worker starts; one
whose deadline passes first gets a 504 that says the model was starting."""

from __future__ import annotations

import re
import threading
import tomllib
from typing import Any

import httpx
import pytest

from inferline.server.config import AutoscaleSpec
from tests.conftest import ROOT, Cluster
from tests.test_observability import ECHO, v2_body


def readme_autoscale() -> dict[str, Any]:
    """The README's autoscale table (under its readme-autoscale marker), as a deployment's `autoscale`."""
    match = re.search(r"<!-- readme-autoscale -->\n```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, "README.md lost its autoscale example"
    (table,) = tomllib.loads(match.group(1))["models"].values()
    autoscale: dict[str, Any] = table["autoscale"]
    AutoscaleSpec.model_validate(autoscale)   # a valid config, as written
    return autoscale


def test_readme_example_scales_to_zero() -> None:
    assert readme_autoscale()["min_replicas"] == 0


@pytest.mark.slow
def test_scaled_to_zero_a_request_waits_for_a_worker_or_gets_504_naming_the_start(cluster: Cluster) -> None:
    cluster.spec("zero", model=ECHO, timeout_s=60, autoscale=readme_autoscale())
    cluster.spec("asleep", model=ECHO, timeout_s=1.5, autoscale=readme_autoscale())
    cluster.spec("fixed", model=ECHO, timeout_s=5)   # min_replicas 1 (the default): no worker is a 503 at once
    url = cluster.start_gateway()
    late = httpx.post(url + "/v2/models/asleep/infer", json=v2_body(1), timeout=30)
    assert late.status_code == 504 and "the model was starting" in late.text, late.text
    refused = httpx.post(url + "/v2/models/fixed/infer", json=v2_body(1), timeout=30)
    assert refused.status_code == 503 and "no live worker" in refused.text, refused.text

    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(
        httpx.post(url + "/v2/models/zero/infer", json=v2_body(3), timeout=90)))
    waiting.start()
    try:
        waiting.join(timeout=1.0)
        assert not answers, "answered with no worker"
        cluster.start_worker("zero")   # what the autoscaler (or KEDA) does when the backlog asks for one
    finally:
        waiting.join(timeout=90)
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["outputs"][0]["data"] == [6.0]


# --- the policy (server/autoscaler.py), on a clock of our own -------------------------------------------------------

def test_policy_waits_its_up_delay_and_its_longer_down_delay_and_takes_the_spells_peak() -> None:
    from inferline.server.autoscaler import ScalePolicy

    bounds = AutoscaleSpec(min_replicas=1, max_replicas=3, up_delay_s=5, down_delay_s=60)
    policy = ScalePolicy(bounds, ceiling=8)
    assert policy.step(desired=3, current=1, now=0) is None         # asked for more: the up delay starts
    assert policy.step(desired=2, current=1, now=3) is None
    assert policy.step(desired=9, current=1, now=5) == 3            # 5 s of asking: the spell's peak, within max
    assert policy.step(desired=1, current=3, now=10) is None        # asked for fewer: the down delay starts
    assert policy.step(desired=3, current=3, now=40) is None        # a spike breaks the spell
    assert policy.step(desired=1, current=3, now=41) is None
    assert policy.step(desired=2, current=3, now=80) is None        # a dip to 2 inside the new spell ...
    assert policy.step(desired=1, current=3, now=101) == 2          # ... holds 2 once the 60 s are over
    assert policy.step(desired=1, current=2, now=102) is None
    assert policy.step(desired=1, current=2, now=162) == 1
    assert policy.step(desired=1, current=1, now=163) is None


def test_policy_never_passes_the_machines_ceiling_and_wakes_from_zero_at_once() -> None:
    from inferline.server.autoscaler import ScalePolicy, machine_ceiling

    assert machine_ceiling("cpu", threads=1, cpus=2) == 2 and machine_ceiling("cpu", threads=4, cpus=2) == 1
    assert machine_ceiling("cuda", gpus=2) == 2 and machine_ceiling("auto", cpus=2, gpus=0) == 2
    assert machine_ceiling("cuda:1", gpus=4) == 1 and machine_ceiling("cuda", gpus=0) == 0
    capped = ScalePolicy(AutoscaleSpec(min_replicas=1, max_replicas=8, up_delay_s=0), ceiling=2)
    assert capped.step(desired=8, current=1, now=0) == 2
    zero = ScalePolicy(AutoscaleSpec(min_replicas=0, max_replicas=2, up_delay_s=30, down_delay_s=5), ceiling=4)
    assert zero.step(desired=1, current=0, now=0) == 1                # a waiting request: no up delay from zero
    assert zero.step(desired=0, current=1, now=1) is None
    assert zero.step(desired=0, current=1, now=6) == 0                # idle for the down delay: back to zero


def test_serve_autoscale_writes_the_deployments_table() -> None:
    from inferline.server.cli import autoscale_table
    from inferline.server.config import ConfigError

    table = tomllib.loads("[models.m]\n" + autoscale_table("0:2"))["models"]["m"]["autoscale"]
    spec = AutoscaleSpec.model_validate(table)
    assert (spec.enabled, spec.min_replicas, spec.max_replicas) == (True, 0, 2)
    assert autoscale_table(None) == ""   # off by default
    with pytest.raises(ConfigError, match="MIN:MAX"):
        autoscale_table("2")
