"""API keys and per-key limits against real gateway processes, a real worker and the suite's Redis."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from inferline.server.auth.keys import ApiKey, verify_secret
from inferline.server.broker import keys
from tests.conftest import ROOT, Cluster, child_env, wait_for
from tests.security_cluster import ECHO, bearer, create_key, start_gateway, v2_body

pytestmark = pytest.mark.timeout(120)
REQUIRED = {"auth": "required"}
EXEMPT = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"}


def concrete(path: str) -> str:
    return path.replace("{model}", "echo").replace("{version}", "1").replace("{worker}", "w1")


def assert_refused(r: httpx.Response, path: str) -> None:
    assert r.status_code == 401, (path, r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith('Bearer realm="inferline"')
    body = r.json()
    if path.startswith("/v1"):
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "auth"
    elif path.startswith("/v2"):
        assert set(body) == {"error"} and isinstance(body["error"], str)
    else:
        assert body["error_type"] == "auth" and body["request_id"] == r.headers["x-request-id"]


def test_every_route_refuses_a_missing_or_wrong_key(cluster: Cluster) -> None:
    """Every route of our OpenAPI (and the docs) answers 401 in its family's shape without a valid key, except
    the probes and /metrics; with the key they answer as usual."""
    cluster.spec("echo", runtime=ECHO)
    cluster.start_worker("echo")
    url = start_gateway(cluster, security=REQUIRED)
    key, record = create_key(cluster.redis_url, scopes={"admin"})
    schema = httpx.get(url + "/openapi.json", headers=bearer(key)).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops] + [("GET", "/docs")]
    assert len(routes) >= 15
    wrong_secret = f"il_{record.key_id}_{'A' * 43}"
    unknown = f"il_{'0' * 16}_{'A' * 43}"
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/openapi.json").status_code == 401
        for method, path in routes:
            target = concrete(path)
            if path in EXEMPT:
                assert client.request(method, target).status_code != 401, path
                continue
            for headers in ({}, bearer(unknown), bearer(wrong_secret), {"Authorization": "Basic dXNlcjpwYXNz"},
                            bearer("not-a-key")):
                assert_refused(client.request(method, target, headers=headers, content=b"{}"), path)
            no_key = client.request(method, target)
            assert "error=" not in no_key.headers["www-authenticate"]   # RFC 6750: no error code without credentials
        ok = client.post("/v2/models/echo/infer", json=v2_body(2), headers=bearer(key))
        assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [4.0]


def test_scopes_and_model_allow_list(cluster: Cluster) -> None:
    cluster.spec("echo", runtime=ECHO)
    cluster.spec("other", runtime=ECHO, task="forecast")
    cluster.start_worker("echo")
    url = start_gateway(cluster, security={**REQUIRED, "metrics_public": False})
    echo_only, _ = create_key(cluster.redis_url, models={"echo"})
    admin, _ = create_key(cluster.redis_url, scopes={"admin"})
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v2/models/echo/infer", json=v2_body(1), headers=bearer(echo_only)).status_code == 200
        denied = client.post("/v2/models/other/infer", json=v2_body(1), headers=bearer(echo_only))
        assert denied.status_code == 403 and "other" in denied.json()["error"]
        assert client.get("/v2/models/other", headers=bearer(echo_only)).status_code == 403
        # the OpenAI route names its model in the body: still checked, in OpenAI's error shape
        oai = client.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers=bearer(echo_only))
        assert oai.status_code == 403 and oai.json()["error"]["code"] == "forbidden"
        assert client.post("/forecast", json={"series": [1.0], "horizon": 1},
                           headers=bearer(echo_only)).json()["error_type"] == "forbidden"
        # /metrics is off the public list here: admin only
        assert client.get("/metrics", headers=bearer(echo_only)).status_code == 403
        assert client.get("/metrics", headers=bearer(admin)).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.post("/v2/models/other/infer", json=v2_body(1), headers=bearer(admin)).status_code != 403


def test_revoked_key_stops_at_once_on_a_second_gateway(cluster: Cluster) -> None:
    """Both gateways have verified (and remember) the key; the revoke comes through the CLI; the very next
    request on each is refused."""
    cluster.spec("echo", runtime=ECHO)
    cluster.start_worker("echo")
    first = start_gateway(cluster, "gw1", security=REQUIRED)
    second = start_gateway(cluster, "gw2", security=REQUIRED)
    key, record = create_key(cluster.redis_url)
    for url in (first, second):
        assert httpx.post(url + "/v2/models/echo/infer", json=v2_body(1), headers=bearer(key)).status_code == 200
    revoke = subprocess.run([sys.executable, "-m", "inferline.server.cli", "keys", "revoke", record.key_id], cwd=ROOT,
                            env=child_env(REDIS_URL=cluster.redis_url), capture_output=True, text=True, timeout=60)
    assert revoke.returncode == 0, revoke.stderr
    for url in (second, first):
        r = httpx.post(url + "/v2/models/echo/infer", json=v2_body(1), headers=bearer(key))
        assert r.status_code == 401, r.text


def test_keys_cli_shows_the_secret_once_and_stores_only_a_salted_hash(cluster: Cluster, rdb: redis.Redis) -> None:
    env = child_env(REDIS_URL=cluster.redis_url)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "inferline.server.cli", "keys", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    made = [cli("create", "--name", "ci", "--model", "echo", "--ttl", "1h", "--rate", "5", "--burst", "7")
            for _ in range(2)]
    assert all(m.returncode == 0 for m in made), made[0].stderr
    full = [m.stdout.strip() for m in made]
    assert all(re.fullmatch(r"il_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", k) for k in full)
    listing = cli("list")
    assert listing.returncode == 0
    for key in full:
        key_id, secret = key[3:19], key[20:]
        assert key_id in listing.stdout and secret not in listing.stdout
        stored = {k.decode(): v.decode() for k, v in rdb.hgetall(keys.api_key(key_id)).items()}
        dump = b"".join(rdb.dump(k) or b"" for k in rdb.keys("*"))
        assert secret.encode() not in dump                    # nowhere in Redis, in any form
        record = ApiKey.from_fields(key_id, stored)
        assert record.secret_hash.startswith("scrypt$") and verify_secret(secret, record.secret_hash)
        assert not verify_secret(secret[:-1] + ("A" if secret[-1] != "A" else "B"), record.secret_hash)
        assert record.models == {"echo"} and record.rate_per_s == 5 and record.burst == 7 and record.expires_at > 0
    salts = {ApiKey.from_fields(k[3:19], {a.decode(): b.decode() for a, b in
                                          rdb.hgetall(keys.api_key(k[3:19])).items()}).secret_hash.split("$")[4]
             for k in full}
    assert len(salts) == 2                                    # a salt per key
    assert cli("revoke", full[0]).returncode == 0 and not rdb.exists(keys.api_key(full[0][3:19]))
    assert cli("revoke", full[0]).returncode == 1             # already gone
    assert cli("create", "--scope", "root").returncode != 0


def test_expired_key_is_refused(cluster: Cluster) -> None:
    cluster.spec("echo", runtime=ECHO)
    url = start_gateway(cluster, security=REQUIRED)
    key, _ = create_key(cluster.redis_url, ttl_s=0.5)
    assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
    asyncio.run(asyncio.sleep(0.7))
    r = httpx.get(url + "/v1/models", headers=bearer(key))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


async def burst_across(urls: list[str], key: str, n: int, **params: Any) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*[client.post(urls[i % len(urls)] + "/v2/models/echo/infer",
                                                  json=v2_body(i, **params), headers=bearer(key)) for i in range(n)])


def test_rate_limit_holds_across_two_gateways(cluster: Cluster) -> None:
    """A key with burst 10 and a slow refill: 40 requests split over two gateway processes get 10 answers (one
    more if a token refilled meanwhile), the rest 429 with Retry-After and x-ratelimit-* headers."""
    cluster.spec("echo", runtime=ECHO, max_batch_size=32)
    cluster.start_worker("echo")
    urls = [start_gateway(cluster, "gw1", security=REQUIRED), start_gateway(cluster, "gw2", security=REQUIRED)]
    key, _ = create_key(cluster.redis_url, rate_per_s=0.2, burst=10)
    for url in urls:   # each gateway verifies the key once (a spent token each)
        assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
    responses = asyncio.run(burst_across(urls, key, 40))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}
    assert 8 <= codes.count(200) <= 9, codes   # 10 - the 2 spent above (+1 if a token refilled)
    limited = [r for r in responses if r.status_code == 429]
    assert {urls.index(str(r.request.url).split("/v2")[0]) for r in limited} == {0, 1}   # both gateways refuse
    r = limited[0]
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit"] == "10"
    assert r.headers["x-ratelimit-remaining"] == "0" and "rate limit" in r.json()["error"]
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit"] == "10" and int(ok.headers["x-ratelimit-remaining"]) < 10


def test_concurrency_cap_per_key(cluster: Cluster) -> None:
    cluster.spec("echo", runtime=ECHO, max_batch_size=32)
    cluster.start_worker("echo")
    urls = [start_gateway(cluster, "gw1", security=REQUIRED), start_gateway(cluster, "gw2", security=REQUIRED)]
    key, _ = create_key(cluster.redis_url, concurrency=2, rate_per_s=1000, burst=1000)
    for url in urls:
        assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
    responses = asyncio.run(burst_across(urls, key, 6, sleep_s=1.0))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    assert "concurrency" in next(r for r in responses if r.status_code == 429).json()["error"]
    again = asyncio.run(burst_across(urls, key, 2))   # the slots were given back
    assert [r.status_code for r in again] == [200, 200]


def test_loopback_gateway_requires_keys_once_one_exists(cluster: Cluster) -> None:
    """security.auth = "auto" on 127.0.0.1: no keys needed while none exists (as before this feature), and the
    start says so; once a key is created, every route but the probes needs one (within the 2 s recheck); once
    the last is revoked, none is needed again. A gateway started while keys exist requires them from its first
    request."""
    cluster.spec("echo", runtime=ECHO)
    url = start_gateway(cluster)
    assert httpx.get(url + "/v1/models").status_code == 200
    assert "API keys NOT required while none exists" in (cluster.tmp / "gw.log").read_text()
    key, record = create_key(cluster.redis_url)
    wait_for(lambda: httpx.get(url + "/v1/models").status_code == 401, 10, "keys required once one exists")
    assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200
    late = start_gateway(cluster, "late")   # started while a key exists: required from the first request
    assert_refused(httpx.get(late + "/v1/models"), "/v1/models")
    assert "API keys exist: now required" in (cluster.tmp / "late.log").read_text()
    revoke = subprocess.run([sys.executable, "-m", "inferline.server.cli", "keys", "revoke", record.key_id], cwd=ROOT,
                            env=child_env(REDIS_URL=cluster.redis_url), capture_output=True, text=True, timeout=60)
    assert revoke.returncode == 0, revoke.stderr
    for gateway in (url, late):
        wait_for(lambda g=gateway: httpx.get(g + "/v1/models").status_code == 200, 10, "no key left: open again")


@pytest.mark.filterwarnings("ignore::DeprecationWarning:text_generation.*")
def test_openai_and_tgi_clients_work_with_a_key(cluster: Cluster, quick_gpt2: Path) -> None:
    """The clients' own ways of sending a key: openai's api_key=, text-generation's headers=."""
    import openai
    import text_generation

    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=4, timeout_s=60)
    cluster.start_worker("gpt2")
    url = start_gateway(cluster, security=REQUIRED)
    key, _ = create_key(cluster.redis_url, models={"gpt2"})
    oai = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    done = oai.completions.create(model="gpt2", prompt="The function returns", max_tokens=4)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="il_" + "0" * 16 + "_" + "A" * 43,
                      max_retries=0).completions.create(model="gpt2", prompt="x", max_tokens=2)
    tgi = text_generation.Client(url, headers=bearer(key), timeout=60)
    assert tgi.generate("The function returns", max_new_tokens=4).details.generated_tokens >= 1
    assert len(list(tgi.generate_stream("The function returns", max_new_tokens=3))) >= 1
    with pytest.raises(Exception, match="API key"):
        text_generation.Client(url, timeout=60).generate("x", max_new_tokens=2)
    oai.close()


