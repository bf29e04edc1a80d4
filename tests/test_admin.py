"""The management API against real gateway and worker processes and the suite's Redis: the admin scope (401 without a
key, 403 without the scope), loopback only while no key exists, the audit log, deployments and draining one worker,
the Open Inference Protocol's repository extension through tritonclient, and dead letters (list without payloads,
replay, purge) made for real by a worker that dies on its request."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferline.client import AsyncClient, Client, ModelCard, NotFoundError, PermissionDeniedError
from inferline.server import top
from inferline.server.broker import fleet, keys
from tests.conftest import ROOT, Cluster, child_env, wait_for
from tests.security_cluster import ECHO, bearer, create_key, start_gateway, v2_body

pytestmark = pytest.mark.timeout(180)


def non_loopback_ip() -> str | None:
    """An address of this machine other than loopback (IPv4), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    for ip in out:
        if "." in ip and not ip.startswith("127."):
            return ip
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def audit_lines(cluster: Cluster, name: str = "gw") -> list[str]:
    return [line for line in (cluster.tmp / f"{name}.log").read_text().splitlines() if "admin call" in line]


def logged(cluster: Cluster, name: str, *parts: str) -> None:
    """Until an audit line of gateway `name` holds every part (the log is written a moment after the answer)."""
    wait_for(lambda: any(all(p in line for p in parts) for line in audit_lines(cluster, name)), 10, f"{parts} logged")


def test_admin_needs_the_admin_scope_and_every_call_is_logged(cluster: Cluster) -> None:
    """401 without a key, 403 with an `infer` key (naming the scope), 200 with an `admin` key; each call, refused or
    not, is one audit line naming who, what (method, path, model, a body summary without payloads) and when."""
    cluster.spec("echo", runtime=ECHO)
    cluster.start_worker("echo")
    url = start_gateway(cluster, security={"auth": "required"})
    infer, _ = create_key(cluster.redis_url)
    admin, record = create_key(cluster.redis_url, scopes={"admin"})
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/admin/deployments").status_code == 401
        denied = client.get("/admin/deployments", headers=bearer(infer))
        assert denied.status_code == 403 and "`admin` scope" in denied.json()["error"], denied.text
        repo = client.post("/v2/repository/index", headers=bearer(infer))
        assert repo.status_code == 403 and set(repo.json()) == {"error"}   # the v2 family's error shape
        ok = client.get("/admin/deployments", headers=bearer(admin))
        assert ok.status_code == 200, ok.text
        [echo] = ok.json()["deployments"]
        assert (echo["name"], echo["live_replicas"], echo["replicas"]) == ("echo", 1, 1)
        [worker] = echo["workers"]
        assert {"id", "pid", "host", "device", "version", "batches", "live", "draining"} <= set(worker)
        assert worker["version"] == "1" and worker["live"] and not worker["draining"]
        secret = "a payload that must never be logged " * 4
        purge = client.post("/admin/models/echo/dead-letters/purge", headers=bearer(admin),
                            json={"ids": [], "note": secret})
        assert purge.status_code == 422   # extra field: refused by the schema, logged all the same
    lines = wait_for(lambda: len(audit_lines(cluster)) >= 5 and audit_lines(cluster), 10, "5 audit lines")
    assert "who=anonymous" in lines[0] and "status=401" in lines[0] and "path=/admin/deployments" in lines[0]
    assert f"who={infer.split('_')[1]}" in lines[1] and "status=403" in lines[1]
    assert f"who={record.key_id}" in lines[3] and "status=200" in lines[3] and "method=GET" in lines[3]
    assert "model=echo" in lines[4] and "<string" in lines[4] and "payload that must" not in "\n".join(lines)
    assert all(" at=20" in line for line in lines)


