"""The response cache on the generation routes, with a real gateway, the quick gpt2's worker and Redis: a greedy or
seeded request is kept (TGI /generate and /generate_stream, OpenAI completions and chat) and a repeat is a hit with
the same answer, streaming ones replayed as the same events; a sampled request without a seed is never looked up; a
different prompt or parameter is a miss; a new version never serves the old one's entries; the byte bound holds."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from inferline.server.broker import keys
from inferline.server.config import CacheSpec
from inferline.server.protocol import ModelInfo
from tests.conftest import ROOT, Cluster, wait_for
from tests.test_generation_serving import sse_events
from tests.test_observability import scrape, total

BOUND = 16 * 1024   # bytes for all of gpt2's entries: a 6-token generation's events are ~1.5 KiB


def readme_block(marker: str) -> str:
    """The code block under the README's `<!-- marker -->` line."""
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, f"README.md lost its {marker} example"
    return match.group(1)


def readme_cache() -> dict[str, Any]:
    """The README's cache table, as written (a valid CacheSpec)."""
    (table,) = tomllib.loads(readme_block("readme-cache"))["models"].values()
    CacheSpec.model_validate(table["cache"])
    return dict(table["cache"])


@pytest.fixture(scope="module")
def cached_gpt2(redis_url: str, quick_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    cluster = Cluster(redis_url, tmp_path_factory.mktemp("generation-cache"))
    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=8, timeout_s=60,
                 cache={**readme_cache(), "max_bytes": BOUND})
    cluster.start_gateway()
    cluster.start_worker("gpt2")
    yield cluster
    cluster.close()


