"""Continuous (iteration-level) batching over a transformers causal LM with a KV cache.

step() = schedule -> forward -> choose -> update (vLLM `v1/engine/core.py` step, TGI `Batch`):
  1. admit waiting requests up to max_batch_size, and up to max_prefill_tokens prompt tokens per step (the first
     waiting request always fits, so a long prompt cannot starve);
  2. run ONE forward over a ragged batch (ragged.py): each running row's last token and each newcomer's whole
     prompt, packed into one sequence, attending per row over the engine's own KV cache (kvcache.RowCache). Admitting
     requests costs the running rows no second forward pass, only the newcomers' own tokens;
  3. choose one token per row for the whole batch at once (sampling.SamplingBatch: penalties, warpers, seeded draws,
     log-probabilities and top-n alternatives), turn each into a TokenEvent, drop finished rows from the cache.
Every running request gets exactly one TokenEvent per step.

A request's output does not depend on the rest of the batch: no row attends to another row's cache columns, and
position ids count each row's own tokens. Only float rounding differs between batch shapes; tests/test_engine.py
measures how often that flips a near-tie. Sampling uses one torch.Generator per request, so a seed gives the same
text alone or batched (up to the same rounding).

Faults: a row whose sampling fails (inf/nan scores, a failing draw, a detokenizer error) gets one last TokenEvent
with finish_reason "error" and `error` naming the request and the cause; its batch-mates carry on. Only a failure of
the forward pass itself, which cannot be blamed on one row, drops the whole running batch (step() re-raises).

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
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inferline.server.errors import InputError
from inferline.server.generation import ragged
from inferline.server.generation.detokenizer import IncrementalDecoder, TokenBytes, make_decoder, token_text
from inferline.server.generation.kvcache import RowCache
from inferline.server.generation.params import SamplingParams
from inferline.server.generation.sampling import Choice, RowSampling, SamplingBatch
from inferline.server.generation.stopping import STOP_SEQUENCE, StopChecker
from inferline.server.protocol import TokenEvent

__all__ = ["ERROR", "Engine", "SamplingParams", "TokenEvent", "generate"]

ERROR = "error"   # finish_reason of a request that failed alone (TokenEvent.error says why)

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: requests are compared with `in` on the batch list
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampling: RowSampling
    stopper: StopChecker
    decoder: IncrementalDecoder
    queued_at: float
    generated: int = 0
    next_token: int = -1        # the token to feed at the next step (chosen, not yet in the cache)
    finished: bool = False
    prefill: list[dict[str, Any]] | None = field(default=None)


def _context_length(model: PreTrainedModel) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__}")


def _num_layers(model: PreTrainedModel) -> int:
    config = model.config
    for name in ("n_layer", "num_hidden_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the layer count of {type(model).__name__}")


class Engine:
    """Continuous-batching generation over one model. Not a server: the worker calls step() in a loop and
    routes each TokenEvent to its request.

    The model's attention is switched to ragged.ragged_attention, which behaves as SDPA for any other caller
    (model.generate() on the same object still works)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str = "cpu",
                 max_batch_size: int = 32, max_prefill_tokens: int = 512) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._context = _context_length(model)
        self._layers = _num_layers(model)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.eos_token_id: int | None = eos if isinstance(eos, int) else None
        self._special = set(tokenizer.all_special_ids)
        self._vocab = int(model.config.vocab_size)
        self._bytes = TokenBytes(tokenizer)
        ragged.install(model)

        self._queue_lock = threading.Lock()     # guards _waiting and _ids; held for microseconds
        self._step_lock = threading.RLock()     # guards the running batch; held for a whole step
        self._waiting: OrderedDict[str, _Request] = OrderedDict()
        self._ids: set[str] = set()             # waiting or running: duplicates are a caller bug
        self._running: list[_Request] = []      # row i of the cache and of the sampling batch is _running[i]
        self._admitting: list[_Request] = []
        self._cache = RowCache(self._layers, self.device)
        self._sampling = SamplingBatch(self._vocab, self.device)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def context_length(self) -> int:
        return self._context

    @property
    def max_input_tokens(self) -> int:
        """The longest prompt add() takes (one position must stay free for the first generated token)."""
        return self._context - 1

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
        return self._cache.width

    # ------------------------------------------------------------------------------------------ admission
    def add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> int:
        """Queue a request; returns its prompt token count. `prompt` is text or token ids. Raises
        InputError(field="inputs") if the prompt is empty, too long or holds an id outside the vocabulary,
        InputError(field="max_new_tokens") if prompt + max_new_tokens exceeds the context, ValueError for a
        request_id already queued. `params` was validated when it was built (SamplingParams is a pydantic model)."""
        if isinstance(prompt, str):
            # verbose=False: the wrapper would log a warning for every over-long prompt; we reject those below.
            ids: list[int] = self.tokenizer(prompt, verbose=False)["input_ids"] if prompt else []
        else:
            ids = list(prompt)
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self._vocab), None)
            if bad is not None:
                raise InputError(f"`inputs` token ids must be integers in [0, {self._vocab}). Given: {bad!r}",
                                 "inputs")
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
            sampling=RowSampling(params, ids, self.device),
            stopper=StopChecker(list(params.stop), params.max_new_tokens, self.eos_token_id,
                                params.include_stop_sequence),
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
        """Admit waiting requests, run one forward pass over running rows and newcomers together, return one event
        per running request. A request that fails alone ends with an error event. If the forward pass raises, the
        running batch is dropped (its requests are lost; the caller fails them) and the error re-raised."""
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
                self._running, self._admitting = [], []
                self._cache = RowCache(self._layers, self.device)
                self._sampling = SamplingBatch(self._vocab, self.device)
                raise

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        tokens = 0
        with self._queue_lock:
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                nxt = next(iter(self._waiting.values()))
                if admitted and tokens + len(nxt.prompt_ids) > self.max_prefill_tokens:
                    break   # the rest wait a step: running rows' time per token stays bounded
                admitted.append(self._waiting.popitem(last=False)[1])
                tokens += len(nxt.prompt_ids)
        return admitted

    @torch.inference_mode()
    def _step(self) -> list[TokenEvent]:
        admitted = self._admit()
        self._admitting = admitted  # out of the queue, not yet in the batch: step()'s error path must see them
        if not self._running and not admitted:
            return []
        old = len(self._running)
        counts = [1] * old + [len(r.prompt_ids) for r in admitted]
        ids = [r.next_token for r in self._running] + [t for r in admitted for t in r.prompt_ids]
        step = ragged.RaggedStep(self._cache, counts)
        keep: torch.Tensor | None = None
        last: list[int] = []
        prefill_at: dict[int, int] = {}
        if admitted:   # a decode step keeps every position's logits: one per row
            positions, last, prefill_at = self._logit_positions(counts, admitted)
            keep = torch.tensor(positions, device=self.device)
        logits = ragged.forward(self.model, step, torch.tensor(ids, device=self.device), keep)
        self._sampling.append([r.sampling for r in admitted])
        self._running.extend(admitted)
        self._admitting = []
        for i, first in prefill_at.items():
            self._fill_prefill_details(self._running[i], logits[first : first + counts[i]])
        chosen_from = logits[torch.tensor(last, device=self.device)] if admitted else logits   # decode: all rows
        events = self._choose(self._running, chosen_from)
        if admitted:
            waited = [time.monotonic() - r.queued_at for r in admitted]
            log.debug("admitted n=%d tokens=%d running=%d width=%d max_wait_ms=%.1f", len(admitted),
                      step.num_tokens - old, len(self._running), self._cache.width, 1000 * max(waited))
        self._drop_finished()
        return events

    def _logit_positions(self, counts: list[int],
                         admitted: list[_Request]) -> tuple[list[int], list[int], dict[int, int]]:
        """Packed positions whose logits a step needs: each row's last token (its next token is chosen there), and
        every prompt position of a newcomer that asked for prefill details; the LM head is the largest matmul of a
        small model's step, so no others. Returns (positions, row -> index of its last one, newcomer row -> index of
        its first one)."""
        old = len(counts) - len(admitted)
        positions: list[int] = []
        last: list[int] = []
        prefill_at: dict[int, int] = {}
        end = -1
        for i, n in enumerate(counts):
            end += n
            if i >= old and admitted[i - old].params.want_prefill:
                prefill_at[i] = len(positions)
                positions.extend(range(end - n + 1, end + 1))
            else:
                positions.append(end)
            last.append(len(positions) - 1)
        return positions, last, prefill_at

    def _fill_prefill_details(self, req: _Request, logits: torch.Tensor) -> None:
        """TGI's details.prefill: each prompt token with the logprob the model gave it (none for the first)."""
        ids = req.prompt_ids
        picked: list[float] = []
        if len(ids) > 1:
            # Prompt position j predicts prompt token j + 1.
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            picked = logprobs.gather(1, torch.tensor(ids[1:], device=logits.device).view(-1, 1)).view(-1).tolist()
        req.prefill = [{"id": tid, "text": token_text(self.tokenizer, self._bytes, tid),
                        "logprob": None if j == 0 else picked[j - 1]} for j, tid in enumerate(ids)]

    # ------------------------------------------------------------------------------------------- choosing
    def _choose(self, reqs: list[_Request], logits: torch.Tensor) -> list[TokenEvent]:
        """One token per row, chosen for the whole batch at once; each becomes a TokenEvent (or an error event for a
        row that failed alone)."""
        try:
            choice = self._sampling.choose(logits)
        except Exception:   # noqa: BLE001 - a batch-wide failure: find the row(s) to blame, one by one
            log.exception("batched choice failed rows=%d; choosing row by row", len(reqs))
            choice = self._choose_row_by_row(logits)
        events: list[TokenEvent] = []
        for i, req in enumerate(reqs):
            if i in choice.errors:
                events.append(self._fail(req, choice.errors[i]))
                continue
            try:
                events.append(self._emit(req, choice.tokens[i], choice.logprobs[i], choice.top[i]))
            except Exception as exc:   # noqa: BLE001 - this row's detokenizing or stopping: fail it alone
                log.exception("emit failed request_id=%s", req.request_id)
                events.append(self._fail(req, f"{type(exc).__name__}: {exc}"))
        self._sampling.observe(choice.tokens)
        return events

    def _choose_row_by_row(self, logits: torch.Tensor) -> Choice:
        merged = Choice(tokens=[0] * len(logits), logprobs=[0.0] * len(logits), top=[[] for _ in logits], errors={})
        for i in range(len(logits)):
            try:
                one = self._sampling.choose(logits[i : i + 1], torch.tensor([i], device=logits.device))
            except Exception as exc:   # noqa: BLE001 - this row alone fails
                merged.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
                continue
            if one.errors:
                merged.errors[i] = one.errors[0]
            else:
                merged.tokens[i], merged.logprobs[i], merged.top[i] = one.tokens[0], one.logprobs[0], one.top[0]
        return merged

    def _fail(self, req: _Request, why: str) -> TokenEvent:
        req.finished = True
        log.warning("request failed request_id=%s index=%d: %s", req.request_id, req.generated, why)
        return TokenEvent(
            request_id=req.request_id, index=req.generated, token_id=-1, text="", logprob=float("nan"), special=False,
            finish_reason=ERROR, generated_text=None, prompt_tokens=len(req.prompt_ids), seed=req.sampling.seed,
            prefill=None, error=f"request {req.request_id} failed at token {req.generated}: {why}")

    def _emit(self, req: _Request, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent:
        special = token in self._special
        piece = token_text(self.tokenizer, self._bytes, token) if special else req.decoder.push(token)
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
        top_logprobs = None
        if req.params.top_logprobs:
            top_logprobs = [{"id": t, "text": token_text(self.tokenizer, self._bytes, t), "logprob": lp,
                             "special": t in self._special} for t, lp in top]
        event = TokenEvent(
            request_id=req.request_id, index=req.generated, token_id=token, text=text, logprob=logprob,
            special=special, finish_reason=reason, generated_text=generated_text,
            prompt_tokens=len(req.prompt_ids), seed=req.sampling.seed,
            prefill=req.prefill if req.generated == 0 and req.params.want_prefill else None,
            top_logprobs=top_logprobs, token_text=token_text(self.tokenizer, self._bytes, token))
        req.generated += 1
        req.next_token = token
        return event

    # -------------------------------------------------------------------------------------------- cleanup
    def _drop_finished(self) -> None:
        """Remove finished rows from the batch, the cache and the sampling state (the cache also trims columns that
        have become padding in every row)."""
        if not any(r.finished for r in self._running):
            return
        keep = [i for i, r in enumerate(self._running) if not r.finished]
        with self._queue_lock:
            for r in self._running:
                if r.finished:
                    self._ids.discard(r.request_id)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.select_rows(index)
        self._sampling.keep(index)
        self._running = [self._running[i] for i in keep]


def generate(engine: Engine, prompt: str | list[int], params: SamplingParams,
             request_id: str = "generate") -> list[TokenEvent]:
    """Run one request to completion on an otherwise idle engine and return its events (tests, benches).
    Raises RuntimeError if the engine has other work: their events would be lost."""
    if engine.has_work():
        raise RuntimeError("generate() needs an idle engine")
    engine.add(request_id, prompt, params)
    events: list[TokenEvent] = []
    while engine.has_work():
        events += engine.step()
    return events
