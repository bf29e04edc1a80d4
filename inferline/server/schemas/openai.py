"""Wire models of OpenAI's /v1/completions and /v1/chat/completions, as the `openai` client sends them.

Both build the engine's SamplingParams (`to_sampling()`); its bounds (service.generation.params) are the only ones,
except where OpenAI's own range is narrower (temperature <= 2, completions' logprobs <= 5). OpenAI semantics that
differ from TGI's: temperature 0 means greedy, sampling is on by default, a matched stop sequence is left out of the
text, and log-probabilities are the model's own (raw_logprobs=True, as vLLM reports them), not the distribution after
penalties and warpers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from inferline.server.generation.params import (
    MAX_SEED,
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
from inferline.server.protocol import FIT_CONTEXT
from inferline.server.schemas.tgi import MAX_PROMPT_CHARS, neutral_only, sampling_dict

Prompt = str | list[int]   # text, or token ids

MAX_PROMPTS = 16
MAX_PROMPT_IDS = 65_536         # token ids in one prompt (the model's context is checked by its worker)
MAX_TOKEN_ID = 2**31 - 1        # the vocabulary itself is checked by the worker
MAX_COMPLETION_LOGPROBS = 5     # OpenAI's limit for /v1/completions `logprobs`
MAX_CHOICES = 8                 # `n` and `best_of`: each choice is one sequence in the engine
MAX_SEQUENCES = 64              # prompts x max(n, best_of): the engine sequences one request may start
MAX_MESSAGES = 256
DEFAULT_CHAT_MAX_TOKENS = 256   # without max_(completion_)tokens: this, or less when the context leaves less
# accepted for compatibility; only these neutral values are honoured (`suffix`: insertion needs a model trained for
# it, which no served model is)
NEUTRAL: dict[str, Any] = {"logit_bias": {}, "suffix": None}
CHAT_NEUTRAL: dict[str, Any] = {"logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": None}
_SEED_STEP = 0x9E3779B97F4A7C15   # 2**64 / golden ratio: derived seeds of one request stay far from each other's


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request with `n` (or `best_of`) choices, each its own engine sequence: choice 0
    keeps the request's seed (so n=1 answers exactly as a single request), the others get seeds derived from it, so
    the choices differ and the whole answer is reproducible. Without a seed every choice draws its own."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _SEED_STEP) % (MAX_SEED + 1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What both OpenAI generation requests check alike: stop sequences and the temperature."""

    model_config = ConfigDict(extra="ignore")

    # vLLM's scheduling priority (lower is served first; 0 the default), or high/normal/low: the request's lane,
    # as the x-priority header sets it on every route (server/priority.py).
    priority: int | str | None = None

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        """OpenAI's 0 is greedy; between 0 and MIN_TEMPERATURE float32 sampling overflows (see generation.params)."""
        if value is not None and 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (given {value})")
        return value

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"may hold at most {MAX_STOP} sequences (given {len(value)})")
        for stop in [value] if isinstance(value, str) else value or []:
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must hold 1 to {MAX_STOP_CHARS} characters (given "
                                 f"{len(stop)})")
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


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions. `prompt` is a string, a list of strings, a list of token ids or a list of such lists;
    each prompt gets `n` choices (or the best `n` of `best_of`), each its own engine sequence."""

    model: str = Field(min_length=1, max_length=64)
    # Checked in _prompts, so errors name `prompt`, not a member of the union. Token ids are bounded by the model's
    # vocabulary in the worker.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxNewTokens = 16
    temperature: float | None = Field(None, ge=0.0, le=2.0)   # 0 means greedy
    top_p: TopP | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)   # the n of best_of with the highest mean logprob
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None   # checked in _stops, like prompt
    seed: Seed | None = None
    echo: bool = False
    user: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)   # top alternatives per token
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # accepted for compatibility; only their neutral values are honoured
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        prompts = _as_prompts(value)
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"must hold 1 to {MAX_PROMPTS} prompts (given {len(prompts)})")
        for i, prompt in enumerate(prompts):
            which = "" if _single(value) else f" {i}"
            if not prompt:
                raise ValueError(f"prompt{which} must not be empty")
            if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt{which} must hold at most {MAX_PROMPT_CHARS} characters (given {len(prompt)})")
            if isinstance(prompt, list):
                if len(prompt) > MAX_PROMPT_IDS:
                    raise ValueError(f"prompt{which} must hold at most {MAX_PROMPT_IDS} token ids "
                                     f"(given {len(prompt)})")
                if min(prompt) < 0:
                    raise ValueError(f"prompt{which} token ids must be >= 0 (given {min(prompt)})")
                if max(prompt) > MAX_TOKEN_ID:   # past any vocabulary; past 2**63 it could not even be queued
                    raise ValueError(f"prompt{which} token ids must be <= {MAX_TOKEN_ID} (given {max(prompt)})")
        return value

    _neutral_only = neutral_only(NEUTRAL)

    # OpenAI's rules between parameters, each checked on the later field so that the 422 names it.
    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int:
        prompts = _as_prompts(info.data["prompt"]) if "prompt" in info.data else []
        if len(prompts) * value > MAX_SEQUENCES:
            raise ValueError(f"times the number of prompts must be <= {MAX_SEQUENCES} (given {value} x {len(prompts)})")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        n = info.data.get("n", 1)
        if value < n:
            raise ValueError(f"must be >= `n` (given best_of={value}, n={n})")
        if value > n and info.data.get("stream"):
            raise ValueError("cannot be used with `stream`: the best choices are known only at the end")
        prompts = _as_prompts(info.data["prompt"]) if "prompt" in info.data else []
        if len(prompts) * value > MAX_SEQUENCES:
            raise ValueError(f"times the number of prompts must be <= {MAX_SEQUENCES} (given {value} x {len(prompts)})")
        return value

    @property
    def prompts(self) -> list[Prompt]:
        return _as_prompts(self.prompt)

    @property
    def sequences_per_prompt(self) -> int:
        return max(self.n, self.best_of or 1)

    @property
    def wants_prefill(self) -> bool:
        """Echo needs the prompt's tokens: their log-probabilities, or the text of a token-id prompt."""
        return self.echo and (self.logprobs is not None or any(isinstance(p, list) for p in self.prompts))

    def to_sampling(self, index: int = 0) -> SamplingParams:
        params = openai_sampling(self.max_tokens, self.temperature, self.top_p, choice_seed(self.seed, index),
                                 self.stop, self.presence_penalty, self.frequency_penalty, self.logprobs or 0)
        return params.model_copy(update={"want_prefill": True}) if self.wants_prefill else params

    def to_params(self, prompt: Prompt, index: int = 0) -> dict[str, Any]:
        """What the generation worker reads for choice `index` of `prompt`: the prompt (text or token ids) under
        `inputs`, and SamplingParams fields."""
        return {"inputs": prompt, **sampling_dict(self.to_sampling(index))}


