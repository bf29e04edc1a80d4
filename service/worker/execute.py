"""Runs one batch of deliveries through a Runtime: decode each (a bad item fails alone), one
predict_batch for the rest, encode each answer. Synchronous: the loop calls it off the event loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson

from service.broker.streams import Delivery
from service.errors import InputError
from service.protocol import OP_TASK, OP_V2, Reply, decode_payload
from service.runtimes.base import Runtime, TaskRequest
from service.worker import v2codec

log = logging.getLogger(__name__)


class Decoded:
    """A delivery after decoding: what the runtime prepared, plus what encoding its answer needs."""

    __slots__ = ("delivery", "prepared", "task", "v2_request", "v2_outputs")

    def __init__(self, delivery: Delivery, prepared: Any, task: TaskRequest | None = None,
                 v2_request: dict[str, Any] | None = None, v2_outputs: list[str] | None = None) -> None:
        self.delivery = delivery
        self.prepared = prepared
        self.task = task
        self.v2_request = v2_request
        self.v2_outputs = v2_outputs


class Executor:
    def __init__(self, runtime: Runtime[Any, Any], model: str) -> None:
        self.runtime = runtime
        self.model = model
        self.v2_output_names = [t.name for t in runtime.v2_outputs()]

    def run(self, deliveries: Sequence[Delivery]) -> list[Reply]:
        """One reply per delivery, in order. Never raises: a failure becomes that item's error reply."""
        replies: dict[str, Reply] = {}
        ready: list[Decoded] = []
        for d in deliveries:
            try:
                ready.append(self.decode(d))
            except InputError as exc:
                replies[d.request_id] = Reply.error(d.request_id, exc.status, exc.error_type, exc.message, exc.field)
            except Exception:
                log.exception("decode failed model=%s id=%s", self.model, d.request_id)
                replies[d.request_id] = Reply.error(d.request_id, 500, "internal",
                                                    "the worker could not decode this request")
        if ready:
            for item, reply in zip(ready, self.predict(ready), strict=True):
                replies[item.delivery.request_id] = reply
        return [replies[d.request_id] for d in deliveries]

    def decode(self, d: Delivery) -> Decoded:
        params, blob = decode_payload(d.payload)
        if d.envelope.op == OP_TASK:
            task = TaskRequest(params=params, blob=blob)
            return Decoded(d, self.runtime.preprocess(task), task=task)
        if d.envelope.op == OP_V2:
            request, tensors = v2codec.decode_request(blob, params.get("header_length"))
            outputs = v2codec.requested_outputs(request, self.v2_output_names)
            parameters = request.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise InputError("`parameters` must be an object", field="parameters")
            return Decoded(d, self.runtime.v2_preprocess(tensors, parameters), v2_request=request, v2_outputs=outputs)
        raise InputError(f"op {d.envelope.op!r} is not served by model {self.model}", field="op")

    def predict(self, items: list[Decoded]) -> list[Reply]:
        try:
            outputs = self.runtime.predict_batch([i.prepared for i in items])
        except InputError as exc:
            if len(items) > 1:
                return [r for i in items for r in self.predict([i])]
            rid = items[0].delivery.request_id
            return [Reply.error(rid, exc.status, exc.error_type, exc.message, exc.field)]
        except Exception:
            if len(items) > 1:   # find the item that breaks the model; its batch-mates still get answers
                log.warning("batch failed model=%s size=%d; retrying items one by one", self.model, len(items))
                return [r for i in items for r in self.predict([i])]
            rid = items[0].delivery.request_id
            log.exception("predict failed model=%s id=%s", self.model, rid)
            return [Reply.error(rid, 500, "generation", f"model {self.model} failed on request {rid}")]
        return [self.encode(i, out) for i, out in zip(items, outputs, strict=True)]

    def encode(self, item: Decoded, output: Any) -> Reply:
        rid = item.delivery.request_id
        try:
            if item.task is not None:
                body = orjson.dumps(self.runtime.postprocess(output, item.task), option=orjson.OPT_SERIALIZE_NUMPY)
            else:
                assert item.v2_request is not None
                request_id = item.v2_request.get("id")
                body = v2codec.encode_response(self.model, self.runtime.version,
                                               request_id if isinstance(request_id, str) else None,
                                               self.runtime.v2_postprocess(output), item.v2_outputs)
        except Exception:
            log.exception("postprocess failed model=%s id=%s", self.model, rid)
            return Reply.error(rid, 500, "generation", f"model {self.model} could not encode the answer to {rid}")
        return Reply(rid, 200, body)
