"""Per-request generation parameters and next-token choice: repetition penalty, temperature, top-k, top-p,
then greedy or seeded sampling. Semantics follow TGI (`server/text_generation_server/utils/tokens.py`):
sampling is on when `do_sample` is set *or* any warper changes the distribution (temperature != 1, top_k,
top_p < 1), and the logprob reported for a token is taken from the distribution it was chosen from.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from service.errors import InputError

MAX_SEED = 2**63 - 1  # the wire accepts 0..2**63-1 (TGI); torch seeds take up to 2**64-1


@dataclass
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    want_prefill: bool = False  # return prompt tokens (id, text, logprob — first is None) on the first event


def validate(params: SamplingParams) -> None:
    """Check what the gateway also checks, so the engine is safe on its own. Raises InputError naming the
    field, its bound and the value given (TGI validation.rs wording)."""
    if params.max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be strictly positive. Given: {params.max_new_tokens}",
                         "max_new_tokens")
    if params.temperature is not None and not params.temperature > 0.0:
        raise InputError(f"`temperature` must be strictly positive. Given: {params.temperature}", "temperature")
    if params.top_k is not None and params.top_k < 1:
        raise InputError(f"`top_k` must be strictly positive. Given: {params.top_k}", "top_k")
    if params.top_p is not None and not 0.0 < params.top_p <= 1.0:
        raise InputError(f"`top_p` must be > 0.0 and <= 1.0. Given: {params.top_p}", "top_p")
    if params.repetition_penalty is not None and not params.repetition_penalty > 0.0:
        raise InputError(f"`repetition_penalty` must be strictly positive. Given: {params.repetition_penalty}",
                         "repetition_penalty")
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise InputError(f"`seed` must be >= 0 and <= {MAX_SEED}. Given: {params.seed}", "seed")
    if any(not s for s in params.stop):
        raise InputError("`stop` sequences must not be empty", "stop")


def has_warpers(params: SamplingParams) -> bool:
    return ((params.temperature is not None and params.temperature != 1.0)
            or params.top_k is not None
            or (params.top_p is not None and params.top_p < 1.0))


class Sampler:
    """Chooses one request's tokens. Holds its own torch.Generator, so a request's samples depend only on its
    seed and its logits, never on the other requests of the batch or on the order they were stepped in."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int], device: torch.device) -> None:
        self.params = params
        self.sampling = params.do_sample or has_warpers(params)
        # A seed is reported only when sampling, as TGI does; greedy output needs none.
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if self.sampling:
            self.seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        penalty = params.repetition_penalty
        self.penalty = penalty if penalty is not None and penalty != 1.0 else None
        self.seen: torch.Tensor | None = None
        if self.penalty is not None:
            # TGI/HF penalise every token of prompt and output; a presence mask makes that one vector op.
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device)] = True

    @property
    def is_plain_greedy(self) -> bool:
        """True when the engine may take the batch-wide argmax for this row instead of calling choose()."""
        return not self.sampling and self.penalty is None

    def observe(self, token_id: int) -> None:
        """Record a generated token (for the repetition penalty)."""
        if self.seen is not None:
            self.seen[token_id] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply penalty and warpers to one row of float logits [vocab]; returns new logits (-inf = excluded)."""
        scores = logits.float()
        if self.penalty is not None and self.seen is not None:
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalised, scores)
        if not self.sampling:
            return scores
        p = self.params
        if p.temperature is not None and p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k is not None and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p is not None and p.top_p < 1.0:
            # HF TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p, always keep the best token.
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            remove_sorted = cum <= 1 - p.top_p
            remove_sorted[-1] = False
            remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
            scores = scores.masked_fill(remove, float("-inf"))
        return scores

    def choose(self, logits: torch.Tensor) -> tuple[int, float]:
        """(token id, logprob of that token under the processed distribution) for one row of logits."""
        scores = self.process(logits)
        logprobs = torch.log_softmax(scores, dim=-1)
        if self.sampling:
            token = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator).item())
        else:
            token = int(torch.argmax(logprobs).item())
        return token, float(logprobs[token].item())


def choose_greedy_batch(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Argmax and its logprob for every row of [rows, vocab] logits in one pass: the common case of plain
    greedy requests costs one vector op for the batch instead of one per request."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.max(logprobs, dim=-1)
    return best.indices.tolist(), best.values.tolist()