def post(url: str, path: str, body: dict[str, object]) -> httpx.Response:
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def streamed(url: str, path: str, body: dict[str, object]) -> tuple[httpx.Headers, list[str]]:
    with httpx.Client(timeout=60) as client, client.stream("POST", url + path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        return resp.headers, sse_events(resp)


def tgi_body(prompt: str, **parameters: object) -> dict[str, object]:
    return {"inputs": prompt, "parameters": {"max_new_tokens": 6, "details": True, **parameters}}


@pytest.mark.slow
def test_the_readme_example_is_a_miss_then_a_hit(cached_gpt2: Cluster) -> None:
    (body,) = re.findall(r"-d '(.*?)'", readme_block("readme-cache: curl"))
    answers = [httpx.post(cached_gpt2.url + "/generate", content=body, timeout=60) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200]
    assert [r.headers["x-cache"] for r in answers] == ["miss", "hit"] and answers[0].content == answers[1].content


@pytest.mark.slow
def test_tgi_greedy_and_seeded_hit_with_the_same_answer_sampled_never_looked_up(cached_gpt2: Cluster) -> None:
    url = cached_gpt2.url
    first = post(url, "/generate", tgi_body("The function returns"))
    again = post(url, "/generate", tgi_body("The function returns"))
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.content == first.content
    assert again.headers["x-model-version"] == first.headers["x-model-version"]   # a hit names its version
    assert post(url, "/generate", tgi_body("The function returns", max_new_tokens=5)).headers["x-cache"] == "miss"
    assert post(url, "/generate", tgi_body("Return")).headers["x-cache"] == "miss"

    # The stream flag is no part of the key: the same request streamed is a hit, replayed as the same events, whose
    # last carries the text /generate gave.
    headers, events = streamed(url, "/generate_stream", tgi_body("The function returns"))
    assert headers["x-cache"] == "hit"
    last = orjson.loads(events[-1])
    assert len(events) == 6 and last["generated_text"] == first.json()["generated_text"]
    assert last["details"]["generated_tokens"] == 6
    assert streamed(url, "/generate_stream", tgi_body("The function returns"))[1] == events
    # TGI's compat route, answered from the same entry
    compat = post(url, "/", {**tgi_body("The function returns"), "stream": False})
    assert compat.headers["x-cache"] == "hit" and compat.json() == [first.json()]

    seeded = tgi_body("Note that", do_sample=True, temperature=1.5, seed=7)
    one, two = post(url, "/generate", seeded), post(url, "/generate", seeded)
    assert (one.headers["x-cache"], two.headers["x-cache"]) == ("miss", "hit") and one.content == two.content
    assert one.json()["details"]["seed"] == 7
    assert post(url, "/generate", {**seeded, "parameters": {**seeded["parameters"],  # type: ignore[dict-item]
                                                            "seed": 8}}).headers["x-cache"] == "miss"
    sampled = tgi_body("Note that", do_sample=True, temperature=1.5)   # no seed: never kept, never looked up
    assert "x-cache" not in post(url, "/generate", sampled).headers
    assert "x-cache" not in post(url, "/generate", sampled).headers


@pytest.mark.slow
def test_openai_completions_and_chat_hit_streams_replay_and_choices_share_entries(cached_gpt2: Cluster) -> None:
    url = cached_gpt2.url
    body = {"model": "gpt2", "prompt": "This module provides a way to", "max_tokens": 6, "temperature": 0}
    first, again = post(url, "/v1/completions", body), post(url, "/v1/completions", body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json()["choices"] == first.json()["choices"] and again.json()["usage"] == first.json()["usage"]
    assert again.json()["id"] != first.json()["id"]   # the answer's own fields are the request's, not the entry's
    headers, events = streamed(url, "/v1/completions", {**body, "stream": True})
    assert headers["x-cache"] == "hit" and events[-1] == "[DONE]"
    assert "".join(orjson.loads(e)["choices"][0]["text"] for e in events[:-1]) == first.json()["choices"][0]["text"]

    chat = {"model": "gpt2", "max_tokens": 6, "seed": 3, "temperature": 1.2,
            "messages": [{"role": "user", "content": "An object is"}]}
    c1, c2 = post(url, "/v1/chat/completions", chat), post(url, "/v1/chat/completions", chat)
    assert (c1.headers["x-cache"], c2.headers["x-cache"]) == ("miss", "hit")
    assert c2.json()["choices"] == c1.json()["choices"]
    # n = 2 seeded choices are two sequences with their own seeds: two entries; asked again, both hit
    two = {**chat, "n": 2, "seed": 11}
    assert post(url, "/v1/chat/completions", two).headers["x-cache"] == "miss"
    assert post(url, "/v1/chat/completions", two).headers["x-cache"] == "hit"
    unseeded = {k: v for k, v in chat.items() if k != "seed"}
    assert "x-cache" not in post(url, "/v1/chat/completions", unseeded).headers


@pytest.mark.slow
def test_a_new_version_is_not_served_old_entries_and_the_byte_bound_holds(cached_gpt2: Cluster) -> None:
    url, client = cached_gpt2.url, cached_gpt2.client
    body = tgi_body("The default value is")
    post(url, "/generate", body)
    assert post(url, "/generate", body).headers["x-cache"] == "hit"
    raw = client.get(keys.model_info("gpt2"))
    info = ModelInfo.decode(raw)
    info.version = info.version + "-next"
    client.set(keys.model_info("gpt2"), info.encode())
    wait_for(lambda: post(url, "/generate", body).headers["x-cache"] == "miss", 10, "the new version misses")
    # the worker that answered is still the old version: its tokens are not kept under the new version's key
    assert post(url, "/generate", body).headers["x-cache"] == "miss"
    client.set(keys.model_info("gpt2"), raw)
    wait_for(lambda: post(url, "/generate", body).headers["x-cache"] == "hit", 10, "the old version's entry again")

    for i in range(16):   # ~1.5 KiB each: 16 of them pass the 16 KiB bound
        post(url, "/generate", tgi_body(f"Keyword arguments number {i} are"))
    used = int(client.get(keys.cache_bytes("gpt2")))
    entries = client.zrange(keys.cache_index("gpt2"), 0, -1)
    assert 0 < used <= BOUND and len(entries) >= 2
    assert used == sum(client.strlen(k) for k in entries)
    samples = scrape(url)
    assert total(samples, "inferline_cache_requests_total", model="gpt2", result="hit") >= 1
    assert 0 < total(samples, "inferline_cache_bytes", model="gpt2") <= BOUND
