"""Text generation served end to end: a quick-built gpt2 (~20 s, once per session) behind a real gateway and a real
generation worker on a real Redis, driven by the unmodified `text-generation` (TGI) and `openai` clients and by raw
HTTP where the wire format itself is the contract (../shared/API.md, "Text generation").

One gateway + worker serve the whole module; a second gateway with a tiny queue_cap shares that worker for the
overload test. Greedy equality across batch shapes relies on the margins measured in tests/test_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import text_generation
from text_generation.errors import OverloadedError, ValidationError
from text_generation.types import FinishReason

from tests.conftest import GPT2_CONTEXT as CONTEXT
from tests.conftest import GPT2_PROMPTS, Cluster, live_workers, wait_for

# text-generation 0.7 calls pydantic's deprecated .dict() on every request.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:text_generation.*")

def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]


def greedy(tgi: text_generation.Client, prompt: str, n: int) -> text_generation.types.Response:
    return tgi.generate(prompt, max_new_tokens=n)


# ----------------------------------------------------------------------------------------- the TGI client
def test_tgi_client_generate_with_details(tgi: text_generation.Client) -> None:
    prompt = GPT2_PROMPTS[0]
    r = tgi.generate(prompt, max_new_tokens=12, decoder_input_details=True)
    d = r.details
    assert d.finish_reason in (FinishReason.Length, FinishReason.EndOfSequenceToken)
    assert d.generated_tokens == len(d.tokens) and 1 <= d.generated_tokens <= 12
    assert d.seed is None   # greedy: no seed, as TGI
    assert "".join(t.text for t in d.tokens if not t.special) == r.generated_text
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens)
    assert d.prefill and "".join(t.text for t in d.prefill) == prompt
    assert d.prefill[0].logprob is None and all(t.logprob is not None and t.logprob <= 0 for t in d.prefill[1:])

    sampled = tgi.generate(prompt, max_new_tokens=12, do_sample=True, seed=7)
    assert sampled.details.seed == 7
    full = tgi.generate(prompt, max_new_tokens=12, return_full_text=True)
    assert full.generated_text == prompt + r.generated_text


def test_tgi_stream_adds_up_to_the_final_text(tgi: text_generation.Client, gpt2_url: str) -> None:
    prompt = GPT2_PROMPTS[2]
    whole = greedy(tgi, prompt, 24)
    events = list(tgi.generate_stream(prompt, max_new_tokens=24))
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == whole.generated_text == "".join(e.token.text for e in events if not e.token.special)
    assert last.details.finish_reason == whole.details.finish_reason
    assert last.details.generated_tokens == len(events)

    full = list(tgi.generate_stream(prompt, max_new_tokens=24, return_full_text=True))
    assert full[-1].generated_text == prompt + whole.generated_text
    # the raw wire: one event per token, the TGI shape, and no [DONE] line
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24}}
    with httpx.Client(timeout=60) as client, client.stream("POST", gpt2_url + "/generate_stream", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-model-version"]   # a stream names its version too, in its headers
        raw = sse_events(resp)
    assert "[DONE]" not in raw and len(raw) == len(events)
    decoded = [json.loads(e) for e in raw]
    assert [e["index"] for e in decoded] == list(range(len(events)))
    assert set(decoded[-1]["details"]) == {"finish_reason", "generated_tokens", "seed"}


def test_stop_sequences(tgi: text_generation.Client, oai: openai.OpenAI) -> None:
    prompt = GPT2_PROMPTS[1]
    full = greedy(tgi, prompt, 40).generated_text
    stop = full[12:15]
    cut = full[: full.index(stop) + len(stop)]
    r = tgi.generate(prompt, max_new_tokens=40, stop_sequences=[stop, "never appears"])
    assert r.details.finish_reason == FinishReason.StopSequence
    assert r.generated_text == cut   # TGI keeps the stop sequence
    streamed = list(tgi.generate_stream(prompt, max_new_tokens=40, stop_sequences=[stop]))
    assert "".join(e.token.text for e in streamed) == streamed[-1].generated_text == cut

    c = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=40, temperature=0, stop=stop)
    assert c.choices[0].finish_reason == "stop"
    assert c.choices[0].text in (cut, cut[: -len(stop)])   # OpenAI drops it; either is a clean cut


def test_greedy_is_deterministic_and_seeds_pick_the_sample(tgi: text_generation.Client) -> None:
    prompt = GPT2_PROMPTS[6]
    assert greedy(tgi, prompt, 20).generated_text == greedy(tgi, prompt, 20).generated_text

    def sample(seed: int) -> str:
        return tgi.generate(prompt, max_new_tokens=20, do_sample=True, top_k=50, seed=seed).generated_text

    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in (11, 12, 13)}) > 1


async def test_sixteen_concurrent_requests_match_their_solo_runs(tgi: text_generation.Client, gpt2_url: str) -> None:
    lengths = [4 + (7 * i) % 29 for i in range(len(GPT2_PROMPTS))]
    solo = [greedy(tgi, p, n) for p, n in zip(GPT2_PROMPTS, lengths, strict=True)]
    client = text_generation.AsyncClient(gpt2_url, timeout=60)
    together = await asyncio.gather(*[client.generate(p, max_new_tokens=n) for p, n in zip(GPT2_PROMPTS, lengths,
                                                                                           strict=True)])
    for i, (alone, batched) in enumerate(zip(solo, together, strict=True)):
        assert [t.id for t in batched.details.tokens] == [t.id for t in alone.details.tokens], GPT2_PROMPTS[i]
        assert batched.generated_text == alone.generated_text


async def test_short_request_behind_long_ones_finishes_first(tgi: text_generation.Client, gpt2_url: str) -> None:
    n_long = 200
    longs = [p for p in GPT2_PROMPTS[:8] if greedy(tgi, p, n_long).details.finish_reason == FinishReason.Length][:4]
    assert len(longs) == 4
    client = text_generation.AsyncClient(gpt2_url, timeout=60)
    finished: list[tuple[str, int]] = []
    started = [asyncio.Event() for _ in longs]

    async def run(name: str, prompt: str, n: int, first: asyncio.Event | None = None) -> None:
        async for event in client.generate_stream(prompt, max_new_tokens=n):
            if first is not None:
                first.set()
            if event.details is not None:
                finished.append((name, event.details.generated_tokens))

    tasks = [asyncio.create_task(run(f"long{i}", p, n_long, started[i])) for i, p in enumerate(longs)]
    await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 30)   # all four are generating
    await run("short", GPT2_PROMPTS[5], 3)
    await asyncio.gather(*tasks)
    assert finished[0][0] == "short"
    assert sorted(finished[1:]) == [(f"long{i}", n_long) for i in range(4)]


def test_client_gone_mid_stream_frees_its_slot(served_gpt2: Cluster, gpt2_url: str) -> None:
    """The worker drops a sequence whose client left: the first heartbeat after the client's exit shows `active` 0,
    and the sequence stopped after a handful of its 250 tokens. (The heartbeat publishes once a second and a whole
    250-token stream of the quick model takes a fraction of that, so the token count is what shows it stopped early:
    left running, it would have added 250 to the worker's item counter.)"""
    def beat_after(since_ms: int, active: str) -> dict[str, str]:
        def check() -> dict[str, str] | None:
            (w,) = live_workers(served_gpt2.client, "gpt2")
            return w if int(w["beat"]) > since_ms and w["active"] == active else None

        return wait_for(check, 10, f"a heartbeat with active={active}")

    items_before = int(beat_after(int(time.time() * 1000), "0")["items"])
    body = {"inputs": GPT2_PROMPTS[3], "parameters": {"max_new_tokens": CONTEXT - 6}}
    with httpx.Client(timeout=60) as client, client.stream("POST", gpt2_url + "/generate_stream", json=body) as resp:
        assert resp.status_code == 200
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break   # leaving both blocks closes the connection mid-stream
    closed_ms = int(time.time() * 1000)
    after = beat_after(closed_ms, "0")
    assert int(after["beat"]) - closed_ms < 2500   # the first or second beat after the close already shows it
    generated = int(after["items"]) - items_before
    # Stopped early, not at 250: how early depends on how fast a step is against the cancel's trip through the
    # gateway and Redis (11-17 tokens measured here, unloaded).
    assert 3 <= generated < 125, generated


def test_overloaded_queue_raises_overloaded_error(served_gpt2: Cluster, quick_gpt2: Path, tmp_path: Path) -> None:
    """A second gateway on the same Redis and worker, with room for one queued request."""
    small = Cluster(served_gpt2.redis_url, tmp_path)
    small.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=16, queue_cap=1, timeout_s=60)
    try:
        client = text_generation.AsyncClient(small.start_gateway(), timeout=60)

        async def burst() -> list[Any]:
            return await asyncio.gather(*[client.generate(GPT2_PROMPTS[0], max_new_tokens=150) for _ in range(4)],
                                        return_exceptions=True)

        results = asyncio.run(burst())
    finally:
        small.close()
    assert any(isinstance(r, OverloadedError) for r in results), results
    assert any(isinstance(r, text_generation.types.Response) for r in results), results
    assert all(isinstance(r, (OverloadedError, text_generation.types.Response)) for r in results), results