@pytest.mark.slow
def test_admin_is_loopback_only_while_no_key_exists(cluster: Cluster) -> None:
    """No key exists: a gateway on 0.0.0.0 refuses the admin API (403, the body says why) to a caller on the machine's
    own non-loopback address, under security.auth "auto" and "off" alike; a loopback caller may use it."""
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to call from")
    cluster.spec("echo", runtime=ECHO)
    for auth in ("auto", "off"):
        url = start_gateway(cluster, f"gw-{auth}", security={"auth": auth}, gateway={"host": "0.0.0.0"})
        remote = url.replace("127.0.0.1", ip)
        refused = httpx.get(remote + "/admin/deployments", timeout=30)
        assert refused.status_code == 403, refused.text
        assert ip in refused.json()["error"] and "loopback" in refused.json()["error"]
        # the same refusal in the v2 family's shape on the repository routes
        assert httpx.post(remote + "/v2/repository/index", timeout=30).status_code == 403
        if auth == "off":   # no keys are ever checked: loopback is the whole rule
            assert httpx.get(url + "/admin/deployments", timeout=30).status_code == 200
        logged(cluster, f"gw-{auth}", f"peer={ip}", "status=403")
    url = start_gateway(cluster, "gw-loopback")   # auto, on loopback, no key: open to loopback callers
    assert httpx.get(url + "/admin/deployments", timeout=30).status_code == 200
    logged(cluster, "gw-loopback", "who=loopback", "status=200")


