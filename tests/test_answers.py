"""Every answer the gateway builds itself is its route's wire model (server/schemas/responses.py), one spelling per
answer: each route documents a response model, and each answer-building helper of the routes, fed sample inputs,
gives exactly the JSON the contract (API.md) shows, which its model validates with no undeclared field (extra
"forbid"). A route that sends a field its model does not declare fails here (routes/common.build refuses it).
Pure functions and real route code on sample token events: no Redis, no worker."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from inferline.server.broker.registry import ModelStatus, Serving
from inferline.server.config import ModelSpec
from inferline.server.errors import Overloaded
from inferline.server.gateway import table
from inferline.server.gateway.generation import Generation
from inferline.server.gateway.routes import chat, generate, health, kserve, models, openai
from inferline.server.gateway.routes.common import build, encode
from inferline.server.gateway.routes.openai_shapes import error_chunk
from inferline.server.protocol import ModelInfo, TokenEvent, WorkerStatus
from inferline.server.schemas import admin as admin_wire
from inferline.server.schemas import responses as wire
from inferline.server.schemas.openai import ChatCompletionRequest, CompletionRequest
from inferline.server.schemas.tgi import GenerateRequest

# Routes whose 200 body is not one of the gateway's JSON models: text, an empty body, or each model's own type.
NOT_A_WIRE_MODEL = {("GET", "/metrics"), ("GET", "/health"), ("POST", "/generate_stream"),
                    ("POST", "/v1/models/{model}/predict"), ("POST", "/v2/repository/models/{model}/load"),
                    ("POST", "/v2/repository/models/{model}/unload")}
WIRE_MODULES = {wire.__name__, admin_wire.__name__}   # the answers, and the management API's (schemas/admin.py)
PREFILL = [{"id": 464, "text": "The", "logprob": None}]
TOP = [{"id": 318, "text": " is", "logprob": -1.25, "special": False},
       {"id": 257, "text": " a", "logprob": -2.5, "special": False}]


def event(index: int, token_id: int, text: str, logprob: float = -1.25, *, special: bool = False,
          finish: str | None = None, whole: str | None = None, top: list[dict[str, Any]] | None = None,
          prefill: list[dict[str, Any]] | None = None) -> TokenEvent:
    return TokenEvent(request_id="r1", index=index, token_id=token_id, text=text, logprob=logprob, special=special,
                      finish_reason=finish, generated_text=whole, prompt_tokens=1, seed=7, prefill=prefill,
                      top_logprobs=top, token_text=text)


def generation(*events: TokenEvent) -> Generation:
    last = events[-1]
    return Generation(events=list(events), text=last.generated_text or "", finish_reason=last.finish_reason or "",
                      seed=7, prompt_tokens=1, prefill=events[0].prefill or [])


TWO = (event(0, 318, " is", top=TOP, prefill=PREFILL), event(1, 50256, "", -math.inf, special=True,
                                                               finish="eos_token", whole=" is", top=TOP))


def sent(answer: BaseModel, model: type[BaseModel]) -> Any:
    """The JSON an answer goes out as, checked to be a `model` with no field it does not declare."""
    assert type(answer) is model
    raw = encode(answer)
    model.model_validate_json(raw, extra="forbid")
    return orjson.loads(raw)


async def events_of(response: StreamingResponse) -> list[Any]:
    out = []
    async for line in response.body_iterator:
        assert isinstance(line, bytes) and line.startswith(b"data: ") and line.endswith(b"\n\n"), line
        out.append(line[6:-2] if line == b"data: [DONE]\n\n" else orjson.loads(line[6:]))
    return out


async def stream(*events: TokenEvent) -> AsyncIterator[TokenEvent]:
    for e in events:
        yield e


def test_every_json_route_names_its_response_model() -> None:
    for route in table.ROUTES:
        ok = route.docs["responses"][200]
        if (route.method, route.path) in NOT_A_WIRE_MODEL:
            assert "model" not in ok, route.path
            continue
        model = ok["model"]
        models_ = getattr(model, "__args__", (model,))   # list[M] or M1 | M2
        assert models_ and all(issubclass(m, BaseModel) and m.__module__ in WIRE_MODULES for m in models_), \
            route.path


def test_a_field_the_model_does_not_declare_is_refused() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        build(wire.V2Live, {"live": True, "bogus": 1})
    token = {"id": 1, "text": "a", "logprob": -1.0, "special": False}
    with pytest.raises(ValidationError, match="token.bogus"):
        build(wire.StreamEvent, {"index": 0, "token": {**token, "bogus": 1}, "generated_text": None})
    # a field left out is not sent
    assert orjson.loads(encode(build(wire.StreamEvent, {"index": 0, "token": token}))) == {"index": 0,
                                                                                          "token": token}


def test_tgi_answers() -> None:
    plain = GenerateRequest.model_validate({"inputs": "The", "parameters": {"return_full_text": True}})
    assert sent(generate.response_body(plain, generation(*TWO)), wire.Generation) == {"generated_text": "The is"}
    req = GenerateRequest.model_validate({"inputs": "The", "parameters": {"details": True, "top_n_tokens": 2}})
    tokens = [{"id": 318, "text": " is", "logprob": -1.25, "special": False},
              {"id": 50256, "text": "", "logprob": None, "special": True}]   # -inf: null, as TGI's client takes
    assert sent(generate.response_body(req, generation(*TWO)), wire.Generation) == {
        "generated_text": " is", "details": {"finish_reason": "eos_token", "generated_tokens": 2, "seed": 7,
                                             "prefill": PREFILL, "tokens": tokens, "top_tokens": [TOP, TOP]}}
    assert [sent(generate.stream_event(plain, e), wire.StreamEvent) for e in TWO] == [
        {"index": 0, "token": tokens[0], "top_tokens": TOP, "generated_text": None, "details": None},
        {"index": 1, "token": tokens[1], "top_tokens": TOP, "generated_text": "The is",
         "details": {"finish_reason": "eos_token", "generated_tokens": 2, "seed": 7}}]
    line = generate.event_line(generate.stream_event(req, TWO[0]))
    assert line.startswith(b'data:{"index":0,') and line.endswith(b"}\n\n")   # TGI's framing: no space
    error = build(wire.StreamError, generate.stream_error(Overloaded("queue full")))
    assert sent(error, wire.StreamError) == {"error": "queue full", "error_type": "overloaded"}
    spec = ModelSpec(name="gpt2", task="generate", queue_cap=64)
    info = ModelInfo(name="gpt2", version="3", platform="transformers", kind="generation", max_batch_size=8,
                     context_length=256, max_input_tokens=255, max_prefill_tokens=1024)
    assert sent(generate.info_body(spec, info, ["cuda:0", "cuda:1"]), wire.TGIInfo) == {
        "model_id": "gpt2", "model_sha": "3", "model_version": "3", "model_dtype": None, "model_device_type": "cuda",
        "model_pipeline_tag": "text-generation", "max_concurrent_requests": 64, "max_best_of": 1,
        "max_stop_sequences": 4, "max_input_tokens": 255, "max_total_tokens": 256, "max_batch_size": 8,
        "max_batch_prefill_tokens": 1024, "max_client_batch_size": 1, "router": "inferline",
        "version": info_version(), "sha": None, "docker_label": None}


def info_version() -> str:
    from inferline import server

    return server.__version__


HEAD = {"id": "cmpl-r1", "object": "text_completion", "created": 1767225600, "model": "gpt2"}
USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_completion_answers() -> None:
    req = CompletionRequest.model_validate({"model": "gpt2", "prompt": "The", "max_tokens": 2, "logprobs": 1,
                                            "echo": True})
    logprobs = {"tokens": ["The", " is", ""], "token_logprobs": [None, -1.25, -9999.0],
                "top_logprobs": [None, {" is": -1.25, " a": -2.5}, {" is": -1.25, " a": -2.5, "": -9999.0}],
                "text_offset": [0, 3, 6]}
    assert sent(openai.completion_body(req, HEAD, [generation(*TWO)]), wire.Completion) == {
        **HEAD, "choices": [{"index": 0, "text": "The is", "logprobs": logprobs, "finish_reason": "stop"}],
        "usage": USAGE}
    streamed = CompletionRequest.model_validate({"model": "gpt2", "prompt": "The", "max_tokens": 2, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    chunks = await events_of(await openai.stream_completions(streamed, HEAD, [stream(*TWO)]))
    assert chunks == [
        {**HEAD, "choices": [{"index": 0, "text": " is", "logprobs": None, "finish_reason": None}]},
        {**HEAD, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]},
        {**HEAD, "choices": [], "usage": USAGE}, b"[DONE]"]
    for chunk in chunks[:-1]:
        wire.Completion.model_validate(chunk, extra="forbid")


CHAT_HEAD = {"id": "chatcmpl-r1", "object": "chat.completion", "created": 1767225600, "model": "gpt2",
             "system_fingerprint": None}


async def test_chat_answers() -> None:
    req = ChatCompletionRequest.model_validate({"model": "gpt2", "messages": [{"role": "user", "content": "x"}],
                                                "logprobs": True, "top_logprobs": 1})
    entry = {"token": " is", "logprob": -1.25, "bytes": [32, 105, 115], "top_logprobs": [
        {"token": " is", "logprob": -1.25, "bytes": [32, 105, 115]}, {"token": " a", "logprob": -2.5,
                                                                     "bytes": [32, 97]}]}
    eos = {**entry, "token": "", "logprob": -9999.0, "bytes": []}
    assert sent(chat.chat_body(req, CHAT_HEAD, [generation(*TWO)]), wire.ChatCompletion) == {
        **CHAT_HEAD, "choices": [{"index": 0, "message": {"role": "assistant", "content": " is", "refusal": None},
                                  "logprobs": {"content": [entry, eos], "refusal": None}, "finish_reason": "stop"}],
        "usage": USAGE}
    streamed = ChatCompletionRequest.model_validate({"model": "gpt2", "messages": [{"role": "user", "content": "x"}],
                                                     "stream": True, "stream_options": {"include_usage": True}})
    head = {**CHAT_HEAD, "object": "chat.completion.chunk"}
    chunks = await events_of(chat.stream_chat(streamed, head, {}, [stream(*TWO)]))
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    assert chunks == [
        {**head, "usage": None, "choices": [{**choice, "delta": {"role": "assistant", "content": ""}}]},
        {**head, "usage": None, "choices": [{**choice, "delta": {"content": " is"}}]},
        {**head, "usage": None, "choices": [{**choice, "delta": {}, "finish_reason": "stop"}]},
        {**head, "usage": USAGE, "choices": []}, b"[DONE]"]
    for chunk in chunks[:-1]:
        wire.ChatChunk.model_validate(chunk, extra="forbid")
    error = orjson.loads(error_chunk(Overloaded("queue full", field="inputs"), {"inputs": "messages"})[6:])
    assert wire.OpenAIError.model_validate(error, extra="forbid").error.param == "messages"


def test_operations_and_v2_answers() -> None:
    info = ModelInfo(name="echo", version="1", platform="inferline", kind="batch",
                     inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                     outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]}])
    worker = WorkerStatus(pid=1, host="h", device="cpu", version="1", started=0)
    listed = models.model_list([("echo", ModelSpec(name="echo"), ModelStatus(info, [worker], 3), None, {}),
                                ("gpt2", ModelSpec(name="gpt2", task="generate"), ModelStatus(None, [], 0), None, {})])
    card = {"object": "model", "created": 0, "owned_by": "inferline", "replicas": 1}
    assert sent(listed, wire.ModelList) == {"object": "list", "data": [
        {"id": "echo", **card, "version": "1", "live_replicas": 1, "devices": ["cpu"], "queue_depth": 3,
         "kind": "batch", "task": None,
         "versions": [{"version": "1", "replicas": 0, "live_replicas": 1, "weight": 100, "live": True}]},
        {"id": "gpt2", **card, "version": None, "live_replicas": 0, "devices": [], "queue_depth": 0, "kind": None,
         "task": "generate", "versions": []}]}
    ready = health.readiness_of({"echo": Serving(1, True), "gpt2": Serving(0, True)})
    assert sent(ready, wire.Readiness) == {"ready": True, "redis": "ok", "models": {
        "echo": {"ready": True, "live_workers": 1},
        "gpt2": {"ready": False, "live_workers": 0, "reason": "no live worker"}},
        "missing": ["model gpt2: no live worker"]}
    away = health.readiness_of({}, "unreachable: TimeoutError")
    assert sent(away, wire.Readiness) == {"ready": False, "redis": "unreachable: TimeoutError", "models": {},
                                          "error": "redis unreachable: TimeoutError", "error_type": "unavailable",
                                          "missing": ["redis unreachable: TimeoutError"]}
    assert sent(health.HEALTHZ, wire.Healthz) == {"status": "ok"}
    assert sent(kserve.metadata_of("echo", info), wire.V2Metadata) == {
        "name": "echo", "versions": ["1"], "platform": "inferline", "inputs": info.inputs, "outputs": info.outputs}
    assert sent(kserve.LIVE, wire.V2Live) == {"live": True}
    assert sent(kserve.SERVER, wire.V2Server)["extensions"] == ["binary_tensor_data", "model_repository"]