def test_tgi_client_raises_validation_error(tgi: text_generation.Client) -> None:
    with pytest.raises(ValidationError, match="inputs"):
        tgi.generate("word " * 400)   # longer than the context: rejected by the worker
    with pytest.raises(ValidationError, match="max_new_tokens"):
        tgi.generate("x", max_new_tokens=CONTEXT + 10)
    with pytest.raises(ValidationError, match="watermark"):
        tgi.generate("x", watermark=True)
    with pytest.raises(ValidationError, match="best_of"):
        tgi.generate("x", best_of=2, do_sample=True)
    with pytest.raises(ValidationError, match="inputs"):
        next(iter(tgi.generate_stream("word " * 400)))


# --------------------------------------------------------------------------------------- the OpenAI client
def test_openai_completions(oai: openai.OpenAI, tgi: text_generation.Client) -> None:
    a, b = GPT2_PROMPTS[7], GPT2_PROMPTS[9]
    one = oai.completions.create(model="gpt2", prompt=a, max_tokens=10, temperature=0)
    assert one.object == "text_completion" and one.model == "gpt2"
    (choice,) = one.choices
    tgi_a = tgi.generate(a, max_new_tokens=10, decoder_input_details=True)
    assert choice.text == tgi_a.generated_text and choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason == ("length" if tgi_a.details.finish_reason == FinishReason.Length else "stop")
    assert one.usage is not None
    assert one.usage.prompt_tokens == len(tgi_a.details.prefill)
    assert one.usage.completion_tokens == tgi_a.details.generated_tokens
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens

    two = oai.completions.create(model="gpt2", prompt=[a, b], max_tokens=10, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    tgi_b = tgi.generate(b, max_new_tokens=10, decoder_input_details=True)
    assert [c.text for c in two.choices] == [tgi_a.generated_text, tgi_b.generated_text]
    assert two.usage is not None
    assert two.usage.prompt_tokens == len(tgi_a.details.prefill) + len(tgi_b.details.prefill)
    assert two.usage.completion_tokens == tgi_a.details.generated_tokens + tgi_b.details.generated_tokens

    # sampling: the same seed is the same text, and the same draw as TGI's with the same parameters
    def nucleus(seed: int) -> str:
        return oai.completions.create(model="gpt2", prompt=a, max_tokens=16, top_p=0.9, seed=seed).choices[0].text

    assert nucleus(5) == nucleus(5) == tgi.generate(a, max_new_tokens=16, do_sample=True, top_p=0.9,
                                                    seed=5).generated_text
    assert len({nucleus(seed) for seed in (5, 6, 7)}) > 1


def test_openai_stream_with_usage_adds_up(oai: openai.OpenAI, gpt2_url: str) -> None:
    prompts = [GPT2_PROMPTS[10], GPT2_PROMPTS[12]]
    whole = oai.completions.create(model="gpt2", prompt=prompts, max_tokens=12, temperature=0)
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    usage = None
    with oai.completions.create(model="gpt2", prompt=prompts, max_tokens=12, temperature=0, stream=True,
                                stream_options={"include_usage": True}) as stream:
        for chunk in stream:   # ends by itself at [DONE]
            for c in chunk.choices:
                texts[c.index] += c.text
                finish[c.index] = c.finish_reason or finish[c.index]
            usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage is not None and whole.usage is not None and usage.model_dump() == whole.usage.model_dump()
    body = {"model": "gpt2", "prompt": prompts[0], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", gpt2_url + "/v1/completions", json=body) as resp:
        version = resp.headers.get("x-model-version")
        raw = sse_events(resp)
    assert raw[-1] == "[DONE]" and len(raw) == 5 and version


def test_openai_stream_leaves_out_special_tokens(tgi: text_generation.Client, oai: openai.OpenAI) -> None:
    """A sample that ends on the EOS token: the streamed pieces still add up to the text (no `<|endoftext|>`)."""
    prompt = GPT2_PROMPTS[3]
    seed = next((s for s in range(60) if tgi.generate(prompt, max_new_tokens=40, do_sample=True, seed=s)
                 .details.finish_reason == FinishReason.EndOfSequenceToken), None)
    assert seed is not None, "the quick model never sampled EOS"
    whole = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=40, seed=seed)
    assert whole.choices[0].finish_reason == "stop"
    with oai.completions.create(model="gpt2", prompt=prompt, max_tokens=40, seed=seed, stream=True) as stream:
        streamed = "".join(c.text for chunk in stream for c in chunk.choices)
    assert streamed == whole.choices[0].text


def test_openai_client_errors(oai: openai.OpenAI) -> None:
    def check(err: openai.APIStatusError, param: str, code: str) -> None:
        body = err.response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] == param and body["error"]["code"] == code and body["error"]["message"]

    with pytest.raises(openai.UnprocessableEntityError) as e422:
        oai.completions.create(model="gpt2", prompt="x", n=9)
    check(e422.value, "n", "validation")
    assert e422.value.body["type"] == "invalid_request_error"   # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as e404:
        oai.completions.create(model="gpt-4", prompt="x")
    check(e404.value, "model", "not_found")
    with pytest.raises(openai.BadRequestError) as e400:   # not JSON at all: 400, still the OpenAI shape
        oai.post("/completions", content=b'{"model": "gpt2", "prompt": ', cast_to=openai.types.Completion)
    check(e400.value, "body", "validation")
    with pytest.raises(openai.UnprocessableEntityError) as worker_side:
        oai.completions.create(model="gpt2", prompt="x", max_tokens=CONTEXT + 10, stream=True)
    check(worker_side.value, "max_tokens", "validation")


