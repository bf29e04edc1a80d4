"""Continuous batching, the scheduler of language models (LanguageModel): new requests join the running batch
between decoding steps, finished ones leave at once, and every step's tokens stream back as they are made.

Two tasks share one engine: intake reads new requests (and takes reclaimed ones) as room frees up, and the stepper
runs one engine step at a time (decoding steps on a CPU on the loop's own thread, see INLINE_STEP_UNDER_S) and sends
each token to its caller. A request stays pending in the consumer group for its whole generation; the shell keeps it
claimed, so no other worker steals live work, and a dead worker's requests are reclaimed and restarted elsewhere
(the gateway skips the token indexes it already has).

Priority: intake reads only as many requests as the engine has free slots (max_batch_size less running and waiting),
through the shell's ModelQueue, which takes the highest lanes first and every 4th read `low` first
(broker/consumer.py); the rest wait on their lanes in Redis. So a free slot goes to `high` before `normal` and `low`,
with the batch workers' bound against starvation: a `low` request at the head of its lane is admitted within 4
admissions (tests/test_generation_priority.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from pydantic import ValidationError

from inferline.server import tracing
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.delivery import Delivery
from inferline.server.errors import (
    Cancelled,
    DeadlineExceeded,
    GenerationFailed,
    InferlineError,
    InputError,
    MalformedInput,
    ValidationFailed,
    describe_validation,
)
from inferline.server.generation.engine import ERROR, Engine
from inferline.server.generation.params import SamplingParams
from inferline.server.logs import RepeatingError
from inferline.server.model import LanguageModel
from inferline.server.protocol import OP_GENERATE, OP_TOKENIZE, OP_V2, Reply, TokenEvent, TokenSpan, decode_payload
from inferline.server.tasks import cancel_and_wait
from inferline.server.tensors import datatype_of
from inferline.server.worker import v2codec
from inferline.server.worker.model_thread import ModelThread
from inferline.server.worker.prompts import prompt_of, tokenize
from inferline.server.worker.shell import Shell, expire
from inferline.server.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

# On a CPU, decoding steps shorter than this run on the event loop's own thread. The engine's Python and the loop's
# Redis work hold the same GIL either way, and handing each step to the model thread and back cost more than the
# overlap won (bench_engine, gpt2 of the demo's size: 8 streams 1,310 -> 1,562 tok/s, 32 streams 2,344 -> 2,976).
# A step that admits newcomers, a longer one (a long prefill, a large model) and every step on a GPU go to the model
# thread: meanwhile the loop keeps reading arrivals and beating, and its Redis I/O overlaps the kernels.
INLINE_STEP_UNDER_S = 0.25
# Between inline steps the loop turns at most this often: a turn costs ~45 µs (a select, the replies' reader), 5% of
# a lone stream's step here. Short steps (a small model, one stream) take two or more in a row.
TURN_EVERY_S = 0.001


class ContinuousBatching:
    cancellable = True

    def __init__(self, shell: Shell, model: LanguageModel, engine: Engine, max_batch_size: int,
                 watchdog: Watchdog) -> None:
        self.shell = shell
        self.watchdog = watchdog   # times every step: a hung one fails the sequences in the engine, the worker leaves
        self.model = model
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.name = shell.name
        # The requests in the engine, by id: this scheduler's own view (the shell keeps them claimed until answered).
        self.running: dict[str, Delivery] = {}
        self.v2_ids: dict[str, str | None] = {}   # requests that came through /v2 infer -> their v2 "id"
        self.admitted: dict[str, int] = {}          # request id -> when it joined the engine (epoch ns)
        self.work = asyncio.Event()
        self.freed = asyncio.Event()
        self.model_thread = ModelThread()          # long steps and cancels, one at a time, in order
        self.on_cpu = engine.device.type == "cpu"
        self.inline = self.on_cpu                  # the next decoding step may run on the loop's thread
        self.turned = 0.0                          # when the loop last turned between inline steps

    async def run(self) -> None:
        """Until the shell stops: then take no new requests, finish the sequences in hand, return."""
        intake = asyncio.create_task(self._intake())
        try:
            while not (self.shell.stopping and not self.engine.has_work() and not self.running):
                if not self.engine.has_work():
                    self.work.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.work.wait(), 0.25)
                else:
                    await self.step()
                await self._expire()
        finally:
            await cancel_and_wait([intake])

    async def cancel(self, request_id: str) -> bool:
        d = self.running.get(request_id)
        if d is None or not await self.model_thread.run(self.engine.cancel, request_id):
            return False
        await self._finish([(d, Reply.error(request_id, Cancelled("the client went away")))])
        return True

    # intake ----------------------------------------------------------------------------------------------------
    async def _intake(self) -> None:
        errors = RepeatingError(log, f"intake model={self.name}", BROKER_ERRORS)
        while not self.shell.stopping:
            try:
                await self.admit(self.shell.take_reclaimed())
                room = self.max_batch_size - self.engine.num_running - self.engine.num_waiting
                if room <= 0:   # full: wait until sequences finish
                    self.freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.freed.wait(), 0.25)
                    continue
                await self.admit(await self.shell.take(room, 0.25))
                errors.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # noqa: BLE001 - nothing was acknowledged: what was read is redelivered
                errors.failed(exc)
                await asyncio.sleep(1.0)

    async def admit(self, deliveries: list[Delivery]) -> None:
        live, answers = self.shell.triage(deliveries)   # not past its deadline, its caller not gone
        for d in live:
            try:
                if d.envelope.op == OP_TOKENIZE:   # answered at once: no engine work
                    params, _ = decode_payload(d.payload)
                    answers.append((d, Reply(d.request_id, TokenSpan.encode_all(tokenize(self.engine.tokenizer,
                                                                                         params)))))
                    continue
                self._add(d)
                self.running[d.request_id] = d
                self.admitted[d.request_id] = time.time_ns()
            except InferlineError as exc:
                self.v2_ids.pop(d.request_id, None)
                answers.append((d, Reply.error(d.request_id, exc)))
            except (TypeError, ValueError) as exc:
                answers.append((d, Reply.error(d.request_id, ValidationFailed(f"bad generation request: {exc}"))))
        await self.shell.answer(answers, [d for d, _ in answers])   # none of them joined the engine
        if len(answers) < len(deliveries):
            self.work.set()

    def _add(self, d: Delivery) -> None:
        params, blob = decode_payload(d.payload)
        if d.envelope.op == OP_V2:
            params = self._from_v2(d.request_id, blob, params.get("header_length"))
        elif d.envelope.op != OP_GENERATE:
            raise InputError(f"model {self.name} only generates text", "op")
        prompt = prompt_of(self.model, params, self.engine.context_length)
        self.engine.add(d.request_id, prompt, sampling_params(params))

    def _from_v2(self, rid: str, blob: bytes, header_length: int | None) -> dict[str, Any]:
        """An Open Inference Protocol request: one BYTES `text_input`, generation parameters in `parameters`."""
        request, tensors = v2codec.decode_request(blob, header_length)
        text = tensors.get("text_input")
        if text is None or text.size != 1:
            raise InputError("expected one BYTES input `text_input` holding one prompt", "inputs")
        if text.dtype != object:   # numbers are not a prompt: refused, never stringified
            raise MalformedInput(f"input `text_input` has datatype {datatype_of(text)}; model expects BYTES",
                                 "text_input")
        parameters = request.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError("`parameters` must be an object", "parameters")
        value = text.reshape(-1)[0]
        request_id = request.get("id")
        self.v2_ids[rid] = request_id if isinstance(request_id, str) else None
        return {**parameters, "inputs": value.decode(errors="replace") if isinstance(value, bytes) else str(value)}

    # stepping --------------------------------------------------------------------------------------------------
    async def step(self) -> None:
        try:
            started = time.perf_counter()
            if self.inline and not self.engine.num_waiting:
                if started - self.turned >= TURN_EVERY_S:
                    # A turn of the loop before holding it for the step: what Redis answered meanwhile is read,
                    # arrivals, cancels and beats get their turn. The last step's tokens are on the wire already.
                    await asyncio.sleep(0)
                    self.turned = time.perf_counter()
                with self.watchdog.watching(list(self.running.values())):
                    events = self.engine.step()
            else:
                with self.watchdog.watching(list(self.running.values())):
                    events = await self.model_thread.run(self.engine.step)
            took = time.perf_counter() - started
            self.inline = self.on_cpu and took < INLINE_STEP_UNDER_S
        except Exception:   # noqa: BLE001 - the engine dropped its running batch: fail those, keep serving
            lost = [d for rid, d in self.running.items() if not self.engine.has_request(rid)]
            await self._finish([(d, Reply.error(d.request_id, GenerationFailed(
                f"generation failed for request {d.request_id}"))) for d in lost])
            return
        self.shell.record_batch(len(events))
        self.shell.record_running(self.engine.num_running)
        answers: list[tuple[Delivery, Reply]] = []
        finished: list[Delivery] = []
        for event in events:
            d = self.running.get(event.request_id)
            if d is None:
                continue
            final = event.finish_reason is not None
            if event.finish_reason == ERROR:   # this request failed alone (e.g. its sampling broke); the rest go on
                self.v2_ids.pop(event.request_id, None)
                answers.append((d, Reply.error(event.request_id,
                                               GenerationFailed(event.error or "generation failed"))))
            elif event.request_id in self.v2_ids:   # v2 answers once, with the whole text
                if final:
                    answers.append((d, self.timed(d, self.v2_reply(event), event.index + 1)))
            elif final:
                answers.append((d, self.timed(d, Reply(event.request_id, event.encode()), event.index + 1)))
            else:
                answers.append((d, Reply(event.request_id, event.encode(), final=False)))
            if final:
                finished.append(d)
                del self.running[event.request_id]
        if finished:
            self.freed.set()
        self.shell.record_work(len(finished), took)
        await self.shell.answer(answers, finished)

    def timed(self, d: Delivery, reply: Reply, tokens: int) -> Reply:
        """A finished request's last reply, with where its time went: queued until admission, then generating."""
        now = time.time_ns()
        admitted = self.admitted.pop(d.request_id, now)
        queued = float(max(0, admitted // 1_000_000 - d.arrived_ms))
        if tracing.ENABLED:
            tracing.record_generation(self.name, d.request_id, d.envelope.traceparent, admitted, now, queued, tokens)
        return reply.timed(queued, (now - admitted) / 1e6, tokens=tokens)

    def v2_reply(self, event: TokenEvent) -> Reply:
        text = np.array([(event.generated_text or "").encode()], dtype=object)
        body = v2codec.encode_response(self.name, self.model.version, self.v2_ids.pop(event.request_id, None),
                                       {"text_output": text}, None)
        return Reply(event.request_id, body)

    async def _finish(self, answered: list[tuple[Delivery, Reply]]) -> None:
        self.freed.set()
        for d, _ in answered:
            self.running.pop(d.request_id, None)
            self.v2_ids.pop(d.request_id, None)
            self.admitted.pop(d.request_id, None)
        await self.shell.answer(answered, [d for d, _ in answered])
        self.shell.record_running(self.engine.num_running)

    async def _expire(self) -> None:
        """Sequences past their deadline: nobody waits for them any more."""
        _, late = expire(list(self.running.values()))
        for d, _ in late:
            await self.model_thread.run(self.engine.cancel, d.request_id)
        if late:
            await self._finish([(d, Reply.error(d.request_id, DeadlineExceeded(
                f"request {d.request_id} passed its deadline while generating"))) for d, _ in late])


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    """The request's generation parameters (what the gateway's schemas produced), validated once more by the same
    type: a worker may be reached by other gateways or by hand. Raises InputError naming the field."""
    try:
        return SamplingParams.model_validate(params)
    except ValidationError as exc:
        message, field = describe_validation(exc.errors(include_url=False))
        raise InputError(message, field=field) from None
