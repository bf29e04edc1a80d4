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
