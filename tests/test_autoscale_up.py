"""The autoscaler under a real `inferline up` (server/scaling.py): a user model that sleeps 80 ms a request, one
request a batch. `busy` (min 1, max 3) under a steady overload scales up, drains, and returns to 1 once the load
stops, losing nothing and never running more than its ceiling; `lazy` (min 0) goes to zero when idle and a request
wakes it; `hasty` (min 0, a deadline shorter than a worker's start) answers 504 naming the start."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferline.server.broker import embedded
from tests.conftest import child_env, wait_for
from tests.served import SLOW_MODEL, Load, cli_process, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CEILING = min(3, os.cpu_count() or 1)   # autoscaler.machine_ceiling on CPU: the cores over one thread a replica


@dataclass
class Up:
    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    def live(self, model: str) -> int:
        cards = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        return int(next(c for c in cards if c["id"] == model)["live_replicas"])

    def decisions(self, model: str) -> list[tuple[int, int]]:
        """The autoscaler's writes for `model`, from the supervisor's log: (from, to)."""
        text = self.log.read_text()
        return [(int(a), int(b)) for a, b in re.findall(rf"autoscale model={model} replicas (\d+) -> (\d+)", text)]


def model_table(name: str, where: Path, replicas: int, timeout_s: float, **autoscale: Any) -> str:
    table = ", ".join(f"{k} = {v}" for k, v in {"enabled": "true", **autoscale}.items())
    return (f'[models.{name}]\nmodel = "{where / "slow_model.py"}:Slow"\nreplicas = {replicas}\n'
            f'timeout_s = {timeout_s}\nautoscale = {{ {table} }}\n')


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    where = tmp_path_factory.mktemp("autoscale")
    (where / "slow_model.py").write_text(SLOW_MODEL)
    port = embedded.free_port()
    config = where / "inferline.toml"
    config.write_text(
        f'state_dir = "{where / "state"}"\n[gateway]\nport = {port}\n'
        + model_table("busy", where, 1, 60, min_replicas=1, max_replicas=3, target_queue_s=0.5, up_delay_s=1,
                      down_delay_s=2)
        + model_table("lazy", where, 1, 60, min_replicas=0, max_replicas=1, up_delay_s=0, down_delay_s=2)
        + model_table("hasty", where, 0, 0.3, min_replicas=0, max_replicas=1, up_delay_s=0, down_delay_s=2))
    with embedded.redis_server(where / "redis") as redis_url:
        log = where / "up.log"
        env = child_env(REDIS_URL=redis_url, INFERLINE_CONFIG=str(config))
        with cli_process(["up", "--no-build"], where, env, log) as proc:
            fleet = Up(f"http://127.0.0.1:{port}", log, proc)
            wait_ready(proc, log, [fleet.url])
            yield fleet


def test_an_overload_scales_up_drains_and_returns_to_the_minimum(up: Up) -> None:
    peak = [1]

    def scaled() -> bool:
        peak[0] = max(peak[0], up.live("busy"))
        return peak[0] >= CEILING

    with Load([up.url], "busy", clients=24, warm=0) as load:   # ~2x one replica
        wait_for(scaled, 60, f"busy scaled to {CEILING} live replicas")
        time.sleep(3)   # the overload goes on at the ceiling a while (the load, not an assertion)
        peak[0] = max(peak[0], up.live("busy"))
    wait_for(lambda: up.live("busy") == 1, 60, "busy back to 1 replica after the load")
    wait_for(lambda: re.search(r"worker busy#\d drained \(exit 0\)", up.log.read_text()), 30, "scale-in drained")
    assert peak[0] <= CEILING
    assert load.answers and not load.failed(), load.failed()[:5]
    assert all(a.body["y"] == a.x + 1 for a in load.answers)
    moves = up.decisions("busy")
    assert moves and moves[0][1] > 1 and moves[-1][1] == 1, moves
    assert all(to <= CEILING for _, to in moves), moves   # never above min(max_replicas, the machine's ceiling)
    print(f"\nROW autoscale busy: {len(load.answers)} answered, 0 failed; moves {moves}")


def test_idle_scales_to_zero_and_a_request_wakes_it(up: Up) -> None:
    wait_for(lambda: up.live("lazy") == 0, 60, "lazy scaled to zero when idle")
    started = time.monotonic()
    r = httpx.post(up.url + "/v1/models/lazy/predict", json={"x": 41}, timeout=90)
    assert r.status_code == 200 and r.json()["y"] == 42, r.text
    print(f"\nROW autoscale from zero: answered in {time.monotonic() - started:.1f} s")


def test_a_deadline_shorter_than_the_start_is_a_504_that_says_so(up: Up) -> None:
    assert up.live("hasty") == 0
    r = httpx.post(up.url + "/v1/models/hasty/predict", json={"x": 1}, timeout=30)
    assert r.status_code == 504, r.text
    assert "starting" in r.text and "scaled to zero" in r.text, r.text
    wait_for(lambda: up.live("hasty") == 1, 60, "the request woke a hasty worker all the same")
