"""Next-token choice for a whole batch: penalties, warpers, greedy or seeded sampling, and the log-probabilities each
request asked for, as tensor ops over [rows, vocab] (no Python loop over the vocabulary; the only loop over rows is
the seeded draw, because each request owns its torch.Generator).

Order (TGI `utils/tokens.py`, HF logits processors, vLLM `sample/sampler.py`): repetition penalty (prompt and output
tokens), frequency and presence penalties (output tokens), temperature, top-k, top-p. Rows that do not use a step
pass through it unchanged in value (x / 1.0, x - 0.0), so a row's scores do not depend on its batch-mates.

Fault isolation: a row whose scores hold NaN or +inf, or exclude every token (temperature underflow, a model fault
in that row), or whose draw raises, fails alone; Choice.errors names it and the other rows are chosen as usual.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from inferline.server.generation.params import MAX_SEED, SamplingParams

__all__ = ["Choice", "RowSampling", "SamplingBatch"]


class RowSampling:
    """One request's sampling state that is not a tensor row: its params, its seed and its own torch.Generator, so its
    samples depend only on its seed and its logits, never on its batch-mates or the order they were stepped in."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        self.sampling = params.sampling
        # A seed is reported only when sampling, as TGI does; greedy output needs none.
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if self.sampling:
            self.seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)


@dataclass(frozen=True)
class Uses:
    """Which steps any of a set of rows needs: a step no row uses is skipped for the whole batch."""

    repetition: bool
    counts: bool        # presence or frequency penalty
    temperature: bool
    top_k: bool
    top_p: bool
    sampling: bool
    raw: bool           # some row reports the model's distribution and it differs from the processed one
    top_logprobs: int   # the most alternatives any row asked for

    @staticmethod
    def of(rows: list[RowSampling], vocab: int) -> Uses:
        p = [r.params for r in rows]
        return Uses(
            repetition=any(x.repetition_penalty not in (None, 1.0) for x in p),
            counts=any(x.frequency_penalty or x.presence_penalty for x in p),
            temperature=any(x.temperature not in (None, 1.0) for x in p),
            top_k=any(x.top_k is not None for x in p),
            top_p=any(x.top_p is not None and x.top_p < 1.0 for x in p),
            sampling=any(r.sampling for r in rows),
            raw=any(x.raw_logprobs and (x.sampling or x.has_penalties) for x in p),
            top_logprobs=min(max((x.top_logprobs for x in p), default=0), vocab))


@dataclass
class Choice:
    tokens: list[int]                       # one per row (0 for a failed row)
    logprobs: list[float]                   # the chosen token's, from the distribution the row reports
    top: list[list[tuple[int, float]]]      # per row, its top_logprobs (id, logprob) pairs, best first ([] if none)
    errors: dict[int, str]                  # row -> why it failed; those rows have no token