# ------------------------------------------------------------------------------------------------ validation
TGI_INVALID = [
    ({"inputs": ""}, "inputs"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": -3}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 5000}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": CONTEXT}}, "max_new_tokens"),        # checked by the worker
    ({"inputs": "word " * 400, "parameters": {"max_new_tokens": 1}}, "inputs"),           # checked by the worker
    ({"inputs": "x", "parameters": {"temperature": -0.5}}, "parameters.temperature"),
    ({"inputs": "x", "parameters": {"temperature": 0}}, "parameters.temperature"),
    ({"inputs": "x", "parameters": {"top_p": 0}}, "parameters.top_p"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "parameters.stop"),
    ({"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of"),
    ({"inputs": "x", "parameters": {"watermark": True}}, "parameters.watermark"),
]


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_tgi_validation_names_the_field(gpt2_url: str, route: str) -> None:
    with httpx.Client(timeout=60) as client:
        for body, field in TGI_INVALID:
            r = client.post(gpt2_url + route, json=body)
            assert r.status_code == 422, (body, r.text)
            err = r.json()
            assert err["error_type"] == "validation" and err["field"].endswith(field), (body, err)
            assert field.rsplit(".", 1)[-1] in err["error"], (body, err)
            assert err["request_id"] == r.headers["x-request-id"]


