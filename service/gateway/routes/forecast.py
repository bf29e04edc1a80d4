from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.gateway.routes.common import json_body, parse_json, run_task
from service.schemas.tasks import ForecastRequest

router = APIRouter(tags=["tasks"])


@router.post("/forecast", summary="Forecast the next `horizon` values of a time series (lstm)",
             openapi_extra=json_body(ForecastRequest))
async def forecast(request: Request) -> Response:
    body = await parse_json(request, ForecastRequest)
    return await run_task(request, "lstm", body.to_params())