@pytest.mark.slow
def test_drain_one_worker_answers_what_it_holds_then_exits(cluster: Cluster) -> None:
    cluster.spec("echo", runtime=ECHO, max_batch_size=1)
    first = cluster.start_worker("echo")
    second = cluster.start_worker("echo")
    url = start_gateway(cluster)
    deployments = httpx.get(url + "/admin/deployments", timeout=30).json()["deployments"]
    by_pid = {w["pid"]: w["id"] for w in deployments[0]["workers"]}
    assert set(by_pid) == {first.pid, second.pid}
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.extend(
        httpx.post(url + "/v2/models/echo/infer", json=v2_body(1, sleep_s=1.5), timeout=30) for _ in range(2)))
    slow.start()
    drained = httpx.post(url + f"/admin/workers/{by_pid[first.pid]}/drain", timeout=30)
    assert drained.status_code == 202 and drained.json() == {"worker": by_pid[first.pid], "model": "echo",
                                                              "draining": True}
    assert first.wait(30) == 0   # a clean exit, as on SIGTERM
    slow.join(30)
    assert [r.status_code for r in answers] == [200, 200]
    assert second.poll() is None
    after = httpx.get(url + "/admin/deployments", timeout=30).json()["deployments"][0]
    assert [w["pid"] for w in after["workers"]] == [second.pid]
    missing = httpx.post(url + "/admin/workers/nope/drain", timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def dead_letter_body(marker: Path, i: int) -> dict[str, Any]:
    return v2_body(float(i), kill_if_exists=str(marker))


@pytest.mark.slow
def test_dead_letters_list_replay_and_purge(cluster: Cluster, tmp_path: Path) -> None:
    """Three requests kill their worker (a file says so) and are dead-lettered by its successor. The list shows their
    metadata, never a payload; once the file is gone, a replay queues each again as a new request, answered to the
    replay call; purge deletes."""
    marker = tmp_path / "poison"
    marker.touch()
    # a batch window, so that the three land in one batch and one worker dies for them all (more die otherwise:
    # each is replaced until every request is answered)
    cluster.spec("flaky", runtime=ECHO, max_tries=1, visibility_timeout_s=1, timeout_s=60, max_batch_delay_ms=300)
    workers = [cluster.start_worker("flaky")]
    url = start_gateway(cluster)
    answers: list[httpx.Response] = []

    def send(i: int) -> None:
        answers.append(httpx.post(url + "/v2/models/flaky/infer", json=dead_letter_body(marker, i), timeout=60))

    senders = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in senders:
        t.start()

    def answered() -> bool:
        if workers[-1].poll() is not None:   # the successor claims the dead worker's requests, dead-letters them
            assert workers[-1].returncode == 17
            workers.append(cluster.start_worker("flaky", wait=False))
        return len(answers) == 3

    wait_for(answered, 90, "three answers")
    assert sorted(r.status_code for r in answers) == [500, 500, 500], [r.text for r in answers]
    listed = httpx.get(url + "/admin/models/flaky/dead-letters", timeout=30)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["total"] == 3 and len(body["entries"]) == 3
    assert str(marker) not in listed.text and "inputs" not in listed.text   # metadata only
    first, second, third = body["entries"]
    assert first["tries"] == 2 and first["op"] == "v2" and first["replayable"] and first["reason"]
    marker.unlink()
    one = httpx.post(url + "/admin/models/flaky/dead-letters/replay", json={"ids": [first["id"], "0-1"]}, timeout=60)
    assert one.status_code == 200, one.text
    [outcome] = one.json()["replayed"]
    assert outcome["id"] == first["id"] and outcome["ok"] and outcome["request_id"] != first["request_id"]
    assert one.json()["skipped"] == {"0-1": "no such dead letter"}
    purged = httpx.post(url + "/admin/models/flaky/dead-letters/purge", json={"ids": [second["id"]]}, timeout=30)
    assert purged.json() == {"model": "flaky", "purged": 1}
    rest = httpx.post(url + "/admin/models/flaky/dead-letters/replay", timeout=60).json()
    assert [(o["id"], o["ok"]) for o in rest["replayed"]] == [(third["id"], True)]
    assert httpx.get(url + "/admin/models/flaky/dead-letters", timeout=30).json()["total"] == 0
    assert cluster.client.xlen(keys.dead_payloads("flaky")) == 0
    assert httpx.post(url + "/admin/models/flaky/dead-letters/purge", timeout=30).json()["purged"] == 0
    assert httpx.get(url + "/admin/models/nope/dead-letters", timeout=30).status_code == 404


def wanted(cluster: Cluster, model: str) -> dict[str, int]:
    """The replicas wanted per version, as the supervisor reads them (broker/fleet.py)."""
    record = fleet.parse_deployment(cluster.client.hgetall(keys.deployment(model)))
    return record.replicas if record is not None else {}


@pytest.mark.slow
def test_v2_repository_index_unload_and_load_with_tritonclient(cluster: Cluster) -> None:
    """tritonclient.http as a Triton user calls it: the index lists the deployment READY with its version; unload
    drains its worker (a clean exit) and the index says UNAVAILABLE, why, and the wanted replicas are 0; load sets
    them back to the configured count and returns once a replica is live (started here, as the supervisor would)."""
    tritonclient = pytest.importorskip("tritonclient.http")
    cluster.spec("echo", runtime=ECHO, replicas=1)
    worker = cluster.start_worker("echo")
    url = start_gateway(cluster)
    client = tritonclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=60.0)
    assert client.get_model_repository_index() == [{"name": "echo", "version": "1", "state": "READY", "reason": ""}]
    assert "model_repository" in client.get_server_metadata()["extensions"]
    client.unload_model("echo")
    assert worker.wait(30) == 0
    [entry] = client.get_model_repository_index()
    assert (entry["state"], entry["version"]) == ("UNAVAILABLE", "") and "unloaded" in entry["reason"]
    assert client.get_model_repository_index(headers=None, query_params=None) == [entry]
    assert httpx.post(url + "/v2/repository/index", json={"ready": True}, timeout=30).json() == []
    assert wanted(cluster, "echo") == {"": 0}   # no pinned version: the configuration's, spelt ""
    loaded: list[BaseException | None] = []

    def load() -> None:   # its own client: tritonclient.http's are gevent-based, one thread each
        try:
            tritonclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=60.0).load_model("echo")
            loaded.append(None)
        except BaseException as exc:   # noqa: BLE001 - reported below
            loaded.append(exc)

    loading = threading.Thread(target=load)
    loading.start()
    wait_for(lambda: wanted(cluster, "echo") == {"": 1}, 30, "replicas wanted again")
    assert not loaded   # still waiting for a live replica
    again = cluster.start_worker("echo")
    loading.join(60)
    assert loaded == [None]
    assert client.is_model_ready("echo")
    assert client.get_model_repository_index()[0]["state"] == "READY"
    client.unload_model("echo")   # a second time, now that a deployment record exists: no supervisor wrote it
    assert again.wait(30) == 0
    with pytest.raises(tritonclient.InferenceServerException, match="not served"):
        client.unload_model("nope")
    bad = httpx.post(url + "/v2/repository/models/echo/load", json={"parameters": {"config": "{}"}}, timeout=30)
    assert bad.status_code == 400 and "config" in bad.json()["error"]