class SamplingBatch:
    """Per-row sampling state, row i = the engine's running row i. The engine keeps it aligned with its KV cache:
    append() the newcomers, keep() the survivors, observe() every chosen token.

    Vocabulary-sized state (output token counts, prompt token mask) exists only while some row has a penalty."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab = vocab_size
        self.device = device
        self.rows: list[RowSampling] = []
        self._uses: Uses | None = None   # of all rows; reset when rows change
        def column(fill: float) -> torch.Tensor:
            return torch.full((0, 1), fill, dtype=torch.float32, device=device)

        self.temperature = column(1.0)
        self.top_k = torch.zeros(0, dtype=torch.long, device=device)     # vocab for rows without top_k
        self.top_p = column(1.0)
        self.repetition = column(1.0)
        self.presence = column(0.0)
        self.frequency = column(0.0)
        self.counts: torch.Tensor | None = None        # [rows, vocab] float32: times each token was generated
        self.prompt_mask: torch.Tensor | None = None   # [rows, vocab] bool: token is in the prompt

    def __len__(self) -> int:
        return len(self.rows)

    # -------------------------------------------------------------------------------------------- rows
    def append(self, rows: list[RowSampling]) -> None:
        if not rows:
            return
        p = [r.params for r in rows]

        def col(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device).view(-1, 1)

        self.temperature = torch.cat([self.temperature, col([x.temperature or 1.0 for x in p])])
        top_k = [min(x.top_k, self.vocab) if x.top_k is not None else self.vocab for x in p]
        self.top_k = torch.cat([self.top_k, torch.tensor(top_k, dtype=torch.long, device=self.device)])
        self.top_p = torch.cat([self.top_p, col([x.top_p if x.top_p is not None else 1.0 for x in p])])
        self.repetition = torch.cat([self.repetition, col([x.repetition_penalty or 1.0 for x in p])])
        self.presence = torch.cat([self.presence, col([x.presence_penalty for x in p])])
        self.frequency = torch.cat([self.frequency, col([x.frequency_penalty for x in p])])
        if self.counts is None and any(x.has_penalties for x in p):
            self.counts = torch.zeros(len(self.rows), self.vocab, dtype=torch.float32, device=self.device)
            self.prompt_mask = torch.zeros(len(self.rows), self.vocab, dtype=torch.bool, device=self.device)
        if self.counts is not None and self.prompt_mask is not None:
            mask = torch.zeros(len(rows), self.vocab, dtype=torch.bool, device=self.device)
            for i, r in enumerate(rows):
                if r.params.repetition_penalty not in (None, 1.0) and r.prompt_ids:
                    ids = torch.tensor(r.prompt_ids, device=self.device).clamp(max=self.vocab - 1)
                    mask[i, ids] = True
            self.counts = torch.cat([self.counts, torch.zeros(len(rows), self.vocab, device=self.device)])
            self.prompt_mask = torch.cat([self.prompt_mask, mask])
        self.rows.extend(rows)
        self._uses = None

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index` (1-D long tensor), in that order."""
        idx = index.tolist()
        self.rows = [self.rows[i] for i in idx]
        self._uses = None
        for name in ("temperature", "top_k", "top_p", "repetition", "presence", "frequency"):
            setattr(self, name, getattr(self, name)[index])
        if self.counts is not None and self.prompt_mask is not None:
            if any(r.params.has_penalties for r in self.rows):
                self.counts, self.prompt_mask = self.counts[index], self.prompt_mask[index]
            else:
                self.counts = self.prompt_mask = None

    def observe(self, tokens: list[int], rows: torch.Tensor | None = None) -> None:
        """Record one generated token per row of `rows` (default: all) for the presence and frequency penalties."""
        if self.counts is not None and tokens:
            ids = torch.tensor(tokens, device=self.device).clamp(max=self.vocab - 1).view(-1, 1)
            ones = torch.ones(len(tokens), 1, device=self.device)
            if rows is None:
                self.counts.scatter_add_(1, ids, ones)
            else:
                self.counts[rows] = self.counts[rows].scatter_add(1, ids, ones)

    # ---------------------------------------------------------------------------------------- scoring
    def _rows(self, rows: torch.Tensor | None) -> tuple[list[RowSampling], Uses]:
        if rows is not None:
            reqs = [self.rows[i] for i in rows.tolist()]
            return reqs, Uses.of(reqs, self.vocab)
        if self._uses is None:
            self._uses = Uses.of(self.rows, self.vocab)
        return self.rows, self._uses

    def process(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Penalties and warpers for [n, vocab] logits of the rows `rows` (default: all, in order). Returns float32
        scores; -inf marks an excluded token. Never modifies `logits`."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        reqs, uses = self._rows(rows)
        scores = logits.float()
        if self.counts is not None and self.prompt_mask is not None:
            counts = take(self.counts)
            if uses.repetition:
                penalty = take(self.repetition)
                seen = take(self.prompt_mask) | (counts > 0)
                scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
            if uses.counts:
                scores = scores - take(self.frequency) * counts - take(self.presence) * (counts > 0)
        if uses.temperature:
            scores = scores / take(self.temperature)
        if uses.top_k:
            top_k = take(self.top_k)
            # The k-th best score per row (HF TopKLogitsWarper keeps ties with it); rows without top_k keep all.
            k_max = max(min(r.params.top_k, self.vocab) for r in reqs if r.params.top_k is not None)
            kth = torch.topk(scores, k_max, dim=-1).values.gather(1, (top_k.clamp(max=k_max) - 1).view(-1, 1))
            kth = torch.where(top_k.view(-1, 1) < self.vocab, kth, torch.full_like(kth, float("-inf")))
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if uses.top_p:
            # HF TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p, always keep the best token.
            top_p = take(self.top_p)
            sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = (cum <= 1 - top_p) & (top_p < 1.0)
            remove_sorted[:, -1] = False
            remove = remove_sorted.scatter(1, order, remove_sorted)
            scores = scores.masked_fill(remove, float("-inf"))
        return scores

    def choose(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> Choice:
        """One token per row of [n, vocab] logits (rows `rows` of the batch, default all), with the logprobs each
        row asked for. A failing row is reported in Choice.errors; only a bug common to the batch raises."""
        reqs, uses = self._rows(rows)
        scores = self.process(logits, rows)
        logprobs = torch.log_softmax(scores, dim=-1)
        # NaN or +inf anywhere, or every token excluded, leave no distribution to draw from; log_softmax turns each of
        # them into NaN, and max propagates NaN: one reduction gives the greedy choice and the broken rows.
        best = torch.max(logprobs, dim=-1)
        best_lp: list[float] = best.values.tolist()
        errors = {i: "sampling produced no valid distribution (inf/nan scores)"
                  for i, v in enumerate(best_lp) if not math.isfinite(v)}
        tokens = best.indices
        if uses.sampling:
            tokens = tokens.clone()
            for i, r in enumerate(reqs):
                if r.sampling and i not in errors:
                    try:
                        tokens[i] = torch.multinomial(logprobs[i].exp(), 1, generator=r.generator)[0]
                    except RuntimeError as exc:   # e.g. "probability tensor contains either inf, nan or element < 0"
                        errors[i] = f"sampling failed: {exc}"

        # What each row reports: TGI the distribution the token was drawn from, OpenAI the model's own.
        reported = logprobs
        if uses.raw:
            raw = [r.params.raw_logprobs and (r.sampling or r.params.has_penalties) for r in reqs]
            model_lp = torch.log_softmax(logits.float(), dim=-1)
            reported = torch.where(torch.tensor(raw, device=logits.device).view(-1, 1), model_lp, logprobs)
        chosen = best_lp   # a greedy row's logprob is its best one
        if uses.sampling or uses.raw:
            chosen = reported.gather(1, tokens.view(-1, 1)).view(-1).tolist()
        top: list[list[tuple[int, float]]] = [[] for _ in reqs]
        if uses.top_logprobs:
            values, ids = torch.topk(reported, uses.top_logprobs, dim=-1)
            for i, (vs, ts) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                n = min(reqs[i].params.top_logprobs, self.vocab)
                top[i] = list(zip(ts[:n], vs[:n], strict=True))
        token_list = tokens.tolist()
        for i in errors:
            token_list[i] = 0
        return Choice(tokens=token_list, logprobs=chosen, top=top, errors=errors)
