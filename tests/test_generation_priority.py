"""Priority lanes in the generation scheduler (worker/continuous.py), with the quick gpt2: a worker whose every slot is
taken by `low` requests, with more `low` queued, admits `high` requests at its next free slots, ahead of the `low`
backlog that was queued before them; and every `low` request is still answered (the consumer's every-4th read takes
`low` first: broker/consumer.ModelQueue)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from inferline.server.broker import keys
from tests.conftest import ROOT, Cluster, wait_for

SLOTS = 2          # the worker's max_batch_size: two sequences at a time
LOW, HIGH = 20, 4
TOKENS = {"low": 48, "high": 8}   # at most, per request of each lane: a low one holds its slot ~6x longer


@pytest.fixture(scope="module")
def gpt2_two_slots(redis_url: str, quick_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    cluster = Cluster(redis_url, tmp_path_factory.mktemp("generation-priority"))
    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=SLOTS, timeout_s=120)
    cluster.start_gateway()
    cluster.start_worker("gpt2")
    yield cluster
    cluster.close()


async def send(client: httpx.AsyncClient, url: str, lane: str, i: int,
               done: list[tuple[str, int, int, float]]) -> None:
    r = await client.post(url + "/generate", headers={"x-priority": lane}, json={
        "inputs": f"Request {i} of the {lane} lane: the function returns",
        "parameters": {"max_new_tokens": TOKENS[lane], "details": True}})
    assert r.status_code == 200 and r.headers["x-priority"] == lane, r.text
    done.append((lane, i, r.json()["details"]["generated_tokens"], time.perf_counter()))


@pytest.mark.slow
def test_high_is_admitted_ahead_of_a_low_backlog_and_low_is_all_answered(gpt2_two_slots: Cluster) -> None:
    url, client = gpt2_two_slots.url, gpt2_two_slots.client
    low_lane = keys.request_stream("gpt2", "", "low")
    done: list[tuple[str, int, int, float]] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            lows = [asyncio.create_task(send(http, url, "low", i, done)) for i in range(LOW)]
            # High is sent once the worker's slots are full and low requests wait on their lane behind them.
            await asyncio.to_thread(wait_for, lambda: client.xlen(low_lane) >= SLOTS + 10, 30, "a low backlog")
            queued_low = LOW - len(done)
            highs = [asyncio.create_task(send(http, url, "high", i, done)) for i in range(HIGH)]
            await asyncio.gather(*lows, *highs)
            assert queued_low >= SLOTS + 10

    asyncio.run(run())
    order = [lane for lane, *_ in sorted(done, key=lambda d: d[3])]
    assert len(order) == LOW + HIGH and order.count("low") == LOW   # every low answered: none starved
    assert all(tokens >= 1 for _, _, tokens, _ in done)
    # Each free slot takes from `high` first, but every 4th read of the consumer fills its slots from `low` first
    # (seen here as low, low, high, high, low, low, high, high, low...): the high ones overtake the >= 10 low requests
    # queued before them, most of which are answered after the last high one (in FIFO order all would be before).
    last_high = max(i for i, lane in enumerate(order) if lane == "high")
    assert order[last_high + 1:].count("low") >= LOW // 2, order


@pytest.mark.slow
def test_the_openai_priority_field_and_the_sdks_priority_choose_the_lane(gpt2_two_slots: Cluster) -> None:
    """vLLM's `priority` body field (an integer: below 0 high, above 0 low; or the name) on both OpenAI generation
    routes, and the SDK's `priority=`: the answer's x-priority names the lane the request was queued on."""
    from inferline.client import Client

    url = gpt2_two_slots.url
    completion = {"model": "gpt2", "prompt": "The module", "max_tokens": 2}
    chat = {"model": "gpt2", "max_tokens": 2, "messages": [{"role": "user", "content": "The module"}]}
    for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        for asked, lane in ((-1, "high"), (0, "normal"), (5, "low"), ("high", "high")):
            r = httpx.post(url + path, json={**body, "priority": asked}, timeout=60)
            assert r.status_code == 200 and r.headers["x-priority"] == lane, (path, asked, r.text)
        bad = httpx.post(url + path, json={**body, "priority": "urgent"}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "priority", bad.text

    seen: list[str] = []
    hooks = {"response": [lambda response: seen.append(response.headers.get("x-priority", ""))]}
    with Client(url, priority="low", http_client=httpx.Client(event_hooks=hooks)) as sdk:
        assert sdk.generate("The module", 2).generated_text is not None
    assert seen == ["low"]
    with pytest.raises(ValueError, match="priority"):
        Client(url, priority="urgent")


@pytest.mark.slow
def test_the_readme_priority_examples_answer_on_the_lane_they_say(gpt2_two_slots: Cluster) -> None:
    match = re.search(r"<!-- readme-priority: curl -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, "README.md lost its priority example"
    lines = match.group(1).splitlines()
    commands = [(i, line) for i, line in enumerate(lines) if line.startswith("curl ")]
    assert len(commands) == 2
    for i, line in commands:
        path = re.search(r"localhost:8000(/\S*)", line)
        body = re.search(r"-d '(.*?)'", line)
        assert path and body
        headers = dict(h.split(": ", 1) for h in re.findall(r"-H '(.*?)'", line))
        r = httpx.post(gpt2_two_slots.url + path.group(1), content=body.group(1), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert lines[i + 1] == f"# x-priority: {r.headers['x-priority']}"
