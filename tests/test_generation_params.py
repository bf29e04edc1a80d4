"""SamplingParams and the wire schemas that build it: one set of bounds, flat dicts that survive the trip through
Redis, OpenAI's and TGI's differing semantics. No model, no torch."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from inferline.server.generation.params import MIN_TEMPERATURE, SamplingParams, reproducible
from inferline.server.generation.stopping import StopChecker, Verdict
from inferline.server.schemas.openai import ChatCompletionRequest, CompletionRequest
from inferline.server.schemas.tgi import GenerateRequest


def first_error(model: Any, body: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    e = err.value.errors()[0]
    return e["loc"], e["msg"]


def test_flat_params_round_trip_for_every_schema() -> None:
    """What the worker will do: to_params() minus the prompt -> SamplingParams.model_validate -> the same params."""
    tgi = GenerateRequest.model_validate({"inputs": "hi", "parameters": {
        "max_new_tokens": 9, "temperature": 0.5, "top_k": 4, "top_p": 0.9, "repetition_penalty": 1.2,
        "frequency_penalty": 0.3, "seed": 3, "stop": ["."], "decoder_input_details": True, "top_n_tokens": 2,
        "do_sample": True, "details": True, "watermark": False, "typical_p": None, "truncate": None}})
    oai = CompletionRequest.model_validate({"model": "gpt2", "prompt": "hi", "max_tokens": 5, "temperature": 0.8,
                                            "logprobs": 3, "presence_penalty": -0.5, "frequency_penalty": 1.5,
                                            "stop": "\n", "seed": 1})
    chat = ChatCompletionRequest.model_validate({
        "model": "gpt2", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 4, "n": 3, "user": "u"})
    for built, flat in [(tgi.parameters.to_sampling(), tgi.parameters.to_params(tgi.inputs)),
                        (oai.to_sampling(), oai.to_params("hi")), (chat.to_sampling(), chat.to_params())]:
        flat = {k: v for k, v in flat.items() if k not in ("inputs", "messages")}
        assert SamplingParams.model_validate(flat) == built
        assert SamplingParams(**flat) == built   # the worker's current call
    assert tgi.parameters.to_sampling().raw_logprobs is False and tgi.parameters.to_sampling().top_logprobs == 2
    assert oai.to_sampling().raw_logprobs is True and oai.to_sampling().stop == ("\n",)
    assert oai.to_sampling().include_stop_sequence is False and tgi.parameters.to_sampling().include_stop_sequence
    assert chat.to_sampling().max_new_tokens == 7 and chat.to_sampling().top_logprobs == 4
    assert chat.to_params()["messages"] == [{"role": "user", "content": "hi"}]


def test_openai_temperature_zero_is_greedy_and_defaults_sample() -> None:
    greedy = CompletionRequest(model="m", prompt="x", temperature=0.0, top_p=0.5).to_sampling()
    assert not greedy.sampling and greedy.top_p is None
    default = CompletionRequest(model="m", prompt="x").to_sampling()
    assert default.do_sample and default.temperature is None
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert chat.to_sampling().max_new_tokens == 256 and chat.to_sampling().top_logprobs == 0


@pytest.mark.parametrize("value", [1e-300, 1e-45, 1e-3])
def test_tiny_temperatures_are_refused_at_the_edge(value: float) -> None:
    """Issue 8: these made the sampler produce inf/nan; every route now answers 422 naming the field."""
    loc, msg = first_error(GenerateRequest, {"inputs": "x", "parameters": {"temperature": value, "do_sample": True}})
    assert loc == ("parameters", "temperature") and str(MIN_TEMPERATURE) in msg
    loc, msg = first_error(CompletionRequest, {"model": "m", "prompt": "x", "temperature": value})
    assert loc == ("temperature",) and "0 (greedy)" in msg
    loc, _ = first_error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "temperature": value})
    assert loc == ("temperature",)
    loc, _ = first_error(SamplingParams, {"temperature": value})
    assert loc == ("temperature",)


@pytest.mark.parametrize(("body", "field"), [
    ({"repetition_penalty": 1e-9}, "repetition_penalty"), ({"repetition_penalty": 1e9}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 21}, "top_logprobs"), ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"max_new_tokens": 5000}, "max_new_tokens"), ({"temprature": 0.5}, "temprature"),
])
def test_sampling_params_bounds(body: dict[str, Any], field: str) -> None:
    loc, _ = first_error(SamplingParams, body)
    assert loc[0] == field


def test_wire_specific_rules() -> None:
    loc, _ = first_error(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 6})
    assert loc == ("logprobs",)
    _, msg = first_error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "top_logprobs": 2})
    assert "requires `logprobs`" in msg
    loc, _ = first_error(ChatCompletionRequest, {"model": "m", "messages": []})
    assert loc == ("messages",)
    loc, _ = first_error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert loc[0] == "messages"
    loc, _ = first_error(GenerateRequest, {"inputs": "x", "parameters": {"top_n_tokens": 99}})
    assert loc == ("parameters", "top_n_tokens")
    loc, _ = first_error(GenerateRequest, {"inputs": "x", "parameters": {"typical_p": 0.5}})
    assert loc == ("parameters", "typical_p")


def test_params_and_schemas_import_no_framework() -> None:
    """The gateway builds SamplingParams: neither it nor the schemas may pull in torch or transformers."""
    from tests.test_layering import FRAMEWORKS, modules_after, offenders

    loaded = modules_after("import inferline.server.generation.params, inferline.server.schemas.tgi, "
                           "inferline.server.schemas.openai")
    assert "inferline.server.generation.params" in loaded and offenders(loaded, FRAMEWORKS) == []


# ---------------------------------------------------------------------------------------------------- stopping
def feed(checker: StopChecker, pieces: list[tuple[str, bool]], eos_after: bool = False) -> list[Verdict]:
    out = [checker.update(i + 10, piece, special) for i, (piece, special) in enumerate(pieces)]
    if eos_after:
        out.append(checker.update(0, "<eos>", True))
    return out


def test_openai_stop_is_left_out_and_never_streamed() -> None:
    checker = StopChecker(["END."], 50, eos_token_id=0, include_stop_sequence=False)
    verdicts = feed(checker, [("Hello E", False), ("N", False), ("D", False), ("? no. ", False), ("Done E", False),
                              ("ND", False), (". tail", False)])
    shown = [v.text for v in verdicts]
    assert shown == ["Hello ", "", "", "END? no. ", "Done ", "", ""]   # "E", "EN", "END" held back, then released
    assert verdicts[-1].finish_reason == "stop_sequence" and checker.text == "Hello END? no. Done "
    assert "".join(shown) == checker.text


def test_tgi_stop_is_kept_and_pieces_are_the_tokens() -> None:
    checker = StopChecker(["END."], 50, eos_token_id=0)
    verdicts = feed(checker, [("Hello E", False), ("N", False), ("D. tail", False)])
    assert [v.text for v in verdicts] == ["Hello E", "N", "D."] and checker.text == "Hello END."


@pytest.mark.parametrize("eos", [False, True])
def test_held_back_text_is_released_when_the_request_ends(eos: bool) -> None:
    """A possible stop start at the very end (length or EOS) was text after all: the last event shows it."""
    checker = StopChecker(["xyz"], 3 if not eos else 50, eos_token_id=0, include_stop_sequence=False)
    verdicts = feed(checker, [("ab", False), ("<sp>", True), ("cx", False)], eos_after=eos)
    assert [v.text for v in verdicts] == ["ab", "", "c", "x"] if eos else ["ab", "", "cx"]
    assert verdicts[-1].finish_reason == ("eos_token" if eos else "length") and checker.text == "abcx"


def test_only_greedy_or_seeded_requests_are_reproducible() -> None:
    """What the response cache may keep: the worker's flat dict, prompt keys and all, as the routes build it."""
    tgi = GenerateRequest.model_validate
    assert reproducible(tgi({"inputs": "a"}).parameters.to_params("a"))
    assert reproducible(tgi({"inputs": "a", "parameters": {"do_sample": True, "seed": 3}}).parameters.to_params("a"))
    assert not reproducible(tgi({"inputs": "a", "parameters": {"do_sample": True}}).parameters.to_params("a"))
    assert not reproducible(tgi({"inputs": "a", "parameters": {"top_k": 5}}).parameters.to_params("a"))
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert reproducible(ChatCompletionRequest.model_validate({**chat, "temperature": 0}).to_params())
    assert not reproducible(ChatCompletionRequest.model_validate(chat).to_params())   # OpenAI samples by default
    assert reproducible(ChatCompletionRequest.model_validate({**chat, "seed": 1}).to_params(1))
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "a", "temperature": 0})
    assert reproducible(completion.to_params("a"))
    assert not reproducible({"inputs": "a", "do_sample": "maybe"})   # refused by the type: never kept