OPENAI_INVALID = [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": ["x", ""]}, 422, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": CONTEXT}, 422, "max_tokens"),      # checked by the worker
    ({"prompt": "word " * 400}, 422, "prompt"),                       # checked by the worker
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"prompt": "x", "n": 9}, 422, "n"),
    ({"prompt": ["x"] * 16, "n": 5}, 422, "n"),                       # 80 sequences: more than one request may start
    ({"prompt": "x", "n": 3, "best_of": 2}, 422, "best_of"),
    ({"prompt": "x", "suffix": "y"}, 422, "suffix"),
    ({"prompt": [1, -2]}, 422, "prompt"),
    ({"prompt": [10**9]}, 422, "prompt"),                             # outside the vocabulary: checked by the worker
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_validation_names_the_param(gpt2_url: str, stream: bool) -> None:
    with httpx.Client(timeout=60) as client:
        for body, status, param in OPENAI_INVALID:
            r = client.post(gpt2_url + "/v1/completions", json={"model": "gpt2", "stream": stream, **body})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
            assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


# ----------------------------------------------------------------------------------- Open Inference Protocol
def test_v2_infer_answers_text_output(gpt2_url: str, tgi: text_generation.Client) -> None:
    body = {"id": "q-1", "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                     "data": [GPT2_PROMPTS[4]]}], "parameters": {"max_new_tokens": 8}}
    with httpx.Client(timeout=60) as client:
        r = client.post(gpt2_url + "/v2/models/gpt2/infer", json=body)
        meta = client.get(gpt2_url + "/v2/models/gpt2").json()
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "gpt2" and out["id"] == "q-1" and out["model_version"] == meta["versions"][0]
    (output,) = out["outputs"]
    assert output["name"] == "text_output" and output["datatype"] == "BYTES" and output["shape"] == [1]
    assert output["data"] == [greedy(tgi, GPT2_PROMPTS[4], 8).generated_text]
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]


