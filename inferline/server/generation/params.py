"""The request parameters of text generation, validated once: the TGI and OpenAI wire schemas build a SamplingParams
(`to_sampling()`), the worker rebuilds it from the flat dict that crossed Redis (`SamplingParams.model_validate`),
and the engine takes it as is. Pydantic only: the gateway imports this module without torch.

Bounds, and why (each one keeps inf/nan out of the sampler or bounds the work of one request):
- temperature in [1e-2, 100]: logits are float32; dividing by 1e-300 (0 in float32) or 1e-45 gives inf and a NaN
  distribution. vLLM clamps below 1e-2 for the same reason; below it sampling is greedy in all but name. OpenAI's 0
  ("greedy") is mapped to do_sample=False by the OpenAI schema, never passed through.
- repetition_penalty in [1e-2, 100]: it multiplies or divides logits, so the same overflow argument.
- presence_penalty, frequency_penalty in [-2, 2]: OpenAI's range; a frequency penalty times a count of at most
  MAX_NEW_TOKENS stays far from float32 overflow.
- top_k in [1, 2**31 - 1] (k above the vocabulary means "all"; no vocabulary is near 2**31, and an integer past
  2**64 could not even be queued: the payload is JSON with 64-bit integers), top_p in (0, 1].
- top_logprobs in [0, 20] (OpenAI's chat limit; TGI's top_n_tokens is also capped there).
- stop: at most 4 sequences of 1..64 characters (matching cost per token is linear in their length).
Unknown keys are refused: a misspelt field must not silently fall back to its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_NEW_TOKENS = 4096
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 100.0
MAX_ABS_PENALTY = 2.0
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1  # TGI's wire range; torch seeds take up to 2**64-1
MAX_TOP_K = 2**31 - 1

# The bounds, written once: SamplingParams and the wire schemas (server/schemas/tgi.py, openai.py) annotate their
# fields with these, so a 422 at the gateway names the wire field and the same bound the engine relies on.
MaxNewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)]
Penalty = Annotated[float, Field(ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class SamplingParams(BaseModel):
    """How one request picks its tokens, and what it wants reported.

    Sampling is on when `do_sample` is set or any warper changes the distribution (temperature != 1, top_k, top_p < 1),
    as in TGI. Penalties apply with or without sampling: repetition_penalty (HF/TGI: every token of prompt and output)
    first, then presence/frequency (OpenAI: generated tokens only), then the warpers.

    Stop sequences: TGI keeps the matched one in the text, OpenAI and vLLM leave it out (include_stop_sequence=False;
    the engine then holds back streamed text that may be the start of one, see stopping.py).

    Log-probabilities: every token event carries the chosen token's logprob; `top_logprobs` > 0 adds that many
    alternatives. `raw_logprobs` picks the distribution both are read from: False (TGI) the one the token was chosen
    from, after penalties and warpers; True (OpenAI, vLLM) the model's own log-softmax at that step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: MaxNewTokens = 20  # the model's context is checked by the engine
    do_sample: bool = False
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: tuple[StopSequence, ...] = Field((), max_length=MAX_STOP)
    include_stop_sequence: bool = True   # TGI keeps a matched stop in the text; OpenAI (False) leaves it out
    want_prefill: bool = False  # TGI decoder_input_details: prompt tokens with their logprobs on the first event
    top_logprobs: TopLogprobs = 0
    raw_logprobs: bool = False

    @property
    def has_warpers(self) -> bool:
        return ((self.temperature is not None and self.temperature != 1.0)
                or self.top_k is not None
                or (self.top_p is not None and self.top_p < 1.0))

    @property
    def sampling(self) -> bool:
        return self.do_sample or self.has_warpers

    @property
    def has_penalties(self) -> bool:
        return ((self.repetition_penalty is not None and self.repetition_penalty != 1.0)
                or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)

    @property
    def reproducible(self) -> bool:
        """Whether the tokens follow from the request alone: greedy, or sampled from a given seed (each request owns
        its generator, engine.py). Only these are kept by a response cache."""
        return not self.sampling or self.seed is not None


def reproducible(params: Mapping[str, Any]) -> bool:
    """SamplingParams.reproducible for the flat dict that crosses Redis (its other keys, the prompt's, are ignored).
    A dict the type refuses is not (its worker refuses it too)."""
    try:
        return SamplingParams.model_validate({k: v for k, v in params.items()
                                              if k in SamplingParams.model_fields}).reproducible
    except ValidationError:
        return False