def readme_blocks(kind: str) -> list[str]:
    """The README's code blocks marked `<!-- readme-admin: kind -->`, in order."""
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"<!-- readme-admin: {kind} -->\n```\w+\n(.*?)```", text, flags=re.S)


def test_sdk_admin_calls_and_the_readme_examples(cluster: Cluster) -> None:
    """client.admin (sync and async) against a live gateway that requires keys, with an admin key; an infer key is
    refused with the SDK's PermissionDeniedError. Then the README's admin examples (curl and Python), as written."""
    cluster.spec("echo", runtime=ECHO)
    worker = cluster.start_worker("echo")
    url = start_gateway(cluster, security={"auth": "required"})
    admin, _ = create_key(cluster.redis_url, scopes={"admin"})
    infer, _ = create_key(cluster.redis_url)
    with Client(url, api_key=admin) as client:
        deployments = client.admin.deployments()
        echo = deployments["echo"]
        assert echo.live_replicas == 1 and echo.workers[0].pid == worker.pid and deployments.request_id
        assert [(m.name, m.state) for m in client.admin.repository_index(ready=True).models] == [("echo", "READY")]
        listed = client.admin.dead_letters("echo", limit=5)
        assert (listed.model, listed.total, listed.entries) == ("echo", 0, [])
        assert client.admin.replay_dead_letters("echo", ids=["0-1"]).skipped == {"0-1": "no such dead letter"}
        assert client.admin.purge_dead_letters("echo").purged == 0
        with pytest.raises(NotFoundError):
            client.admin.dead_letters("nope")
    with Client(url, api_key=infer) as client, pytest.raises(PermissionDeniedError, match="admin"):
        client.admin.deployments()

    async def asynchronous() -> tuple[list[str], str]:
        async with AsyncClient(url, api_key=admin) as client:
            names = [d.name for d in await client.admin.deployments()]
            index = await client.admin.repository_index()
            return names, index.models[0].state

    assert asyncio.run(asynchronous()) == (["echo"], "READY")
    env = child_env(ADMIN_KEY=admin)
    (curl,) = readme_blocks("curl")
    lines = [line for line in curl.splitlines() if line.startswith("curl ")]
    assert len(lines) == 5
    for line in lines:
        out = subprocess.run(["bash", "-c", line.replace("localhost:8000", url.removeprefix("http://"))
                              .replace("/cnn/", "/echo/")], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and out.stdout and "error" not in out.stdout, (line, out.stdout)
    (python,) = readme_blocks("python")
    code = python.replace("http://127.0.0.1:8000", url).replace('"cnn"', '"echo"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "echo 1/1 live" in out.stdout and "('echo', '1', 'READY')" in out.stdout
    with Client(url, api_key=admin) as client:   # last: the drain ends the worker
        drained = client.admin.drain(echo.workers[0].id)
        assert (drained.model, drained.draining) == ("echo", True)
    assert worker.wait(30) == 0


def test_top_shows_each_version_with_its_replicas_and_weight() -> None:
    """`inferline top` reads a rollout's versions from /v1/models (the rollout's broker state, as the gateway lists
    it): each version's live/wanted replicas and its share of the traffic, in one cell."""
    card = ModelCard.model_validate({
        "id": "cnn", "object": "model", "created": 0, "owned_by": "inferline", "version": "1", "live_replicas": 2,
        "replicas": 2, "devices": ["cpu"], "queue_depth": 3, "kind": "batch", "task": None, "versions": [
            {"version": "1", "replicas": 1, "live_replicas": 1, "weight": 80, "live": True},
            {"version": "2", "replicas": 1, "live_replicas": 1, "weight": 20, "live": True}]})
    frame = top.render(top.rows([card], top.Scrape(0.0), None), "http://gw", 1.0)
    header, row = frame.splitlines()[2:4]
    assert header.split()[:4] == ["MODEL", "VERSION", "VERSIONS", "KIND"]
    assert row.split()[:4] == ["cnn", "1", "1:1/1@80%,2:1/1@20%", "batch"]
    plain = card.model_copy(update={"versions": []})
    assert top.rows([plain], top.Scrape(0.0), None)[0].versions == "-"
