"""Versions, rollouts and run-time scaling end to end: `inferline up` (the supervisor) serving a user's Model from a
store with four versions, a second gateway on the same Redis, and real clients under steady load. Version 1 answers
x + 1, version 2 x + 2; version 3 raises for 9 inputs in 10; version 4's setup raises. One cluster for the module;
the tests run in order, each leaving the model served by one version with no rollout in progress."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferline.server.broker import embedded
from tests.conftest import ROOT, child_env, wait_for
from tests.served import Load, cli_process, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = '''
import json
from pydantic import BaseModel
from inferline import Model


class Number(BaseModel):
    x: int


class Sum(BaseModel):
    y: int
    version: str


class Echo(Model):
    max_batch_size = 8

    def setup(self, device: str) -> None:
        behaviour = json.loads((self.artifact / "behaviour.json").read_text())
        if behaviour.get("setup_fails"):
            raise RuntimeError("version " + self.version + " cannot load: its weights are corrupt")
        self.add = behaviour["add"]
        self.fail = behaviour.get("fail", False)

    def predict(self, batch: list[Number]) -> list[Sum]:
        if self.fail and any(n.x % 10 for n in batch):
            raise RuntimeError("version " + self.version + " is broken")
        return [Sum(y=n.x + self.add, version=self.version) for n in batch]
'''
BEHAVIOUR = {"1": {"add": 1}, "2": {"add": 2}, "3": {"add": 3, "fail": True}, "4": {"add": 4, "setup_fails": True}}
WINDOW = {"window_requests": 200, "window_s": 3.0, "max_failure_rate": 0.05}
CLIENTS = 8


@dataclass
class Fleet:
    url: str
    url2: str
    up_log: Path
    proc: subprocess.Popen[bytes]

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None, url: str = "") -> httpx.Response:
        return httpx.request(method, (url or self.url) + path, json=body, timeout=10)

    def rollout(self, version: str, **extra: Any) -> dict[str, Any]:
        response = self.admin("POST", "/admin/models/echo/rollout", {"version": version, **WINDOW, **extra})
        assert response.status_code == 202, response.text
        state: dict[str, Any] = response.json()
        return state

    def state(self) -> dict[str, Any]:
        found: dict[str, Any] = self.admin("GET", "/admin/models/echo/rollout").json()
        return found

    def settled(self, *states: str, timeout_s: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            assert self.proc.poll() is None, self.up_log.read_text()[-3000:]
            state = self.state()
            return state if state["state"] in states else None
        found: dict[str, Any] = wait_for(check, timeout_s, f"rollout {states}")
        return found

    def versions(self) -> dict[str, dict[str, Any]]:
        [echo] = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        return {v["version"]: v for v in echo["versions"]}


def under_load(fleet: Fleet, both: bool = True) -> Load:
    """CLIENTS closed-loop clients on the echo model, over both gateways (or the first)."""
    return Load([fleet.url, fleet.url2] if both else [fleet.url], "echo", clients=CLIENTS)


def check_answers(load: Load) -> None:
    """Every 200 names its version in the header and the body, and has that version's output."""
    for a in load.answers:
        if a.status == 200:
            assert a.version == a.body["version"], a
            assert a.body["y"] == a.x + BEHAVIOUR[a.version]["add"], a


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    where = tmp_path_factory.mktemp("rollouts")
    (where / "echo_model.py").write_text(MODEL)
    for version, behaviour in BEHAVIOUR.items():
        d = where / "store" / "echo" / version
        d.mkdir(parents=True)
        (d / "behaviour.json").write_text(json.dumps(behaviour))
        (d / "manifest.json").write_text(json.dumps({"version": version}))
    port, port2 = embedded.free_port(), embedded.free_port()
    config = where / "inferline.toml"
    config.write_text(f'model_store = "{where / "store"}"\nstate_dir = "{where / "state"}"\n[gateway]\nport = {port}\n'
                      f'[models.echo]\nmodel = "{where / "echo_model.py"}:Echo"\nversion = "1"\nreplicas = 1\n'
                      'timeout_s = 20\n')
    with embedded.redis_server(where / "redis") as redis_url:
        env = child_env(REDIS_URL=redis_url, INFERLINE_CONFIG=str(config))
        up_log = where / "up.log"
        with cli_process(["up", "--no-build"], where, env, up_log) as proc, \
                cli_process(["gateway", "--port", str(port2)], where, env, where / "gateway2.log"):
            fleet = Fleet(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}", up_log, proc)
            wait_ready(proc, up_log, [fleet.url, fleet.url2])
            yield fleet


def drained(fleet: Fleet, version: str) -> None:
    """The supervisor saw a worker of `version` exit 0 after it was drained."""
    wait_for(lambda: f"worker echo@{version}#0 drained (exit 0)" in fleet.up_log.read_text(), 30,
             f"version {version}'s worker drained")


