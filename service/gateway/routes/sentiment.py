from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.gateway.routes.common import json_body, parse_json, run_task
from service.schemas.tasks import SentimentRequest

router = APIRouter(tags=["tasks"])


@router.post("/sentiment", summary="Positive or negative: one `text`, or a list of `texts` (sentiment)",
             openapi_extra=json_body(SentimentRequest))
async def sentiment(request: Request) -> Response:
    body = await parse_json(request, SentimentRequest)
    return await run_task(request, "sentiment", body.to_params())
