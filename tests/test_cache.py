"""The response cache (opt-in per deployment), with a real gateway, worker and Redis: a repeated request is answered
from the cache with the same body and `x-cache: hit`; a different one is a miss; once the model's version changes its
old entries are not served; the cache stays within its byte bound; hits, misses and bytes are on /metrics."""

from __future__ import annotations

import httpx
import pytest

from inferline.server.broker import keys
from inferline.server.protocol import ModelInfo
from tests.conftest import Cluster, wait_for
from tests.test_observability import ECHO, scrape, total, v2_body

INFER = "/v2/models/{}/infer"


@pytest.mark.slow
def test_cache_hits_misses_versions_and_its_byte_bound(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, cache={"ttl_s": 60, "max_bytes": 1 << 20})
    cluster.spec("tiny", model=ECHO, cache={"ttl_s": 60, "max_bytes": 1024})
    cluster.spec("plain", model=ECHO)
    url = cluster.start_gateway()
    for model in ("echo", "tiny", "plain"):
        cluster.start_worker(model)

    def post(model: str, x: float) -> httpx.Response:
        r = httpx.post(url + INFER.format(model), json=v2_body(x), timeout=30)
        assert r.status_code == 200, r.text
        return r

    first, again, other = post("echo", 1), post("echo", 1), post("echo", 2)
    assert (first.headers["x-cache"], again.headers["x-cache"], other.headers["x-cache"]) == ("miss", "hit", "miss")
    assert again.content == first.content and other.json()["outputs"][0]["data"] == [4.0]
    assert "x-cache" not in post("plain", 1).headers and "x-cache" not in post("plain", 1).headers   # off: not asked

    # a new version of the model (what its workers publish at start): the old answers are not served
    raw = cluster.client.get(keys.model_info("echo"))
    info = ModelInfo.decode(raw)
    info.version = info.version + "-next"
    cluster.client.set(keys.model_info("echo"), info.encode())
    wait_for(lambda: post("echo", 1).headers["x-cache"] == "miss", 10, "the new version's first answer is a miss")
    # ... and the old version's worker that answered it does not leave its answer under the new version's key
    assert post("echo", 1).headers["x-cache"] == "miss"
    cluster.client.set(keys.model_info("echo"), raw)   # the old version again: its entries are there still
    wait_for(lambda: post("echo", 1).headers["x-cache"] == "hit", 10, "the old version's entry is served again")

    for i in range(40):   # each answer ~150 bytes: 40 of them need ~6 KiB, the bound is 1 KiB
        post("tiny", 100 + i)
    used = int(cluster.client.get(keys.cache_bytes("tiny")))
    entries = [k for k in cluster.client.zrange(keys.cache_index("tiny"), 0, -1)]
    assert 0 < used <= 1024 and len(entries) >= 2
    assert used == sum(cluster.client.strlen(k) for k in entries)   # the counter is exact
    assert post("tiny", 139).headers["x-cache"] == "hit" and post("tiny", 100).headers["x-cache"] == "miss"   # evicted

    samples = scrape(url)
    assert total(samples, "inferline_cache_requests_total", model="echo", result="hit") >= 2
    assert total(samples, "inferline_cache_requests_total", model="echo", result="miss") >= 3
    assert 0 < total(samples, "inferline_cache_bytes", model="tiny") <= 1024
