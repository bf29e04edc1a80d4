"""Wire model of OpenAI's /v1/completions, as the `openai` client sends it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.schemas.tgi import MAX_PROMPT_CHARS, MAX_STOP, StopSequence, unsupported

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
MAX_PROMPTS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    prompt: Prompt | list[Prompt]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=2.0)   # 0 means greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopSequence | list[StopSequence] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    echo: bool = False
    user: str | None = None
    # accepted for compatibility; only their neutral values are honoured
    logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"must hold 1 to {MAX_PROMPTS} prompts (given {len(value)})")
        return value

    @model_validator(mode="after")
    def _honourable(self) -> CompletionRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"`stop` may hold at most {MAX_STOP} sequences (given {len(self.stop)})")
        unsupported("logprobs", self.logprobs, None)
        unsupported("presence_penalty", self.presence_penalty, 0.0)
        unsupported("frequency_penalty", self.frequency_penalty, 0.0)
        unsupported("best_of", self.best_of, 1)
        unsupported("suffix", self.suffix, None)
        if self.logit_bias:
            unsupported("logit_bias", self.logit_bias, None)
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_params(self, prompt: str) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        sampling = self.temperature is None or self.temperature > 0   # OpenAI samples by default
        return {"inputs": prompt, "max_new_tokens": self.max_tokens, "do_sample": sampling,
                "temperature": self.temperature if sampling and self.temperature not in (None, 1.0) else None,
                "top_p": self.top_p if sampling and self.top_p != 1.0 else None, "seed": self.seed, "stop": stop}
