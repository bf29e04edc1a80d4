"""Text classification routes: /sentiment and /classify-text take one `text` or a list of `texts`, each served by
the deployment bound to that task. A list becomes one row per text in a single request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import Body, Handler, json_body, parse_json, run_task
from inferline.server.schemas import responses as wire
from inferline.server.schemas.tasks import SentimentRequest


def rows(req: SentimentRequest) -> dict[str, Any]:
    if req.text is not None:
        return {"row": {"text": req.text}}
    return {"rows": [{"text": t} for t in req.texts or []]}


def handler_for(task: str) -> Handler:
    async def handle(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
                     query: str) -> bytes:
        return await run_task(d, rid, task, rows(parse_json(body, SentimentRequest)))
    handle.__name__ = task.replace("-", "_")
    return handle


SENTIMENT, CLASSIFY_TEXT = "sentiment", "classify-text"   # the tasks, each bound to a deployment by config
sentiment = handler_for(SENTIMENT)
classify_text = handler_for(CLASSIFY_TEXT)


SENTIMENT_DOCS = dict(
    summary="Positive or negative: one `text`, or a list of `texts` (the `sentiment` deployment)",
    openapi_extra=json_body(SentimentRequest, {"text": "what a lovely day"}),
    **doc(wire.TextLabel | wire.TextLabels, {"model": "sentiment", "version": "1", "label": "positive",  # type: ignore[arg-type]
                                             "score": 0.93}))
CLASSIFY_TEXT_DOCS = dict(
    summary="Label one `text`, or a list of `texts`, with scores (the `classify-text` deployment)",
    openapi_extra=json_body(SentimentRequest, {"texts": ["great game", "so sad"]}),
    **doc(wire.TextLabel | wire.TextLabels, {"model": "transformer", "version": "1", "results": [  # type: ignore[arg-type]
        {"label": "positive", "score": 0.91}, {"label": "negative", "score": 0.88}]}))
