"""API keys fail closed and stay fair under abuse, against real gateway processes and real Redis servers: keys
survive a kill -9 of `inferline serve`'s private Redis; a deployment whose key records were lost answers 503 naming
the cause, never 200 without a key; an unknown key id costs what a wrong secret costs; a flood of wrong secrets
from one address is throttled while another address's key still works; the v2 health probes need no key."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from inferline.server.broker import embedded
from inferline.server.gateway.throttle import BURST
from tests.conftest import Cluster, child_env, wait_for
from tests.security_cluster import ECHO, bearer, create_key, start_gateway
from tests.served import wait_ready
from tests.test_up import alive, children, cmdline, process_tree

pytestmark = pytest.mark.timeout(180)
REQUIRED = {"auth": "required"}


def from_address(address: str, **kwargs: object) -> httpx.Client:
    """A client whose connections leave from `address` (any 127.x.y.z reaches a gateway on 127.0.0.1): another
    peer, as the gateway sees it."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30, **kwargs)  # type: ignore[arg-type]


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferline.server.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env or child_env())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`inferline serve tests.runtimes:Echo` in tmp_path (its private Redis without persistence, the default),
    as a user runs it. Teardown kills whatever is left."""
    port = embedded.free_port()
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with process_tree(["serve", ECHO, "--name", "echo", "--port", str(port)], tmp_path, log, child_env()) as proc:
        wait_ready(proc, log, [url], 60, path="/healthz")
        yield proc, url, tmp_path


def no_key_status(url: str) -> int:
    try:
        return httpx.get(url + "/v1/models", timeout=5).status_code
    except httpx.HTTPError:
        return 0


@pytest.mark.slow
def test_keys_survive_kill_9_of_the_private_redis(served: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    """security.auth = auto on loopback, broker.persist off (the defaults): after `kill -9` of the private Redis
    (which `serve` restarts) and after a FLUSHALL of it, the key works again and a request without a key is
    never served (before: every key vanished and the gateway ran open from +2 s)."""
    proc, url, cwd = served
    assert no_key_status(url) == 200   # no key yet: open, as before
    created = cli(cwd, "keys", "create", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    wait_for(lambda: no_key_status(url) == 401, 10, "keys required once one exists")
    assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200

    (victim,) = [pid for pid in children(proc.pid) if "redis-server" in cmdline(pid)]
    os.kill(victim, signal.SIGKILL)
    seen: list[int] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:   # past the supervisor's restart (0.5 s) and two of the gateway's rechecks
        seen.append(no_key_status(url))
        time.sleep(0.05)
    assert 200 not in seen, seen
    assert seen[-1] == 401, seen
    assert not alive(victim)
    wait_for(lambda: httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200, 10, "the key works again")

    url_file = embedded.read_url(cwd / ".inferline" / "redis")
    assert url_file is not None
    with redis.Redis.from_url(url_file) as client:
        client.flushall()
    for _ in range(60):
        assert no_key_status(url) != 200
        time.sleep(0.05)
    wait_for(lambda: httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200, 10, "key after FLUSHALL")
    listed = cli(cwd, "keys", "list")
    assert listed.returncode == 0 and "\tci\t" in listed.stdout, listed
    assert "restored 1 API key(s)" in (cwd / ".inferline" / "logs" / "gateway.log").read_text()


def test_lost_keys_answer_503_naming_the_cause(cluster: Cluster, rdb: redis.Redis) -> None:
    """A gateway that required keys (auto on loopback, and required) whose Redis lost them (FLUSHALL of a
    user-run Redis, which has no durable copy here) refuses every request with a 503 that says so, instead of
    serving without a key (auto) or telling valid clients their key is wrong (required). A new key ends it.
    Revoking every key on purpose is not a loss (test_security.py: auto opens again)."""
    cluster.spec("echo", runtime=ECHO)
    auto = start_gateway(cluster)
    required = start_gateway(cluster, "required", security=REQUIRED)
    key, _ = create_key(cluster.redis_url)
    wait_for(lambda: no_key_status(auto) == 401, 10, "keys required once one exists")
    assert httpx.get(required + "/v1/models", headers=bearer(key)).status_code == 200
    rdb.flushall()
    seen: list[int] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen.append(no_key_status(auto))
        time.sleep(0.05)
    assert 200 not in seen and seen[-1] == 503, seen
    for gateway, headers in ((auto, {}), (auto, bearer(key)), (required, {}), (required, bearer(key))):
        lost = httpx.get(gateway + "/v1/models", headers=headers)
        assert lost.status_code == 503, (gateway, lost.text)
        assert "the API keys were lost" in lost.json()["error"]["message"]
        assert lost.headers["retry-after"]
    assert httpx.get(auto + "/healthz").status_code == 200   # probes stay open
    fresh, _ = create_key(cluster.redis_url)
    for gateway in (auto, required):
        wait_for(lambda g=gateway: no_key_status(g) == 401, 10, "a new key ends the loss")
        assert httpx.get(gateway + "/v1/models", headers=bearer(fresh)).status_code == 200


def test_unknown_key_id_costs_what_a_wrong_secret_costs(cluster: Cluster) -> None:
    """Both run scrypt (an unknown id against a dummy hash): the medians are within a factor of two (before:
    0.6 ms against 33.8 ms, so the time told whether an id exists). Each kind from its own address, within the
    failure throttle's burst."""
    cluster.spec("echo", runtime=ECHO)
    url = start_gateway(cluster, security=REQUIRED)
    _, record = create_key(cluster.redis_url)
    times: dict[str, list[float]] = {"wrong": [], "unknown": []}
    with from_address("127.0.0.3", base_url=url) as a, from_address("127.0.0.4", base_url=url) as b:
        for client in (a, b):
            client.get("/healthz")   # connections open before timing
        for _ in range(BURST - 1):
            for name, client, headers in (("wrong", a, guess(record.key_id)), ("unknown", b, guess("0" * 16))):
                started = time.perf_counter()
                r = client.get("/v1/models", headers=headers)
                times[name].append(time.perf_counter() - started)
                assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    wrong_ms, unknown_ms = (statistics.median(times[n]) * 1000 for n in ("wrong", "unknown"))
    print(f"median wrong secret {wrong_ms:.1f} ms, unknown id {unknown_ms:.1f} ms")
    assert unknown_ms > wrong_ms / 2 and wrong_ms > unknown_ms / 2, (wrong_ms, unknown_ms)