def test_the_pinned_version_serves_and_names_itself(fleet: Fleet) -> None:
    r = httpx.post(fleet.url + "/v1/models/echo/predict", json={"x": 5}, timeout=10)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    assert r.json() == {"model": "echo", "y": 6, "version": "1"}
    v2 = httpx.post(fleet.url + "/v2/models/echo/infer", timeout=10,
                    json={"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [5]}]})
    assert v2.status_code == 200, v2.text
    assert v2.headers["x-model-version"] == "1" and v2.json()["model_version"] == "1"
    assert fleet.versions() == {"1": {"version": "1", "replicas": 1, "live_replicas": 1, "weight": 100, "live": True}}


def test_rollout_and_rollback_under_load_fail_no_request(fleet: Fleet) -> None:
    with under_load(fleet) as load:
        started = time.monotonic()
        assert fleet.rollout("2")["state"] == "starting"
        state = fleet.settled("done", "rolled_back")
        assert state["state"] == "done", state
        done_at = time.monotonic()
        wait_for(lambda: len(load.since(done_at)) >= 50, 30, "answers after the rollout")
    assert not load.failed(), load.failed()[:5]
    check_answers(load)
    print(f"\nROW rollout 1 -> 2 under load: {len(load.answers)} requests, {len(load.failed())} failed; done "
          f"{done_at - started:.1f} s after the POST")
    before = [a.version for a in load.answers if a.at < started]
    after = [a.version for a in load.since(done_at)]
    assert set(before) == {"1"} and set(after) == {"2"}, (set(before), set(after))
    drained(fleet, "1")
    assert fleet.versions()["2"]["live"] and "1" not in fleet.versions()

    # the CLI's rollback: back to 1, under load, the same
    with under_load(fleet) as load:
        cli = subprocess.run([sys.executable, "-m", "inferline.server.cli", "rollback", "echo", "--url", fleet.url,
                              "--wait"], env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "2 -> 1 done" in cli.stdout, cli.stdout
        done_at = time.monotonic()
        wait_for(lambda: len(load.since(done_at)) >= 50, 30, "answers after the rollback")
    assert not load.failed(), load.failed()[:5]
    check_answers(load)
    assert {a.version for a in load.since(done_at)} == {"1"}
    drained(fleet, "2")


def test_a_canary_gets_its_share_on_both_gateways_and_promote_moves_all(fleet: Fleet) -> None:
    fleet.rollout("2", canary_percent=20, window_s=2.0)
    fleet.settled("canary")
    seen: dict[str, list[str]] = {fleet.url: [], fleet.url2: []}
    with httpx.Client(timeout=20) as http:
        for i in range(300):   # one at a time, alternating gateways: the split's counter is shared in Redis
            url = (fleet.url, fleet.url2)[i % 2]
            r = http.post(url + "/v1/models/echo/predict", json={"x": i})
            assert r.status_code == 200, r.text
            seen[url].append(r.headers["x-model-version"])
    share = sum(v.count("2") for v in seen.values()) / 300
    # The split is exact over every 100 requests of all gateways together (a shared counter): 60 of 300, within
    # 2 points; each gateway's own half within 10 points of 20%.
    assert abs(share - 0.20) <= 0.02, share
    for url, versions in seen.items():
        assert abs(versions.count("2") / len(versions) - 0.20) <= 0.10, (url, versions.count("2"))
    assert fleet.state()["weights"] == {"1": 80, "2": 20}
    promoted = fleet.admin("POST", "/admin/models/echo/promote", url=fleet.url2)   # any gateway
    assert promoted.status_code == 200 and promoted.json()["weights"] == {"1": 0, "2": 100}, promoted.text
    after = [httpx.post(fleet.url + "/v1/models/echo/predict", json={"x": i}, timeout=20).headers["x-model-version"]
             for i in range(20)]
    assert set(after) == {"2"}
    assert fleet.settled("done")["to_version"] == "2"
    drained(fleet, "1")


def test_a_version_that_fails_most_requests_rolls_back_by_itself(fleet: Fleet) -> None:
    with under_load(fleet) as load:
        fleet.rollout("3")
        state = fleet.settled("rolled_back")
        back_at = time.monotonic()
        wait_for(lambda: len(load.since(back_at)) >= 50, 30, "answers after the rollback")
    assert state["automatic_rollback"] and "failed" in state["reason"] and "5%" in state["reason"], state
    failed = load.failed()
    print(f"\nROW automatic rollback (predict fails 9 in 10): {len(load.answers)} requests, {len(failed)} failed; "
          f"rolled back: {state['reason']}")
    # The guard trips in the same Redis step as the failure that passes 5% of the 200-request window (10): what
    # fails beyond that was already on version 3's lane, at most one request per client and one batch.
    assert 0 < len(failed) <= 10 + 2 * CLIENTS, len(failed)
    assert all(a.status == 500 for a in failed), failed[:3]
    assert {a.version for a in load.since(back_at)} == {"2"}
    assert state["failures"]["3"] > 10
    check_answers(load)
    metrics = httpx.get(fleet.url + "/metrics", timeout=10).text
    assert 'inferline_automatic_rollbacks_total{model="echo"} 1.0' in metrics
    drained(fleet, "3")


def test_a_version_that_cannot_load_gets_no_traffic_and_rolls_back(fleet: Fleet) -> None:
    with under_load(fleet, both=False) as load:
        fleet.rollout("4")
        state = fleet.settled("rolled_back")
    assert state["automatic_rollback"] and "cannot load: its weights are corrupt" in state["reason"], state
    assert not load.failed(), load.failed()[:5]
    print(f"\nROW automatic rollback (setup raises): {len(load.answers)} requests, {len(load.failed())} failed; "
          f"{(state['finished_ms'] - state['started_ms']) / 1000:.1f} s to rolled_back: {state['reason']}")
    assert {a.version for a in load.answers} == {"2"}
    metrics = httpx.get(fleet.url + "/metrics", timeout=10).text
    assert 'inferline_automatic_rollbacks_total{model="echo"} 2.0' in metrics


def test_scale_up_down_to_zero_and_back_under_load(fleet: Fleet) -> None:
    def live() -> int:
        return int(fleet.versions()["2"]["live_replicas"])

    def scale(n: int) -> None:
        r = fleet.admin("POST", "/admin/models/echo/scale", {"replicas": n})
        assert r.status_code == 200 and r.json()["replicas"] == n and r.json()["version"] == "2", r.text

    with under_load(fleet) as load:
        scale(3)
        wait_for(lambda: live() == 3, 60, "3 live replicas")
        scale(0)
        wait_for(lambda: live() == 0, 60, "no live replica")
        parked_at = time.monotonic()
        time.sleep(1.0)   # requests now wait in the queue, not refused
        assert not load.since(parked_at + 0.5), "answered with no replica"
        scale(1)
        wait_for(lambda: live() == 1, 60, "a replica back")
        back_at = time.monotonic()
        wait_for(lambda: len(load.since(back_at)) >= 50, 30, "answers after scaling back")
    assert not load.failed(), load.failed()[:5]   # the drained workers answered what they held; the parked ones too
    check_answers(load)
    slowest = max(b.at - a.at for a, b in zip(load.answers, load.answers[1:], strict=False))
    print(f"\nROW scale 1 -> 3 -> 0 -> 1 under load: {len(load.answers)} requests, {len(load.failed())} failed; "
          f"longest gap between answers {slowest:.1f} s (the time at 0 replicas)")
    bad = fleet.admin("POST", "/admin/models/echo/scale", {"replicas": -1})
    assert bad.status_code == 422 and "replicas" in bad.text


def readme_operate() -> list[str]:
    """The curl lines of the README's Operate example, in order."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- operate-example[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md lost its Operate example"
    return [line for line in match.group(1).splitlines() if line.startswith("curl ")]


def test_the_readme_operate_examples_run(fleet: Fleet) -> None:
    fleet.rollout("1")   # the example rolls version 2 out again
    fleet.settled("done")
    lines = readme_operate()
    assert [line.split("/admin/models/echo/")[1].split()[0].strip("'") for line in lines] == \
        ["rollout", "rollout", "promote", "scale"]
    outputs = []
    for line in lines[:3]:
        run = subprocess.run(shlex.split(line.replace("http://localhost:8000", fleet.url)), capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        outputs.append(json.loads(run.stdout))
    assert outputs[0]["to_version"] == "2" and outputs[0]["canary_percent"] == 20
    assert outputs[2]["canary_percent"] == 100
    with httpx.Client(timeout=20) as http:   # the example's default window: its first 200 answers (or 60 s)
        wait_for(lambda: fleet.state()["state"] in ("rolling", "draining", "done"), 60, "promoted")
        for i in range(200):
            assert http.post(fleet.url + "/v1/models/echo/predict", json={"x": i}).status_code == 200
    assert fleet.settled("done")["to_version"] == "2"
    run = subprocess.run(shlex.split(lines[3].replace("http://localhost:8000", fleet.url)), capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0 and json.loads(run.stdout)["replicas"] == 2, run.stdout + run.stderr
    wait_for(lambda: fleet.versions()["2"]["live_replicas"] == 2, 60, "2 live replicas")
