"""Wire models of the TGI-style generation routes (/generate, /generate_stream, /). The text-generation
client sends every parameter it knows, nulls included: unsupported ones pass when null/false/default and
get a 422 naming them when set to a value we cannot honour."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP = 4
MAX_PROMPT_CHARS = 65_536
StopSequence = Annotated[str, Field(min_length=1, max_length=64)]
# accepted for compatibility; only these neutral values are honoured
NEUTRAL: dict[str, Any] = {"frequency_penalty": 0.0, "typical_p": 1.0, "truncate": None, "best_of": 1,
                           "watermark": False, "top_n_tokens": 0, "grammar": None}


def neutral_only(neutral: dict[str, Any]) -> Any:
    """A field validator for parameters accepted for compatibility only: each passes at its neutral value (or
    null) and otherwise fails on its own, so the 422 names that field."""
    def check(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        if value is not None and value != neutral[name]:
            raise ValueError(f"`{name}` is not supported by this server; leave it unset (given {value!r})")
        return value

    return field_validator(*neutral)(classmethod(check))


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(20, ge=1, le=4096)     # the model's context limit is checked by its worker
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP)
    return_full_text: bool | None = False
    details: bool = False
    decoder_input_details: bool = False
    # accepted for compatibility; only their neutral values are honoured
    frequency_penalty: float | None = None
    typical_p: float | None = None
    truncate: int | None = None
    best_of: int | None = None
    watermark: bool = False
    top_n_tokens: int | None = None
    grammar: Any = None

    _neutral_only = neutral_only(NEUTRAL)

    def to_params(self, inputs: str) -> dict[str, Any]:
        """What the generation worker reads (generation.SamplingParams fields plus the prompt)."""
        return {"inputs": inputs, "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": self.stop,
                "want_prefill": self.decoder_input_details}


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
