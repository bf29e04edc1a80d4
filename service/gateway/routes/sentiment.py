from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.gateway.dispatch import Dispatcher
from service.gateway.routes.common import answer, json_body, parse_json, run_task
from service.schemas.tasks import SentimentRequest

router = APIRouter(tags=["tasks"])


async def handle(d: Dispatcher, rid: str, body: bytes, headers: Mapping[str, str], path: dict[str, str],
                 query: str) -> bytes:
    return await run_task(d, rid, "sentiment", parse_json(body, SentimentRequest).to_params())


@router.post("/sentiment", summary="Positive or negative: one `text`, or a list of `texts` (sentiment)",
             openapi_extra=json_body(SentimentRequest))
async def sentiment(request: Request) -> Response:
    return await answer(request, handle)