def guess(key_id: str) -> dict[str, str]:
    """A new wrong secret each time (a guessing attack; the same wrong key again costs no scrypt)."""
    return bearer(f"il_{key_id}_{secrets.token_urlsafe(32)}")


async def flood(url: str, address: str, key_id: str, n: int) -> list[httpx.Response]:
    transport = httpx.AsyncHTTPTransport(local_address=address, limits=httpx.Limits(max_connections=n))
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=60) as client:
        return list(await asyncio.gather(*(client.get("/v1/models", headers=guess(key_id)) for _ in range(n))))


def test_a_flood_of_wrong_secrets_is_throttled_per_address(cluster: Cluster) -> None:
    """60 different wrong secrets at once from one address: at most the throttle's burst (and its refill) run scrypt and
    get 401; the rest get 429 with Retry-After at once. Another address's key, never seen by this gateway (so
    its check runs scrypt), is served during the flood."""
    cluster.spec("echo", runtime=ECHO)
    url = start_gateway(cluster, security=REQUIRED)
    key, record = create_key(cluster.redis_url)

    async def both() -> tuple[list[httpx.Response], httpx.Response]:
        flooding = asyncio.ensure_future(flood(url, "127.0.0.5", record.key_id, 60))
        await asyncio.sleep(0.05)
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.6")
        async with httpx.AsyncClient(base_url=url, transport=transport, timeout=60) as other:
            ok = await other.get("/v1/models", headers=bearer(key))
        return await flooding, ok

    responses, ok = asyncio.run(both())
    assert ok.status_code == 200, ok.text
    codes = [r.status_code for r in responses]
    assert set(codes) <= {401, 429}, codes
    assert codes.count(401) <= BURST + 5 and codes.count(429) >= 40, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert "failed API key checks" in limited.json()["error"]["message"]
    with from_address("127.0.0.5", base_url=url) as same:   # still throttled, but for what refilled since
        after = [same.get("/v1/models", headers=guess(record.key_id)).status_code for _ in range(5)]
    assert after.count(429) >= 3, after


def test_v2_health_probes_answer_without_a_key(cluster: Cluster) -> None:
    """KServe's /v2/health/live and /v2/health/ready are probes like /healthz and /readyz: a Kubernetes probe
    carries no key (before: 401 once keys existed)."""
    cluster.spec("echo", runtime=ECHO)
    cluster.start_worker("echo")
    url = start_gateway(cluster, security=REQUIRED)
    create_key(cluster.redis_url)
    assert no_key_status(url) == 401
    assert httpx.get(url + "/v2/health/live").status_code == 200
    wait_for(lambda: httpx.get(url + "/v2/health/ready").status_code == 200, 30, "/v2/health/ready without a key")
    assert httpx.get(url + "/v2").status_code == 401   # server metadata is not a probe