# Every route the gateway documents, and the model it serves: a key restricted to another model must get 403 on each,
# and a key restricted to that model must get through. Task routes name the deployment bound to their task in the
# config (renamed here on purpose: no demo name). A route added to the gateway must be added here or to MODEL_FREE.
TASK_DEPLOYMENTS = {"forecast": "fc", "sentiment": "st", "classify-text": "ct", "classify-image": "ci",
                    "generate": "gen"}
GENERATE = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
MODEL_ROUTES: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("POST", "/forecast"): ("fc", {"json": {"series": [1.0, 2.0], "horizon": 1}}),
    ("POST", "/sentiment"): ("st", {"json": {"text": "fine"}}),
    ("POST", "/classify-text"): ("ct", {"json": {"texts": ["fine"]}}),
    ("POST", "/classify-image"): ("ci", {"json": {"image": "iVBORw0KGgo="}}),
    ("POST", "/generate"): ("gen", {"json": GENERATE}),
    ("POST", "/generate_stream"): ("gen", {"json": GENERATE}),
    ("POST", "/"): ("gen", {"json": GENERATE}),
    ("GET", "/info"): ("gen", {}),
    ("GET", "/health"): ("gen", {}),
    ("POST", "/tokenize"): ("gen", {"json": {"inputs": "hi"}}),
    ("POST", "/v1/completions"): ("gen", {"json": {"model": "gen", "prompt": "hi", "max_tokens": 1}}),
    ("POST", "/v1/chat/completions"): ("gen", {"json": {"model": "gen", "max_tokens": 1,
                                                         "messages": [{"role": "user", "content": "hi"}]}}),
    ("POST", "/v1/models/{model}/predict"): ("echo", {"json": {"x": [1.0]}}),
    ("GET", "/v2/models/{model}"): ("echo", {}),
    ("GET", "/v2/models/{model}/versions/{version}"): ("echo", {}),
    ("GET", "/v2/models/{model}/ready"): ("echo", {}),
    ("GET", "/v2/models/{model}/versions/{version}/ready"): ("echo", {}),
    ("POST", "/v2/models/{model}/infer"): ("echo", {"json": v2_body(1)}),
    ("POST", "/v2/models/{model}/versions/{version}/infer"): ("echo", {"json": v2_body(1)}),
}
MODEL_FREE = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v2"),
              ("GET", "/v2/health/live"), ("GET", "/v2/health/ready")}


