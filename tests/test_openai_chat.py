"""Generation a user of OpenAI or TGI can switch to unchanged (issue 13): /v1/chat/completions, /v1/completions with
OpenAI semantics (n, best_of, echo, logprobs, token-id prompts), and TGI's top_n_tokens, decoder_input_details,
/info, /tokenize and /health, driven by the unmodified `openai` and `text-generation` clients against a real gateway
and generation worker serving the quick gpt2. Log-probabilities are checked against the same model run in-process.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import text_generation
import torch

from inferline.server.model import render_chat
from inferline.zoo.gpt2.serve import load
from tests.conftest import GPT2_CONTEXT as CONTEXT
from tests.conftest import GPT2_PROMPTS, Cluster

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:text_generation.*")

MESSAGES = [{"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "What does the function return?"}]


@pytest.fixture(scope="module")
def reference(quick_gpt2: Path) -> tuple[Any, Any]:
    """The served model, loaded in-process exactly as the worker loads it."""
    return load(quick_gpt2 / "gpt2")


def greedy_reference(reference: tuple[Any, Any], ids: list[int], n: int, k: int = 0) -> list[dict[str, Any]]:
    """n greedy steps of the plain model (no engine): per step the chosen token, its log-softmax value, its text, and
    the k best (id, logprob) pairs."""
    model, tokenizer = reference
    out = []
    ids = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(logprobs.argmax())
            top = torch.topk(logprobs, k) if k else None
            out.append({"id": token, "logprob": float(logprobs[token]),
                        "text": tokenizer.decode([token], clean_up_tokenization_spaces=False),
                        "top": list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []})
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
    return out


def chat_ids(reference: tuple[Any, Any], messages: list[dict[str, str]]) -> list[int]:
    tokenizer = reference[1]
    return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])


def token_ids(url: str, text: str) -> list[int]:
    r = httpx.post(url + "/tokenize", json={"inputs": text}, timeout=60)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()]


# ------------------------------------------------------------------------------------------------------- chat
def test_chat_plain_and_streamed_add_up(oai: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    whole = oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_tokens=16, temperature=0, user="u-1")
    assert whole.object == "chat.completion" and whole.model == "gpt2" and whole.id.startswith("chatcmpl-")
    (choice,) = whole.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(chat_ids(reference, MESSAGES))   # rendered with the default template
    assert 1 <= whole.usage.completion_tokens <= 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    pieces, roles, finish, usage, chunks = [], [], None, None, 0
    with oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_completion_tokens=16, temperature=0,
                                     stream=True, stream_options={"include_usage": True}) as stream:
        for chunk in stream:   # ends by itself at [DONE]
            chunks += 1
            assert chunk.object == "chat.completion.chunk"
            for c in chunk.choices:
                roles += [c.delta.role] if c.delta.role else []
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
    assert roles == ["assistant"] and "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()
    assert chunks == 1 + whole.usage.completion_tokens + 1   # the role, one per token, the usage


def test_chat_n_choices_differ_and_reproduce(oai: openai.OpenAI) -> None:
    def ask(n: int) -> list[str]:
        r = oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_tokens=12, n=n, seed=21,
                                        temperature=1.0)
        assert [c.index for c in r.choices] == list(range(n))
        assert r.usage is not None and r.usage.completion_tokens >= n
        return [c.message.content or "" for c in r.choices]

    three = ask(3)
    assert len(three) == 3 and len(set(three)) > 1   # each choice its own seed
    assert ask(3) == three                           # ... derived from the request's: reproducible
    assert ask(1) == three[:1]                       # choice 0 keeps the request's seed

    seen: dict[int, str] = {}
    with oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_tokens=12, n=3, seed=21, temperature=1.0,
                                     stream=True) as stream:
        for chunk in stream:
            for c in chunk.choices:
                seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
    assert [seen[i] for i in range(3)] == three


def test_chat_logprobs_match_the_models_log_softmax(oai: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    r = oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=3)
    (choice,) = r.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None and r.usage is not None
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens   # one entry per generated token
    expected = greedy_reference(reference, chat_ids(reference, MESSAGES), 8, k=3)
    assert len(entries) == len(expected)
    for got, want in zip(entries, expected, strict=True):
        assert got.token == want["text"] and got.bytes == list(want["text"].encode())
        assert got.logprob == pytest.approx(want["logprob"], abs=1e-3)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in want["top"]], abs=1e-3)
        assert got.top_logprobs[0].token == want["text"]   # greedy: the chosen token is the best one

    # sampled and penalised: still the model's own distribution (not the warped one), so log-probabilities <= 0 and
    # the streamed entries are the same as the whole answer's
    kw: dict[str, Any] = {"model": "gpt2", "messages": MESSAGES, "max_tokens": 10, "temperature": 0.7, "seed": 4,
                          "presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": True, "top_logprobs": 2}
    whole = oai.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content   # type: ignore[union-attr]
    assert content is not None and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
    streamed = [e for chunk in oai.chat.completions.create(**kw, stream=True) for c in chunk.choices
                if c.logprobs is not None and c.logprobs.content for e in c.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_chat_stop_is_left_out(oai: openai.OpenAI) -> None:
    def ask(stream: bool = False, **kw: Any) -> tuple[str, str | None]:
        args: dict[str, Any] = {"model": "gpt2", "messages": MESSAGES, "max_tokens": 30, "temperature": 0, **kw}
        if not stream:
            c = oai.chat.completions.create(**args).choices[0]
            return c.message.content or "", c.finish_reason
        text, finish = "", None
        for chunk in oai.chat.completions.create(**args, stream=True):
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish

    full, _ = ask()
    stop = full[8:11]
    assert len(stop) == 3 and stop.strip()
    cut = full[: full.index(stop)]
    assert ask(stop=[stop, "never there"]) == (cut, "stop")
    assert ask(stream=True, stop=stop) == (cut, "stop")


def test_chat_penalties_change_a_repetitive_answer(oai: openai.OpenAI) -> None:
    def ask(**kw: Any) -> str:
        return oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_tokens=40, temperature=0,
                                           **kw).choices[0].message.content or ""

    plain = ask()
    assert len(plain.split()) > len(set(plain.split()))   # the greedy answer repeats words
    assert ask(frequency_penalty=2.0) != plain
    assert ask(presence_penalty=2.0) != plain


CHAT_INVALID: list[tuple[dict[str, Any], int, str]] = [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role"),
    ({"n": 9}, 422, "n"),
    ({"top_logprobs": 2}, 422, "top_logprobs"),                          # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    ({"temperature": 3}, 422, "temperature"),
    ({"presence_penalty": 2.5}, 422, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools"),
    ({"max_completion_tokens": CONTEXT + 10}, 422, "max_completion_tokens"),   # checked by the worker
    ({"max_tokens": CONTEXT}, 422, "max_tokens"),                              # checked by the worker
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 422, "messages"),   # longer than the context
    ({"model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_errors_name_the_param(gpt2_url: str, stream: bool) -> None:
    with httpx.Client(timeout=60) as client:
        for body, status, param in CHAT_INVALID:
            r = client.post(gpt2_url + "/v1/chat/completions",
                            json={"model": "gpt2", "messages": MESSAGES, "stream": stream, **body})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)


# -------------------------------------------------------------------------------------------------- completions
def test_completions_token_id_prompts_equal_text_prompts(oai: openai.OpenAI, gpt2_url: str) -> None:
    a, b = GPT2_PROMPTS[0], GPT2_PROMPTS[4]
    ids_a, ids_b = token_ids(gpt2_url, a), token_ids(gpt2_url, b)

    def texts(prompt: Any) -> tuple[list[str], Any]:
        r = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=10, temperature=0)
        return [c.text for c in r.choices], r.usage.model_dump() if r.usage else None

    assert texts(ids_a) == texts(a)
    assert texts([ids_a, ids_b]) == texts([a, b])


def test_completions_echo(oai: openai.OpenAI, gpt2_url: str) -> None:
    prompt = GPT2_PROMPTS[2]
    plain = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=8, temperature=0)
    text = plain.choices[0].text
    echoed = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + text
    by_ids = oai.completions.create(model="gpt2", prompt=token_ids(gpt2_url, prompt), max_tokens=8, temperature=0,
                                    echo=True)
    assert by_ids.choices[0].text == prompt + text
    streamed = "".join(c.text for chunk in oai.completions.create(model="gpt2", prompt=prompt, max_tokens=8,
                                                                  temperature=0, echo=True, stream=True)
                       for c in chunk.choices)
    assert streamed == prompt + text

    # with logprobs: the prompt's tokens first (the first has no logprob), then the completion's
    lp = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=8, temperature=0, echo=True,
                                logprobs=1).choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.text_offset is not None
    assert plain.usage is not None
    assert len(lp.tokens) == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert "".join(lp.tokens[: plain.usage.prompt_tokens]) == prompt
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_completions_logprobs_match_the_model(oai: openai.OpenAI, gpt2_url: str,
                                              reference: tuple[Any, Any]) -> None:
    prompt = GPT2_PROMPTS[5]
    r = oai.completions.create(model="gpt2", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    expected = greedy_reference(reference, token_ids(gpt2_url, prompt), 6, k=3)
    assert lp.tokens == [e["text"] for e in expected]
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in expected], abs=1e-3)
    for top, e in zip(lp.top_logprobs, expected, strict=True):
        assert len(top) == 3 and top[e["text"]] == pytest.approx(e["logprob"], abs=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_completions_n_and_best_of(oai: openai.OpenAI) -> None:
    prompts = [GPT2_PROMPTS[6], GPT2_PROMPTS[9]]
    kw: dict[str, Any] = {"model": "gpt2", "max_tokens": 10, "temperature": 1.0, "seed": 8}
    many = oai.completions.create(prompt=prompts, n=3, logprobs=0, **kw)
    assert [c.index for c in many.choices] == list(range(6))   # prompt-major, as OpenAI orders them
    assert len({c.text for c in many.choices[:3]}) > 1
    assert many.usage is not None and many.usage.prompt_tokens == sum(
        oai.completions.create(prompt=p, max_tokens=1, model="gpt2").usage.prompt_tokens  # type: ignore[union-attr]
        for p in prompts)   # each prompt counted once, not once per choice

    def mean(c: Any) -> float:
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    # best_of=3 draws the same three sequences (same derived seeds) and returns the one with the best mean logprob
    best = oai.completions.create(prompt=prompts, best_of=3, **kw)
    assert [c.text for c in best.choices] == [max(many.choices[3 * p:3 * p + 3], key=mean).text for p in range(2)]
    assert [c.index for c in best.choices] == [0, 1]


def test_completions_suffix_is_refused(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.completions.create(model="gpt2", prompt="def f(", suffix="return x")
    body = err.value.response.json()["error"]
    assert body["param"] == "suffix" and "suffix" in body["message"]


async def test_penalties_and_logprobs_batched_equal_solo(gpt2_url: str) -> None:
    """8 seeded requests with penalties and log-probabilities, concurrently and one by one: the same answers."""
    def body(i: int) -> dict[str, Any]:
        return {"model": "gpt2", "prompt": GPT2_PROMPTS[i], "max_tokens": 12 + i, "temperature": 0.8, "seed": 100 + i,
                "presence_penalty": 0.4 * (i % 3), "frequency_penalty": 0.3 * (i % 4), "logprobs": 2}

    async with httpx.AsyncClient(base_url=gpt2_url, timeout=60) as client:
        solo = [(await client.post("/v1/completions", json=body(i))).json() for i in range(8)]
        together = [r.json() for r in await asyncio.gather(*[client.post("/v1/completions", json=body(i))
                                                             for i in range(8)])]
    for alone, batched in zip(solo, together, strict=True):
        a, b = alone["choices"][0], batched["choices"][0]
        assert b["text"] == a["text"] and b["logprobs"]["tokens"] == a["logprobs"]["tokens"]
        assert b["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-3)


# ---------------------------------------------------------------------------------------------------------- TGI
def test_tgi_top_n_tokens_and_prefill_logprobs(tgi: text_generation.Client, gpt2_url: str,
                                                reference: tuple[Any, Any]) -> None:
    prompt = GPT2_PROMPTS[1]
    r = tgi.generate(prompt, max_new_tokens=6, top_n_tokens=3, decoder_input_details=True)
    d = r.details
    assert d.top_tokens is not None and len(d.top_tokens) == d.generated_tokens == len(d.tokens)
    expected = greedy_reference(reference, token_ids(gpt2_url, prompt), 6, k=3)
    for token, top, e in zip(d.tokens, d.top_tokens, expected, strict=True):
        assert token.id == e["id"] and token.logprob == pytest.approx(e["logprob"], abs=1e-3)
        assert [t.id for t in top] == [i for i, _ in e["top"]]
        assert [t.logprob for t in top] == pytest.approx([lp for _, lp in e["top"]], abs=1e-3)
        assert all(isinstance(t.special, bool) for t in top)
    # prefill: each prompt token with the model's logprob of it given the tokens before (none for the first)
    model, _ = reference
    ids = [t.id for t in d.prefill]
    assert ids == token_ids(gpt2_url, prompt) and d.prefill[0].logprob is None
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids))]
    assert [t.logprob for t in d.prefill[1:]] == pytest.approx(want, abs=1e-3)

    events = list(tgi.generate_stream(prompt, max_new_tokens=6, top_n_tokens=3))
    assert [[t.id for t in e.top_tokens or []] for e in events] == [[t.id for t in top] for top in d.top_tokens]

    # top_k=2 leaves the rest of the top 5 at -inf, which JSON cannot carry: null, and the client still parses it
    sampled = tgi.generate(prompt, max_new_tokens=4, do_sample=True, top_k=2, seed=1, top_n_tokens=5)
    for top in sampled.details.top_tokens or []:
        assert [t.logprob is None for t in top] == [False, False, True, True, True]


def test_tgi_info_tokenize_and_health(gpt2_url: str, reference: tuple[Any, Any]) -> None:
    with httpx.Client(base_url=gpt2_url, timeout=60) as client:
        info = client.get("/info")
        assert info.status_code == 200, info.text
        body = info.json()
        assert body["model_id"] == "gpt2" and body["model_pipeline_tag"] == "text-generation"
        assert body["max_total_tokens"] == CONTEXT and body["max_input_tokens"] == CONTEXT - 1
        assert body["max_batch_size"] == 16 and body["max_stop_sequences"] == 4 and body["max_best_of"] == 1
        assert body["max_concurrent_requests"] >= 1 and body["model_device_type"] == "cpu"
        assert body["model_sha"] == body["model_version"] == client.get("/v2/models/gpt2").json()["versions"][0]
        assert isinstance(body["version"], str) and body["max_batch_prefill_tokens"] >= 1

        text = "The function returns a list of 3 values."
        spans = client.post("/tokenize", json={"inputs": text}).json()
        assert [s["id"] for s in spans] == reference[1](text)["input_ids"]
        assert all(text[s["start"]:s["stop"]] == s["text"] for s in spans)
        assert "".join(s["text"] for s in spans) == text
        bad = client.post("/tokenize", json={"inputs": ""})
        assert bad.status_code == 422 and bad.json()["field"] == "inputs"

        assert client.get("/health").status_code == 200


def test_health_and_info_without_a_live_worker(redis_url: str, tmp_path: Path) -> None:
    """A generate deployment that no worker serves: /health and /info answer 503, naming the model."""
    lonely = Cluster(redis_url, tmp_path)
    lonely.spec("nobody", model="inferline.zoo.gpt2.serve:Gpt2", task="generate")
    try:
        base = lonely.start_gateway()
        for path in ("/health", "/info"):
            r = httpx.get(base + path, timeout=30)
            assert r.status_code == 503 and "nobody" in r.json()["error"], r.text
    finally:
        lonely.close()


def test_json_stays_valid(oai: openai.OpenAI) -> None:
    """No NaN or Infinity token ever reaches a client: every number in a logprobs answer is finite."""
    r = oai.chat.completions.create(model="gpt2", messages=MESSAGES, max_tokens=6, temperature=1.5, seed=2,
                                    logprobs=True, top_logprobs=20)
    content = r.choices[0].logprobs.content   # type: ignore[union-attr]
    assert content and all(math.isfinite(e.logprob) and all(math.isfinite(t.logprob) for t in e.top_logprobs)
                           for e in content)
