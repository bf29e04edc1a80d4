from __future__ import annotations

from collections.abc import Mapping

from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.routes.common import Body, json_body, parse_json, run_task
from inferline.server.schemas import responses as wire
from inferline.server.schemas.tasks import ForecastRequest

TASK = "forecast"   # the deployment this route serves is the one configured with task = "forecast"
DOCS = dict(summary="Forecast the next `horizon` values of a time series (the `forecast` deployment)",
            openapi_extra=json_body(ForecastRequest, {"series": [5, 11, 16, 23, 36, 58, 29, 20, 10, 8, 3, 0],
                                                      "horizon": 3}),
            **doc(wire.Forecast, {"model": "lstm", "version": "1", "forecast": [8.1, 19.5, 33.0]}))


async def forecast(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
                   query: str) -> bytes:
    # the fields as sent (exclude_unset: no default filled in); the model's own row type validates them
    return await run_task(d, rid, TASK, {"row": parse_json(body, ForecastRequest).model_dump(exclude_unset=True)})
