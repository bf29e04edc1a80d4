"""The `inferline` commands as a user runs them, each a real subprocess against a live `inferline up` (its own private
Redis, lstm and cnn from the quick store, gpt2 from the quick gpt2 build): `up` says it is up only once /readyz is
200 and shows each model's state before; status, models, predict, generate (streamed), top (in a pseudo-terminal)
show the live models; down stops it."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inferline import server as service
from inferline.server.broker import embedded
from tests.conftest import ROOT, child_env, wait_for

pytestmark = pytest.mark.timeout(300)
SERIES = [5.0, 11, 16, 23, 36, 58, 29, 20, 10, 8, 3, 0, 0, 2, 11, 27, 47, 63, 60, 39, 28, 26, 22, 11]


class Up:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path, config: Path, cwd: Path) -> None:
        self.proc, self.url, self.log, self.config, self.cwd = proc, url, log, config, cwd
        self.ready_seen_at_banner: int | None = None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "inferline.server.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.cwd, env=child_env(INFERLINE_URL=self.url))


@pytest.fixture(scope="module")
def up(quick_store: Path, quick_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("cli")
    port = embedded.free_port()
    config = tmp / "inferline.toml"
    config.write_text(f'model_store = "{quick_store}"\n[gateway]\nport = {port}\n'
                      '[models.lstm]\ntask = "forecast"\n[models.cnn]\ntask = "classify-image"\n'
                      f'[models.gpt2]\ntask = "generate"\nartifact = "{quick_gpt2 / "gpt2"}"\n')
    log = tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", "up", "--config", str(config),
                                 "--no-build"],
                                env=child_env(PYTHONPATH=str(ROOT)), stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                start_new_session=True)
    running = Up(proc, f"http://127.0.0.1:{port}", log, config, tmp)
    try:
        def banner() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            if "inferline is up" not in log.read_text():
                return False
            # the banner is printed only after /readyz said 200, so it must still say so now
            running.ready_seen_at_banner = httpx.get(running.url + "/readyz", timeout=5).status_code
            return True

        wait_for(banner, 180, "the `inferline is up` banner")
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def test_up_says_up_only_when_ready_and_shows_each_model_loading(up: Up) -> None:
    assert up.ready_seen_at_banner == 200
    lines = up.log.read_text().splitlines()
    banner = next(i for i, line in enumerate(lines) if "inferline is up" in line)
    for model in ("lstm", "cnn", "gpt2"):
        states = [i for i, line in enumerate(lines) if line.startswith(f"inferline: model {model} ")]
        assert states and "ready (1/1 live" in lines[states[-1]], lines
        assert states[-1] < banner   # every model ready before the banner
    assert any("loading (0/1 live)" in line for line in lines[:banner])   # progress shown while they load
    assert not [line for line in lines if "HTTP Request:" in line]   # not httpx's line per readiness poll


def test_version_and_config_after_the_command(up: Up) -> None:
    version = up.cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"inferline {service.__version__}"
    status = up.cli("status", "--config", str(up.config))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ready" in status.stdout and f"pid {up.proc.pid}" in status.stdout
    for model in ("lstm", "cnn", "gpt2"):
        assert re.search(rf"{model}: ready \(1/1 live", status.stdout), status.stdout


def test_models_table_shows_the_live_models(up: Up) -> None:
    httpx.post(up.url + "/forecast", json={"series": SERIES, "horizon": 2}, timeout=60).raise_for_status()
    table = up.cli("models", "--url", up.url)   # --url beats INFERLINE_URL; both name the same gateway here
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["MODEL", "VERSION", "VERSIONS", "TASK", "LIVE", "DEVICE", "QUEUE", "P50_MS"]
    by_model = {row.split()[0]: row.split() for row in rows}
    assert set(by_model) == {"lstm", "cnn", "gpt2"}
    assert by_model["lstm"][3:7] == ["forecast", "1/1", "cpu", "0"] and by_model["lstm"][7] != "-"
    assert by_model["lstm"][2] == f"{by_model['lstm'][1]}:1/1@100%"   # each version: live/wanted@share


def test_predict_prints_the_answer(up: Up) -> None:
    out = up.cli("predict", "lstm", json.dumps({"series": SERIES, "horizon": 3}))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"] == "lstm" and len(answer["forecast"]) == 3
    bad = up.cli("predict", "lstm", json.dumps({"series": SERIES, "horizon": "x"}))
    assert bad.returncode == 1 and "422" in bad.stderr and "horizon" in bad.stderr


def test_generate_streams_the_text(up: Up) -> None:
    want = httpx.post(up.url + "/generate", json={"inputs": "The module", "parameters": {"max_new_tokens": 12}},
                      timeout=60).json()["generated_text"]
    out = up.cli("generate", "The module", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    assert re.search(r"\[(length|eos_token|stop_sequence), \d+ tokens\]", out.stderr)


COLUMNS = ["MODEL", "VERSION", "VERSIONS", "KIND", "LIVE", "DEVICE", "QUEUE", "OLDEST_MS", "REQ/S", "TOK/S", "BATCH",
           "P50_MS", "P99_MS", "WAITING", "INFLIGHT", "WAIT_MS", "DRAIN/S", "WANT"]


def top_rows(frame: str) -> dict[str, dict[str, str]]:
    """A top frame's table: model -> column -> cell (empty when the frame has no table yet)."""
    lines = [line for line in frame.splitlines()[2:] if line.strip()]
    if not lines or lines[0].split() != COLUMNS:
        return {}
    rows = [line.split() for line in lines[1:]]
    assert all(len(row) == len(COLUMNS) for row in rows), frame   # nothing else on the screen (no log lines)
    return {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in rows}


