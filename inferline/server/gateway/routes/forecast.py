from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Request
from starlette.responses import Response

from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import Body, answer, json_body, parse_json, run_task
from inferline.server.schemas import responses as wire
from inferline.server.schemas.tasks import ForecastRequest

router = APIRouter(tags=["tasks"])


async def handle(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
                 query: str) -> bytes:
    return await run_task(d, rid, "forecast", {"row": parse_json(body, ForecastRequest).model_dump()})


@router.post("/forecast", summary="Forecast the next `horizon` values of a time series (the `forecast` deployment)",
             openapi_extra=json_body(ForecastRequest, {"series": [5, 11, 16, 23, 36, 58, 29, 20, 10, 8, 3, 0],
                                                       "horizon": 3}),
             **doc(wire.Forecast, {"model": "lstm", "version": "1", "forecast": [8.1, 19.5, 33.0]}))
async def forecast(request: Request) -> Response:
    return await answer(request, handle)
