"""`inferline up` as a user runs it: no REDIS_URL (so it starts its private Redis), a config pointing at a model
store, one command. It must become ready in bounded time, serve, bring back a worker killed with -9, and on Ctrl-C
stop everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from inferline.server.broker import embedded
from tests.conftest import ROOT, child_env, live_workers, wait_for
from tests.served import wait_ready

pytestmark = pytest.mark.timeout(240)


def children(pid: int) -> set[int]:
    """Every live descendant of pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has exited; it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def process_tree(args: list[str], cwd: Path, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m inferline.server.cli *args` in its own session (as a user runs `inferline up` or `serve`), its
    output in `log`; at the end it is killed with every process it started (Redis, gateway, workers)."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    seen: set[int] = set()
    try:
        yield proc
    finally:
        seen |= children(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def up(quick_store: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`inferline up` with lstm and cnn from the quick store, in its own process group (as from a terminal).
    Teardown kills whatever is still running, so a failed test leaves nothing behind either."""
    port = embedded.free_port()
    config = tmp_path / "inferline.toml"
    # state_dir left at its default, relative to the working directory, as a user's would be
    config.write_text(f'model_store = "{quick_store}"\n'
                      f"[gateway]\nport = {port}\n[models.lstm]\ntask = \"forecast\"\nreplicas = 1\n"
                      "[models.cnn]\nreplicas = 1\n")
    log = tmp_path / "up.log"
    env = child_env()
    assert "REDIS_URL" not in env and not any(k.startswith("INFERLINE_") for k in env)
    with process_tree(["--config", str(config), "up"], tmp_path, log, env) as proc:
        yield proc, f"http://127.0.0.1:{port}", log


def test_up_serves_restarts_a_killed_worker_and_stops_cleanly(up: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, url, log = up
    started = time.monotonic()
    wait_ready(proc, log, [url])
    print(f"ready in {time.monotonic() - started:.1f} s")
    match = re.search(r"started a private Redis at ((?:redis|unix)://\S+)", log.read_text())
    assert match, log.read_text()
    client = redis.Redis.from_url(match.group(1))
    try:
        series = [float(i % 11) for i in range(30)]
        first = httpx.post(url + "/forecast", json={"series": series, "horizon": 3}, timeout=30)
        assert first.status_code == 200 and len(first.json()["forecast"]) == 3

        # everything up started: the private redis-server, the gateway, one worker per model
        processes = {pid: cmdline(pid) for pid in children(proc.pid)}
        assert sum("redis-server" in c for c in processes.values()) == 1, processes
        assert sum("inferline.server.cli gateway" in c for c in processes.values()) == 1, processes
        assert sum("inferline.server.worker.main" in c for c in processes.values()) == 2, processes

        (victim,) = live_workers(client, "lstm")
        os.kill(int(victim["pid"]), signal.SIGKILL)
        successor = wait_for(lambda: [w for w in live_workers(client, "lstm") if w["pid"] != victim["pid"]], 60,
                             "a new lstm worker")
        assert alive(int(successor[0]["pid"])) and not alive(int(victim["pid"]))
        again = httpx.post(url + "/forecast", json={"series": series, "horizon": 3}, timeout=30)
        assert again.status_code == 200 and again.json()["forecast"] == first.json()["forecast"]
    finally:
        client.close()

    everything = children(proc.pid)
    assert len(everything) >= 4
    # SIGINT to the supervisor alone (a Ctrl-C reaches the whole group; this is the stricter case): it must
    # stop its children itself
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    wait_for(lambda: not any(alive(pid) for pid in everything), 10, "every process gone")
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=2)
    assert "inferline: stopped" in log.read_text()


@pytest.mark.parametrize(("toml", "env", "key"), [
    ("[models.cnn]\nreplicas = -1\n", {}, "models.cnn.replicas"),
    ('[models.lstm]\ndevice = "gpu0"\n', {}, "models.lstm.device"),
    ("[gateway]\nport = 1\n[models.cnn]\nreplicas = 1\n", {"INFERLINE_GATEWAY__PORT": "eighty"}, "gateway.port"),
])
def test_up_with_a_bad_config_exits_naming_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n' + toml)
    out = subprocess.run([sys.executable, "-m", "inferline.server.cli", "--config", str(config), "up", "--no-build"],
                         env=child_env(**env), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert key in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()   # nothing was started


ACCESS_MAX_BYTES = 8192   # ~40 lines a file at ~190 bytes a request


def test_up_rotates_the_access_log_at_its_size(tmp_path: Path) -> None:
    """`inferline up` writes the access log to <state_dir>/logs/access.log and rotates it at
    gateway.access_log_max_bytes, keeping gateway.access_log_backups old files: 300 requests (~57 KB of lines)
    leave three files of at most 8 KiB each, and none of those lines in gateway.log."""
    port = embedded.free_port()
    config = tmp_path / "inferline.toml"
    config.write_text(f"[gateway]\nport = {port}\naccess_log_max_bytes = {ACCESS_MAX_BYTES}\naccess_log_backups = 2\n"
                      '[models.echo]\nmodel = "tests.runtimes:Echo"\nreplicas = 0\n')
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", "--config", str(config), "up"],
                                env=child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    logs = tmp_path / ".inferline" / "logs"
    try:
        wait_ready(proc, log, [url], 60, path="/healthz")
        with httpx.Client(timeout=10) as client:
            for _ in range(300):
                assert client.get(url + "/healthz").status_code == 200
        files = wait_for(lambda: sorted(logs.glob("access.log*")) if (logs / "access.log.2").exists() else None, 10,
                         "two rotations")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert [f.name for f in files] == ["access.log", "access.log.1", "access.log.2"], files
    sizes = {f.name: f.stat().st_size for f in files}
    assert all(0 < size <= ACCESS_MAX_BYTES for size in sizes.values()), sizes
    assert sizes["access.log.1"] > ACCESS_MAX_BYTES - 400, sizes   # rotated when full, not early
    lines = (logs / "access.log.1").read_text().splitlines()
    # access lines only (up's own status polls show too, as route=/v1/models): the test's requests among them
    assert lines and all(" inferline.access request id=" in line for line in lines)
    assert sum("route=/healthz" in line for line in lines) > len(lines) // 2
    assert "inferline.access" not in (logs / "gateway.log").read_text()