def busy(rows: dict[str, dict[str, str]]) -> bool:
    lstm = rows.get("lstm", {})
    return lstm.get("REQ/S", "-") not in ("-", "0.0") and lstm.get("BATCH", "-") != "-"


def test_top_in_a_terminal_shows_each_model(up: Up) -> None:
    pid, fd = pty.fork()
    if pid == 0:   # the child: `inferline top` on a pseudo-terminal, as a user would run it
        os.chdir(up.cwd)
        os.execve(sys.executable, [sys.executable, "-m", "inferline.server.cli", "top", "--interval", "0.5"],
                  child_env(INFERLINE_URL=up.url, PYTHONPATH=str(ROOT)))
    screen, frame = b"", ""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:   # send forecasts until a frame shows them (worker stats lag a beat)
            httpx.post(up.url + "/forecast", json={"series": SERIES, "horizon": 2}, timeout=60)
            while select.select([fd], [], [], 0.05)[0]:
                screen += os.read(fd, 65536)
            frames = screen.decode(errors="replace").split("\x1b[H\x1b[2J")
            if len(frames) > 2 and busy(top_rows(frames[-2])):
                frame = frames[-2]   # the last complete frame
                break
    finally:
        os.kill(pid, 2)
        # Read the terminal until top has exited: a top caught writing a frame into a full pseudo-terminal flushes
        # the rest on its way out, and would wait for ever for a reader (a real terminal always reads).
        stop_by = time.monotonic() + 20
        while (ended := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < stop_by:
            with contextlib.suppress(OSError):
                while select.select([fd], [], [], 0.05)[0]:
                    os.read(fd, 65536)
        if ended == (0, 0):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert ended != (0, 0) and os.waitstatus_to_exitcode(ended[1]) == 0, "top did not exit 0 within 20 s of Ctrl-C"
    assert frame.startswith("inferline top"), screen[-3000:]
    rows = top_rows(frame)
    assert {"lstm", "cnn", "gpt2"} <= set(rows), frame
    assert rows["gpt2"]["KIND"] == "generation" and rows["lstm"]["LIVE"] == "1/1"
    assert rows["lstm"]["P50_MS"] != "-" and float(rows["lstm"]["BATCH"]) >= 1, frame
    assert rows["lstm"]["WAITING"] != "-" and int(rows["lstm"]["WANT"]) >= 1, frame   # the backlog columns


def test_down_stops_it(up: Up) -> None:
    out = up.cli("down", "--config", str(up.config))
    assert out.returncode == 0 and "stopped" in out.stdout, out.stdout + out.stderr
    up.proc.wait(timeout=30)
    assert "inferline: stopped" in up.log.read_text()
    after = up.cli("status", "--config", str(up.config))
    assert after.returncode == 3 and "no `inferline up`" in after.stdout