def _single(value: Any) -> bool:
    """A prompt given alone (a string or one list of token ids) rather than a list of prompts."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and isinstance(value[0], int))


def _as_prompts(value: Any) -> list[Prompt]:
    return [value] if _single(value) else list(value)


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


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions. The gateway has no tokenizer: the worker renders `messages` with the model's chat
    template (or the deployment's), so to_params() carries them under `messages` instead of `inputs`."""

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

    _neutral_only = neutral_only(CHAT_NEUTRAL)

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in value)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"must hold at most {MAX_PROMPT_CHARS} characters in all (given {total})")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):   # OpenAI's rule, naming top_logprobs
            raise ValueError("requires `logprobs` to be true")
        return value

    @property
    def max_tokens_param(self) -> str:
        """The parameter that set the output limit, for errors about it."""
        return "max_tokens" if self.max_tokens is not None and self.max_completion_tokens is None \
            else "max_completion_tokens"

    def to_sampling(self, index: int = 0) -> SamplingParams:
        max_new = self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        return openai_sampling(max_new, self.temperature, self.top_p, choice_seed(self.seed, index), self.stop,
                               self.presence_penalty, self.frequency_penalty,
                               (self.top_logprobs or 0) if self.logprobs else 0)

    def to_params(self, index: int = 0) -> dict[str, Any]:
        """What the generation worker reads for choice `index`: the messages as [{"role", "content"}] (text only;
        the worker renders them with the model's chat template), SamplingParams fields, and, without an explicit
        limit, FIT_CONTEXT (DEFAULT_CHAT_MAX_TOKENS, or less when the context leaves less after the prompt)."""
        messages = [{"role": m.role, "content": m.text} for m in self.messages]
        fit = {FIT_CONTEXT: True} if self.max_completion_tokens is None and self.max_tokens is None else {}
        return {"messages": messages, **sampling_dict(self.to_sampling(index)), **fit}
