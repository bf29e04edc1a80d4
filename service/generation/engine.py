"""Continuous (iteration-level) batching over a transformers causal LM with a KV cache.

step() = schedule -> forward -> update (vLLM `v1/engine/core.py` step, TGI `Batch`):
  1. admit waiting requests up to max_batch_size and prefill them together (one forward over their
     left-padded prompts, which also yields their first token);
  2. decode the requests that were already running: one forward, one new token per row, reading the prompt
     only through the KV cache;
  3. merge the newcomers' cache rows into the running cache (kvcache.merge), drop finished rows at once, and
     trim cache columns that have become padding in every row.
Every running request gets exactly one TokenEvent per step.

A request's greedy output does not depend on the rest of the batch: rows are left-padded, the 2-D attention
mask hides every padding column, and position ids count each row's own real tokens (0 for the first prompt
token whatever the padding). Only float rounding differs between batch shapes; tests/test_engine.py measures how
often that flips a near-tie. Sampling uses one torch.Generator per request, so a seed gives the same text alone
or batched (up to the same rounding).

Thread-safety: add() and cancel() may be called from another thread than step() (an asyncio loop while step runs
in a worker thread). add() never waits for a step; cancel() of a running request waits for the step in progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import InputError
from service.generation import kvcache
from service.generation.detokenizer import IncrementalDecoder, TokenBytes, make_decoder, token_text
from service.generation.sampling import Sampler, SamplingParams, choose_greedy_batch, validate
from service.generation.stopping import STOP_SEQUENCE, StopChecker
from service.protocol import TokenEvent

__all__ = ["Engine", "SamplingParams", "TokenEvent", "generate"]

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: requests are compared with `in` on the batch list
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    stopper: StopChecker
    decoder: IncrementalDecoder
    queued_at: float
    generated: int = 0
    next_token: int = -1        # the token to feed at the next decode step (sampled, not yet in the cache)
    finished: bool = False
    prefill: list[dict[str, Any]] | None = field(default=None)


def _context_length(model: PreTrainedModel) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__}")


class Engine:
    """Continuous-batching generation over one model. Not a server: the worker calls step() in a loop and
    routes each TokenEvent to its request."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str = "cpu",
                 max_batch_size: int = 32) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self._context = _context_length(model)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.eos_token_id: int | None = eos if isinstance(eos, int) else None
        self._pad_id = self.eos_token_id if self.eos_token_id is not None else 0  # any id: pads are masked
        self._special = set(tokenizer.all_special_ids)
        self._vocab = int(model.config.vocab_size)
        self._bytes = TokenBytes(tokenizer)

        self._queue_lock = threading.Lock()     # guards _waiting and _ids; held for microseconds
        self._step_lock = threading.RLock()     # guards the running batch; held for a whole step
        self._waiting: OrderedDict[str, _Request] = OrderedDict()
        self._ids: set[str] = set()             # waiting or running: duplicates are a caller bug
        self._running: list[_Request] = []      # row i of the cache is _running[i]
        self._admitting: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # real tokens in the cache, per row

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def context_length(self) -> int:
        return self._context

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting)

    def has_request(self, request_id: str) -> bool:
        """True while the request is waiting or running; False once it finished, was cancelled or failed."""
        return request_id in self._ids

    @property
    def cache_columns(self) -> int:
        """Width of the running KV cache (for tests and metrics: it must shrink when long requests leave)."""
        return kvcache.seq_len(self._cache) if self._cache is not None else 0

    # ------------------------------------------------------------------------------------------ admission
    def add(self, request_id: str, prompt: str, params: SamplingParams) -> int:
        """Queue a request; returns its prompt token count. Raises InputError(field="inputs") if the prompt is
        empty or too long, InputError(field="max_new_tokens") if prompt + max_new_tokens exceeds the context,
        InputError(field=<param>) for an out-of-range parameter, ValueError for a request_id already queued."""
        validate(params)
        if not prompt:
            raise InputError("`inputs` cannot be empty", "inputs")
        # verbose=False: the wrapper would log a warning for every over-long prompt; we reject those below.
        ids: list[int] = self.tokenizer(prompt, verbose=False)["input_ids"]
        n = len(ids)
        if n == 0:
            raise InputError("`inputs` cannot be empty", "inputs")
        if n >= self._context:
            raise InputError(f"`inputs` must have less than {self._context} tokens. Given: {n}", "inputs")
        if n + params.max_new_tokens > self._context:
            raise InputError(f"`inputs` tokens + `max_new_tokens` must be <= {self._context}. "
                             f"Given: {n} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`",
                             "max_new_tokens")
        req = _Request(
            request_id=request_id, prompt_ids=ids, params=params,
            sampler=Sampler(params, self._vocab, ids, self.device),
            stopper=StopChecker(params.stop, params.max_new_tokens, self.eos_token_id),
            decoder=make_decoder(self.tokenizer, self._bytes, ids), queued_at=time.monotonic())
        with self._queue_lock:
            if request_id in self._ids:
                raise ValueError(f"request_id {request_id!r} is already queued or running")
            self._ids.add(request_id)
            self._waiting[request_id] = req
        return n

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request at once (client gone). False if unknown or already finished."""
        with self._queue_lock:
            if self._waiting.pop(request_id, None) is not None:
                self._ids.discard(request_id)
                return True
        with self._step_lock:
            for req in self._running:
                if req.request_id == request_id:
                    req.finished = True
                    self._drop_finished()
                    log.info("cancelled request_id=%s generated=%d", request_id, req.generated)
                    return True
        return False

    # ----------------------------------------------------------------------------------------------- step
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests up to max_batch_size, run one decode forward for the running ones (plus one
        prefill forward for those just admitted), return one event per running request. If the model raises,
        the running batch is dropped (its requests are lost; the caller fails them) and the error re-raised."""
        with self._step_lock:
            try:
                return self._step()
            except BaseException:
                lost = self._running + [r for r in self._admitting if r not in self._running]
                log.exception("step failed running=%d admitted=%d; dropping them", len(self._running),
                              len(self._admitting))
                with self._queue_lock:
                    for req in lost:
                        self._ids.discard(req.request_id)
                self._running, self._cache, self._admitting = [], None, []
                self._lengths = self._lengths[:0]
                raise

    @torch.inference_mode()
    def _step(self) -> list[TokenEvent]:
        admitted: list[_Request] = []
        with self._queue_lock:
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popitem(last=False)[1])
        self._admitting = admitted  # out of the queue, not yet in the batch: step()'s error path must see them

        events: list[TokenEvent] = []
        if self._running:
            events += self._decode()
        if admitted:
            events += self._prefill(admitted)
        self._drop_finished()
        self._admitting = []
        return events

    def _decode(self) -> list[TokenEvent]:
        """One token for every running row, feeding each row's last token against the cache."""
        assert self._cache is not None
        rows = len(self._running)
        width = kvcache.seq_len(self._cache)
        cols = torch.arange(width + 1, device=self.device)
        # Row i's real tokens are its last lengths[i] cache columns, plus the new one at column `width`.
        mask = (cols.unsqueeze(0) >= (width - self._lengths).unsqueeze(1)).long()
        input_ids = torch.tensor([r.next_token for r in self._running], device=self.device).view(rows, 1)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=self._lengths.view(rows, 1),
                         cache=self._cache, use_cache=True)
        self._cache = out.cache
        self._lengths = self._lengths + 1
        return self._choose(self._running, out.logits[:, -1, :])

    def _prefill(self, admitted: list[_Request]) -> list[TokenEvent]:
        """Run the newcomers' prompts as one left-padded batch, pick their first tokens, merge their cache rows."""
        lengths = [len(r.prompt_ids) for r in admitted]
        width = max(lengths)
        ids = torch.full((len(admitted), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(admitted), width), dtype=torch.long)
        for i, r in enumerate(admitted):
            ids[i, width - lengths[i] :] = torch.tensor(r.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a left-padded row sees the same positions as when alone.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        want_prefill = any(r.params.want_prefill for r in admitted)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         cache=DynamicCache(config=self.model.config), use_cache=True,
                         logits_to_keep=0 if want_prefill else 1)
        new_cache: DynamicCache = out.cache
        kvcache.check_supported(new_cache)
        if want_prefill:
            self._fill_prefill_details(admitted, out.logits, width)
        events = self._choose(admitted, out.logits[:, -1, :])

        new_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._lengths = new_cache, new_lengths
        else:
            self._cache = kvcache.merge(self._cache, new_cache)
            self._lengths = torch.cat([self._lengths, new_lengths])
        self._running.extend(admitted)
        waited = [time.monotonic() - r.queued_at for r in admitted]
        log.debug("admitted n=%d running=%d width=%d max_wait_ms=%.1f", len(admitted), len(self._running),
                  kvcache.seq_len(self._cache), 1000 * max(waited))
        return events

    def _fill_prefill_details(self, admitted: list[_Request], logits: torch.Tensor, width: int) -> None:
        """TGI's details.prefill: each prompt token with the logprob the model gave it (none for the first)."""
        for i, r in enumerate(admitted):
            if not r.params.want_prefill:
                continue
            n = len(r.prompt_ids)
            offset = width - n
            ids = torch.tensor(r.prompt_ids[1:], device=logits.device)
            # Row positions offset .. width-2 predict prompt tokens 1 .. n-1.
            logprobs = torch.log_softmax(logits[i, offset : width - 1, :].float(), dim=-1)
            picked = logprobs.gather(1, ids.view(-1, 1)).view(-1).tolist() if n > 1 else []
            r.prefill = [{"id": tid, "text": token_text(self.tokenizer, self._bytes, tid),
                          "logprob": None if j == 0 else picked[j - 1]} for j, tid in enumerate(r.prompt_ids)]

    # ------------------------------------------------------------------------------------------- choosing
    def _choose(self, reqs: list[_Request], logits: torch.Tensor) -> list[TokenEvent]:
        """Pick one token per row (batched argmax for plain greedy rows, per-request sampler otherwise) and turn
        each into a TokenEvent, finishing requests as they stop."""
        tokens: list[int] = [0] * len(reqs)
        logprobs: list[float] = [0.0] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.sampler.is_plain_greedy]
        if greedy:
            rows = logits if len(greedy) == len(reqs) else logits[torch.tensor(greedy, device=logits.device)]
            best, best_lp = choose_greedy_batch(rows)
            for j, i in enumerate(greedy):
                tokens[i], logprobs[i] = best[j], best_lp[j]
        for i, r in enumerate(reqs):
            if not r.sampler.is_plain_greedy:
                tokens[i], logprobs[i] = r.sampler.choose(logits[i])
        return [self._emit(r, tokens[i], logprobs[i]) for i, r in enumerate(reqs)]

    def _emit(self, req: _Request, token: int, logprob: float) -> TokenEvent:
        special = token in self._special
        piece = token_text(self.tokenizer, self._bytes, token) if special else req.decoder.push(token)
        req.sampler.observe(token)
        verdict = req.stopper.update(token, piece, special)
        text, reason = verdict.text, verdict.finish_reason
        generated_text: str | None = None
        if reason is not None:
            if reason != STOP_SEQUENCE and not special:
                # Bytes of a character the limit cut in half: emit them (as U+FFFD) so the pieces still add up.
                tail = req.decoder.flush()
                text += tail
                req.stopper.finish_text(tail)
            generated_text = req.stopper.text
            req.finished = True
        event = TokenEvent(
            request_id=req.request_id, index=req.generated, token_id=token, text=text, logprob=logprob,
            special=special, finish_reason=reason, generated_text=generated_text,
            prompt_tokens=len(req.prompt_ids), seed=req.sampler.seed,
            prefill=req.prefill if req.generated == 0 and req.params.want_prefill else None)
        req.generated += 1
        req.next_token = token
        return event

    # -------------------------------------------------------------------------------------------- cleanup
    def _drop_finished(self) -> None:
        """Remove finished rows from the batch and the cache, then trim columns that are padding in every row."""
        if not any(r.finished for r in self._running):
            return
        keep = [i for i, r in enumerate(self._running) if not r.finished]
        with self._queue_lock:
            for r in self._running:
                if r.finished:
                    self._ids.discard(r.request_id)
        if not keep:
            self._running, self._cache = [], None
            self._lengths = self._lengths[:0]
            return
        assert self._cache is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        kvcache.select_rows(self._cache, index)
        self._running = [self._running[i] for i in keep]
        self._lengths = self._lengths[index]
        width = kvcache.seq_len(self._cache)
        kvcache.trim_left(self._cache, width - int(self._lengths.max().item()))


def generate(engine: Engine, prompt: str, params: SamplingParams, request_id: str = "generate") -> list[TokenEvent]:
    """Run one request to completion on an otherwise idle engine and return its events (tests, benches).
    Raises RuntimeError if the engine has other work: their events would be lost."""
    if engine.has_work():
        raise RuntimeError("generate() needs an idle engine")
    engine.add(request_id, prompt, params)
    events: list[TokenEvent] = []
    while engine.has_work():
        events += engine.step()
    return events
