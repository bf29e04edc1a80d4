"""The worker loop of a generation model (gpt2): continuous batching through generation.Engine.

Three tasks share one engine: intake reads new requests from the stream and adds them between decoding
steps; the stepper runs one engine step at a time (off the event loop) and streams each token back on
its caller's reply stream; the canceller drops sequences whose client went away. A request stays
pending in the consumer group for its whole generation, so the loop keeps re-claiming its own in-flight
entries (resetting their idle time) to stop other workers from stealing live work; a dead worker's
entries go idle and are claimed and restarted by another replica (the gateway skips the token indexes
it already streamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis

from service.broker import keys
from service.broker.streams import Delivery, ModelQueue
from service.config import ModelSpec
from service.errors import InputError
from service.generation.engine import Engine, SamplingParams, TokenEvent
from service.protocol import OP_GENERATE, OP_V2, Reply, decode_payload, now_ms
from service.worker import v2codec
from service.worker.heartbeat import WorkerStats
from service.worker.model_thread import ModelThread

log = logging.getLogger(__name__)

PARAMS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
          "want_prefill")


def token_body(event: TokenEvent) -> bytes:
    body: dict[str, Any] = {"index": event.index, "id": event.token_id, "text": event.text,
                            "logprob": event.logprob, "special": event.special, "prompt_tokens": event.prompt_tokens,
                            "finish_reason": event.finish_reason, "generated_text": event.generated_text,
                            "generated_tokens": event.index + 1, "seed": event.seed}
    if event.prefill is not None:
        body["prefill"] = event.prefill
    return orjson.dumps(body)


class GenerationLoop:
    def __init__(self, spec: ModelSpec, redis: aioredis.Redis, queue: ModelQueue, engine: Engine,
                 stats: WorkerStats) -> None:
        self.spec = spec
        self.redis = redis
        self.queue = queue
        self.engine = engine
        self.stats = stats
        self.inflight: dict[str, Delivery] = {}
        self.v2_ids: dict[str, str | None] = {}   # requests that came through /v2 infer -> their v2 "id"
        self.version = "0"
        self.stopping = asyncio.Event()
        self.work = asyncio.Event()
        self.freed = asyncio.Event()
        self.model_thread = ModelThread()   # steps and cancels, one at a time, in order
        self.sending: asyncio.Task[None] | None = None

    def stop(self) -> None:
        self.stopping.set()

    async def serve(self) -> None:
        """Until stop(): then take no new requests, finish the sequences in hand, acknowledge, return."""
        await self.queue.ensure_group()
        tasks = [asyncio.create_task(self._intake()), asyncio.create_task(self._cancels()),
                 asyncio.create_task(self._keep_claims())]
        try:
            await self._step_forever()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # intake ------------------------------------------------------------------------------------------------
    async def _intake(self) -> None:
        while not self.stopping.is_set():
            try:
                room = self.spec.max_batch_size - self.engine.num_running - self.engine.num_waiting
                if room <= 0:   # full: wait until sequences finish
                    self.freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.freed.wait(), 0.25)
                    continue
                deliveries = await self.queue.read(count=room, block_s=0.25)
                await self.admit(deliveries)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("intake error model=%s", self.spec.name)
                await asyncio.sleep(1.0)

    async def admit(self, deliveries: list[Delivery]) -> None:
        rejected: list[tuple[str, Reply]] = []
        done: list[Delivery] = []
        for d in deliveries:
            rid = d.request_id
            reply = self._add(d)
            if reply is None:
                self.inflight[rid] = d
            else:
                self.v2_ids.pop(rid, None)
                rejected.append((d.envelope.reply_to, reply))
                done.append(d)
        await self.queue.reply_and_ack(rejected, done)
        if len(done) < len(deliveries):
            self.work.set()

    def _add(self, d: Delivery) -> Reply | None:
        """Add one request to the engine; an error reply if it cannot run."""
        rid = d.request_id
        if d.envelope.deadline_ms <= now_ms():
            return Reply.error(rid, 504, "timeout", f"request {rid} expired while queued")
        try:
            params, blob = decode_payload(d.payload)
            if d.envelope.op == OP_V2:
                params = self._from_v2(rid, blob, params.get("header_length"))
            elif d.envelope.op != OP_GENERATE:
                raise InputError(f"model {self.spec.name} only generates text", "op")
            prompt = params.get("inputs")
            if not isinstance(prompt, str):
                raise InputError("`inputs` must be a string", "inputs")
            sampling = SamplingParams(**{k: params[k] for k in PARAMS if params.get(k) is not None})
            self.engine.add(rid, prompt, sampling)
        except InputError as exc:
            return Reply.error(rid, exc.status, exc.error_type, exc.message, exc.field)
        except (TypeError, ValueError) as exc:
            return Reply.error(rid, 422, "validation", f"bad generation request: {exc}")
        return None

    def _from_v2(self, rid: str, blob: bytes, header_length: int | None) -> dict[str, Any]:
        """An Open Inference Protocol request: one BYTES `text_input`, generation parameters in `parameters`."""
        request, tensors = v2codec.decode_request(blob, header_length)
        text = tensors.get("text_input")
        if text is None or text.size != 1:
            raise InputError("expected one BYTES input `text_input` holding one prompt", "inputs")
        parameters = request.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError("`parameters` must be an object", "parameters")
        value = text.reshape(-1)[0]
        request_id = request.get("id")
        self.v2_ids[rid] = request_id if isinstance(request_id, str) else None
        return {**{k: parameters[k] for k in PARAMS if k in parameters},
                "inputs": value.decode(errors="replace") if isinstance(value, bytes) else str(value)}

    def v2_reply(self, event: TokenEvent) -> Reply:
        text = np.array([(event.generated_text or "").encode()], dtype=object)
        body = v2codec.encode_response(self.spec.name, self.version, self.v2_ids.pop(event.request_id, None),
                                       {"text_output": text}, None)
        return Reply(event.request_id, 200, body)

    # stepping ----------------------------------------------------------------------------------------------
    async def _step_forever(self) -> None:
        try:
            await self._step_loop()
        finally:
            await self._sent()

    async def _sent(self) -> None:
        """Wait for the previous step's replies to be in Redis (they are sent while the next step computes)."""
        if self.sending is not None:
            try:
                await self.sending
            except Exception:   # noqa: BLE001 - Redis away: those entries stay pending and are redelivered
                log.exception("sending replies failed model=%s", self.spec.name)
            self.sending = None

    async def _step_loop(self) -> None:
        while not (self.stopping.is_set() and not self.engine.has_work() and not self.inflight):
            if not self.engine.has_work():
                self.work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.work.wait(), 0.25)
                await self._expire()
                continue
            try:
                events = await self.model_thread.run(self.engine.step)
            except Exception:   # noqa: BLE001 - the engine dropped its running batch: fail those, keep serving
                lost = [d for rid, d in self.inflight.items() if not self.engine.has_request(rid)]
                await self._finish([(d, Reply.error(d.request_id, 500, "generation",
                                                    f"generation failed for request {d.request_id}")) for d in lost])
                continue
            self.stats.record_batch(len(events))
            self.stats.active = self.engine.num_running
            replies: list[tuple[str, Reply]] = []
            finished: list[Delivery] = []
            for event in events:
                d = self.inflight.get(event.request_id)
                if d is None:
                    continue
                final = event.finish_reason is not None
                if event.request_id in self.v2_ids:   # v2 answers once, with the whole text
                    if final:
                        replies.append((d.envelope.reply_to, self.v2_reply(event)))
                else:
                    replies.append((d.envelope.reply_to, Reply(event.request_id, 200, token_body(event), final)))
                if final:
                    finished.append(self.inflight.pop(event.request_id))
            if finished:
                self.freed.set()
            # Send this step's tokens while the next step computes; one send at a time keeps them in order.
            await self._sent()
            self.sending = asyncio.create_task(self.queue.reply_and_ack(replies, finished))
            await self._expire()

    async def _finish(self, answered: list[tuple[Delivery, Reply]]) -> None:
        self.freed.set()
        for d, _ in answered:
            self.inflight.pop(d.request_id, None)
            self.v2_ids.pop(d.request_id, None)
        await self.queue.reply_and_ack([(d.envelope.reply_to, r) for d, r in answered], [d for d, _ in answered])

    async def _expire(self) -> None:
        """Sequences past their deadline: nobody waits for them any more."""
        now = now_ms()
        late = [d for d in self.inflight.values() if d.envelope.deadline_ms <= now]
        for d in late:
            await self.model_thread.run(self.engine.cancel, d.request_id)
        if late:
            await self._finish([(d, Reply.error(d.request_id, 504, "timeout", f"request {d.request_id} passed "
                                                "its deadline while generating")) for d in late])
        self.stats.active = self.engine.num_running

    # cancellation and claims -------------------------------------------------------------------------------
    async def _cancels(self) -> None:
        stream = keys.cancel_stream(self.spec.name)
        last: Any = b"$"
        with contextlib.suppress(Exception):
            newest: Any = await self.redis.xrevrange(stream, count=1)
            last = newest[0][0] if newest else b"0-0"
        while True:
            try:
                res: Any = await self.redis.xread({stream: last}, count=100, block=500)
            except asyncio.CancelledError:
                raise
            except Exception:   # noqa: BLE001 - Redis away: cancels resume when it is back
                await asyncio.sleep(1.0)
                continue
            for entry_id, fields in (res[0][1] if res else []):
                last = entry_id
                rid = fields.get(b"id", b"").decode()
                d = self.inflight.get(rid)
                if d is not None and await self.model_thread.run(self.engine.cancel, rid):
                    log.info("client gone model=%s id=%s", self.spec.name, rid)
                    await self._finish([(d, Reply.error(rid, 499, "cancelled", "the client went away"))])
                    self.stats.active = self.engine.num_running

    async def _keep_claims(self) -> None:
        """Reset the idle time of our in-flight entries (so nobody reclaims live work) and take over the
        entries of dead workers (they restart here)."""
        every = max(0.2, self.spec.visibility_timeout_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                if self.inflight:
                    await self.redis.xclaim(self.queue.stream, keys.GROUP, self.queue.consumer, 0,
                                            [d.entry_id for d in self.inflight.values()], justid=True)
                if self.stopping.is_set():
                    continue
                claimed, exhausted = await self.queue.reclaim(int(self.spec.visibility_timeout_s * 1000),
                                                              self.spec.max_tries)
                await self.queue.dead_letter(exhausted, "delivered too many times; its worker died on it")
                await self.admit(claimed)
            except asyncio.CancelledError:
                raise
            except Exception:   # noqa: BLE001 - logged; the next round tries again
                log.exception("claim upkeep failed model=%s", self.spec.name)


async def build_generation_loop(spec: ModelSpec, redis: aioredis.Redis, worker_id: str, version_dir: Path | None,
                                manifest: dict[str, Any], device: str,
                                stats: WorkerStats) -> tuple[GenerationLoop, str, dict[str, Any]]:
    """Load the model (a store artifact, or options.source: a hub id or a save_pretrained directory)."""
    from models.gpt2.loader import load

    source = spec.options.get("source") or version_dir
    if source is None:
        raise ValueError(f"model {spec.name} needs an artifact or options.source")
    started = time.perf_counter()
    model, tokenizer = load(source, device, spec.threads)
    engine = Engine(model, tokenizer, device=device, max_batch_size=spec.max_batch_size)
    version = str(manifest.get("version") or spec.options.get("source") or "0")
    info = {"name": spec.name, "version": version, "platform": "pytorch_transformers", "kind": "generation",
            "context_length": engine.context_length, "max_batch_size": spec.max_batch_size,
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
            "manifest": {k: manifest[k] for k in ("version", "metrics", "quick") if k in manifest}}
    serving = GenerationLoop(spec, redis, ModelQueue(redis, spec.name, worker_id), engine, stats)
    serving.version = version
    log.info("generation engine ready model=%s context=%d ms=%.0f", spec.name, engine.context_length,
             (time.perf_counter() - started) * 1000)
    return serving, version, info
