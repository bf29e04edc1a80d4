"""Wire models of the TGI-style generation routes (/generate, /generate_stream, /). The text-generation
client sends every parameter it knows, nulls included: unsupported ones pass when null/false/default and
get a 422 naming them when set to a value we cannot honour."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from inferline.server.generation.params import (
    MAX_STOP,
    MaxNewTokens,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopSequence,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
)

MAX_PROMPT_CHARS = 65_536
# accepted for compatibility; only these neutral values are honoured
NEUTRAL: dict[str, Any] = {"typical_p": 1.0, "truncate": None, "best_of": 1, "watermark": False, "grammar": None}


def neutral_only(neutral: dict[str, Any]) -> Any:
    """A field validator for parameters accepted for compatibility only: each passes at its neutral value (or
    null) and otherwise fails on its own, so the 422 names that field."""
    def check(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        if value is not None and value != neutral[name]:
            raise ValueError(f"`{name}` is not supported by this server; leave it unset (given {value!r})")
        return value

    return field_validator(*neutral)(classmethod(check))


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as the flat JSON-ready dict that crosses Redis; defaults left out to keep envelopes small."""
    return params.model_dump(mode="json", exclude_defaults=True)


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Bounds live in service.generation.params (one place for the gateway and the engine).
    max_new_tokens: MaxNewTokens = 20     # the model's context limit is checked by its worker
    do_sample: bool = False
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    # Applied with OpenAI's formula (count of each generated token times the penalty, subtracted); TGI's own scales
    # the logits of prompt and output tokens. Same range and neutral value, same intent.
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP)
    return_full_text: bool | None = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: TopLogprobs | None = None
    # accepted for compatibility; only their neutral values are honoured
    typical_p: float | None = None
    truncate: int | None = None
    best_of: int | None = None
    watermark: bool = False
    grammar: Any = None

    _neutral_only = neutral_only(NEUTRAL)

    def to_sampling(self) -> SamplingParams:
        """The engine's parameters. TGI reports log-probabilities (the chosen token's and top_n_tokens) from the
        distribution the token was chosen from, after penalties and warpers: raw_logprobs stays False."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                              temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty,
                              frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, stop=tuple(self.stop),
                              want_prefill=self.decoder_input_details, top_logprobs=self.top_n_tokens or 0)

    def to_params(self, inputs: str) -> dict[str, Any]:
        """What the generation worker reads: the prompt under `inputs`, and SamplingParams fields (those not at
        their default) that `SamplingParams.model_validate` takes back."""
        return {"inputs": inputs, **sampling_dict(self.to_sampling())}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("parameters") is None:
            data = {k: v for k, v in data.items() if k != "parameters"}
        return data


class TokenizeRequest(BaseModel):
    """POST /tokenize (TGI): the text to tokenize; TGI's `parameters` are accepted and unused."""

    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
