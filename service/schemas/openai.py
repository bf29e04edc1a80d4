"""Wire models of OpenAI's /v1/completions and /v1/chat/completions, as the `openai` client sends them.

Both build the engine's SamplingParams (`to_sampling()`); its bounds (service.generation.params) are the only ones,
except where OpenAI's own range is narrower (temperature <= 2, completions' logprobs <= 5). OpenAI semantics that
differ from TGI's: temperature 0 means greedy, sampling is on by default, a matched stop sequence is left out of the
text, and log-probabilities are the model's own (raw_logprobs=True, as vLLM reports them), not the distribution after
penalties and warpers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.generation.params import (
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOP_LOGPROBS,
    MIN_TEMPERATURE,
    MaxNewTokens,
    Penalty,
    SamplingParams,
    Seed,
    TopP,
)
from service.schemas.tgi import MAX_PROMPT_CHARS, neutral_only, sampling_dict

MAX_PROMPTS = 16
MAX_COMPLETION_LOGPROBS = 5     # OpenAI's limit for /v1/completions `logprobs`
MAX_CHOICES = 8                 # `n`: each choice is one sequence in the engine
MAX_MESSAGES = 256
DEFAULT_CHAT_MAX_TOKENS = 256   # OpenAI's default is "up to the context"; the route may raise it to that
# accepted for compatibility; only these neutral values are honoured
NEUTRAL: dict[str, Any] = {"best_of": 1, "logit_bias": {}, "suffix": None}
CHAT_NEUTRAL: dict[str, Any] = {"logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": None}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def check_temperature(value: float | None) -> float | None:
    """OpenAI's 0 is greedy; between 0 and MIN_TEMPERATURE float32 sampling overflows (see generation.params)."""
    if value is not None and 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (given {value})")
    return value


def check_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > MAX_STOP:
        raise ValueError(f"may hold at most {MAX_STOP} sequences (given {len(value)})")
    for stop in [value] if isinstance(value, str) else value or []:
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop sequence must hold 1 to {MAX_STOP_CHARS} characters (given {len(stop)})")
    return value


def openai_sampling(max_new_tokens: int, temperature: float | None, top_p: float | None, seed: int | None,
                    stop: str | list[str] | None, presence_penalty: float | None, frequency_penalty: float | None,
                    top_logprobs: int) -> SamplingParams:
    """The OpenAI parameters of either route as engine parameters (temperature 0 = greedy, top_p then ignored)."""
    sampling = temperature is None or temperature > 0   # OpenAI samples by default
    return SamplingParams(
        max_new_tokens=max_new_tokens, do_sample=sampling,
        temperature=temperature if sampling and temperature not in (None, 1.0) else None,
        top_p=top_p if sampling and top_p != 1.0 else None, seed=seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        presence_penalty=presence_penalty or 0.0, frequency_penalty=frequency_penalty or 0.0,
        include_stop_sequence=False, top_logprobs=top_logprobs, raw_logprobs=True)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    prompt: str | list[str]   # lengths checked in _prompts, so errors name `prompt`, not a member of the union
    max_tokens: MaxNewTokens = 16
    temperature: float | None = Field(None, ge=0.0, le=2.0)   # 0 means greedy
    top_p: TopP | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None   # checked in _stops, like prompt
    seed: Seed | None = None
    echo: bool = False
    user: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)   # top alternatives per token
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # accepted for compatibility; only their neutral values are honoured
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"must hold 1 to {MAX_PROMPTS} prompts (given {len(value)})")
        for i, prompt in enumerate([value] if isinstance(value, str) else value):
            which = "" if isinstance(value, str) else f" {i}"
            if not prompt:
                raise ValueError(f"prompt{which} must not be empty")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt{which} must hold at most {MAX_PROMPT_CHARS} characters (given {len(prompt)})")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_stops(value)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        return check_temperature(value)

    _neutral_only = neutral_only(NEUTRAL)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_sampling(self) -> SamplingParams:
        return openai_sampling(self.max_tokens, self.temperature, self.top_p, self.seed, self.stop,
                               self.presence_penalty, self.frequency_penalty, self.logprobs or 0)

    def to_params(self, prompt: str) -> dict[str, Any]:
        """What the generation worker reads: the prompt under `inputs`, and SamplingParams fields."""
        return {"inputs": prompt, **sampling_dict(self.to_sampling())}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message. Content is text, or a list of text parts (images and audio are refused: text models only)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. The gateway has no tokenizer: the worker renders `messages` with the model's chat
    template (or the deployment's), so to_params() carries them under `messages` instead of `inputs`."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxNewTokens | None = None               # deprecated by OpenAI; max_completion_tokens wins
    max_completion_tokens: MaxNewTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)   # 0 means greedy
    top_p: TopP | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    # accepted for compatibility; only their neutral values are honoured
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_stops(value)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        return check_temperature(value)

    _neutral_only = neutral_only(CHAT_NEUTRAL)

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in value)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"must hold at most {MAX_PROMPT_CHARS} characters in all (given {total})")
        return value

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:   # OpenAI's rule: a 400 naming top_logprobs
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        return self

    def to_sampling(self, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> SamplingParams:
        max_new = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return openai_sampling(max_new, self.temperature, self.top_p, self.seed, self.stop, self.presence_penalty,
                               self.frequency_penalty, (self.top_logprobs or 0) if self.logprobs else 0)

    def to_params(self, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> dict[str, Any]:
        """The messages as [{"role", "content"}] (text only) and SamplingParams fields, flat."""
        messages = [{"role": m.role, "content": m.text} for m in self.messages]
        return {"messages": messages, **sampling_dict(self.to_sampling(default_max_tokens))}