def test_v2_text_input_must_be_bytes_and_integers_must_fit(gpt2_url: str) -> None:
    """Numbers are not a prompt: an FP32 `text_input` was stringified and generated from; now a 400 naming it. A
    2**64 top_k or token id crashed the payload encoder (a text/plain 500); now a 422 naming the field."""
    with httpx.Client(base_url=gpt2_url, timeout=60) as client:
        numbers = client.post("/v2/models/gpt2/infer", json={"inputs": [
            {"name": "text_input", "shape": [1], "datatype": "FP32", "data": [1.5]}]})
        top_k = client.post("/generate", json={"inputs": "The value", "parameters": {"top_k": 2**64}})
        token = client.post("/v1/completions", json={"model": "gpt2", "prompt": [1, 2**64], "max_tokens": 2})
    assert numbers.status_code == 400 and "text_input" in numbers.json()["error"], numbers.text
    assert "BYTES" in numbers.json()["error"], numbers.text
    assert top_k.status_code == 422 and top_k.json()["field"] == "parameters.top_k", top_k.text
    assert token.status_code == 422 and token.json()["error"]["param"] == "prompt", token.text


async def test_a_poison_sampling_request_fails_alone_and_its_batch_mates_finish(gpt2_url: str) -> None:
    """temperature 1e-300 (and 1e-45) with sampling once made every running sequence fail with inf/nan; now the
    edge refuses it with a 422 naming the field, and the 8 requests beside it all get their full answer."""
    normal = {"inputs": "The function returns", "parameters": {"max_new_tokens": 16, "do_sample": True, "seed": 3}}
    async with httpx.AsyncClient(base_url=gpt2_url, timeout=60) as client:
        poisons = [{"inputs": "The value", "parameters": {"max_new_tokens": 16, "do_sample": True, "temperature": t}}
                   for t in (1e-300, 1e-45)]
        openai_poison = {"model": "gpt2", "prompt": "The value", "max_tokens": 16, "temperature": 1e-45}
        answers = await asyncio.gather(*[client.post("/generate", json=normal) for _ in range(8)],
                                       *[client.post("/generate", json=p) for p in poisons],
                                       client.post("/v1/completions", json=openai_poison))
    assert [r.status_code for r in answers[:8]] == [200] * 8
    assert len({r.json()["generated_text"] for r in answers[:8]}) == 1   # same seed, same text, batched or not
    for refused in answers[8:10]:
        assert refused.status_code == 422 and refused.json()["field"] == "parameters.temperature", refused.text
    assert answers[10].status_code == 422 and answers[10].json()["error"]["param"] == "temperature"