def test_every_route_checks_the_model_of_a_restricted_key(cluster: Cluster) -> None:
    """A key created with `--model A` may not call model B through any route: 403 naming B. A key for B gets past
    the check (whatever the route answers next: no worker runs here, so a 503 or a 4xx of the route's own)."""
    for name in ("echo", "other"):
        cluster.spec(name, runtime=ECHO)
    for task, name in TASK_DEPLOYMENTS.items():
        cluster.spec(name, runtime=ECHO, task=task)
    url = start_gateway(cluster, security=REQUIRED)
    admin, _ = create_key(cluster.redis_url, scopes={"admin"})
    schema = httpx.get(url + "/openapi.json", headers=bearer(admin)).json()
    routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    # the management API: marked in the document, refused to every key without the admin scope (test_admin.py
    # calls each with one)
    admin_routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m, op in ops.items()
                    if op.get("x-inferline-scope") == "admin"}
    assert {("GET", "/admin/deployments"), ("POST", "/v2/repository/index")} <= admin_routes
    assert routes - MODEL_FREE - set(MODEL_ROUTES) - admin_routes == set(), "a route the test does not classify"
    assert set(MODEL_ROUTES) <= routes
    other_only, _ = create_key(cluster.redis_url, models={"other"})
    wrong: list[tuple[str, str, str, int, str]] = []   # every route that answers otherwise, reported at once
    with httpx.Client(base_url=url, timeout=30) as client:
        every_model, _ = create_key(cluster.redis_url)
        for method, path in sorted(admin_routes):
            for key in (other_only, every_model):
                denied = client.request(method, concrete(path), json={}, headers=bearer(key))
                if denied.status_code != 403 or "`admin` scope" not in denied.text:
                    wrong.append(("infer key on an admin route", method, path, denied.status_code, denied.text[:120]))
        for (method, path), (model, request) in MODEL_ROUTES.items():
            target = path.replace("{model}", model).replace("{version}", "1")
            denied = client.request(method, target, **request, headers=bearer(other_only))
            if denied.status_code != 403 or repr(model) not in denied.text:
                wrong.append(("other's key", method, path, denied.status_code, denied.text[:120]))
            right, _ = create_key(cluster.redis_url, models={model})
            allowed = client.request(method, target, **request, headers=bearer(right))
            if allowed.status_code in (401, 403):
                wrong.append((f"{model}'s key", method, path, allowed.status_code, allowed.text[:120]))
    assert wrong == [], "\n".join(map(str, wrong))
