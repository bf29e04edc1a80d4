"""/classify-image: a multipart `file`, a JSON {"image": base64}, or a raw image/* body. The gateway only unwraps the
image bytes; decoding them is the worker's job (its model's `decode` hook; a bad image gets a 422)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response

from inferline.server.errors import BadRequest, ValidationFailed
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.openapi import doc
from inferline.server.gateway.record import request_id
from inferline.server.gateway.routes.common import JSON, Body, answer, run_task
from inferline.server.schemas import responses as wire
from inferline.server.schemas.tasks import ClassifyOptions

if TYPE_CHECKING:
    from inferline.server.gateway.core import Gateway

TASK = "classify-image"   # the deployment this route serves is the one configured with task = "classify-image"
OPENAPI_BODY: dict[str, Any] = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "contentMediaType": "image/*"}, "top_k": {"type": "integer", "minimum": 1}}}},
    "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "description": "base64 of a PNG/JPEG/... file"},
        "top_k": {"type": "integer", "minimum": 1}}}, "example": {"image": "iVBORw0KGgo...", "top_k": 3}},
    "image/png": {"schema": {"contentMediaType": "image/png"}},
    "image/jpeg": {"schema": {"contentMediaType": "image/jpeg"}},
    "application/octet-stream": {"schema": {"contentMediaType": "application/octet-stream"}}}},
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                    "description": "how many labels (default 5)"}]}


async def classify_image(d: Dispatcher, rid: str, body: Body, headers: Mapping[str, str], path: dict[str, str],
                 query: str) -> bytes:
    """A raw image/* body, or JSON {"image": base64, "top_k"?} (whatever the declared Content-Type)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        image, options = body, dict[str, Any]()
    else:
        image, options = from_json(body)
    return await classify(d, rid, image, {**query_options(query), **options})


DOCS = dict(summary="Classify an image (the `classify-image` deployment): top_k labels by score",
            openapi_extra=OPENAPI_BODY, **doc(wire.ImageClassification, {
                "model": "cnn", "version": "1", "predictions": [{"label": "3", "score": 0.97},
                                                                {"label": "8", "score": 0.02}]}))


async def classify_form(gw: Gateway, request: Request) -> Response:
    """Through FastAPI: a multipart upload (the hot path leaves those here), or what the hot path serves."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        return await answer(gw.dispatcher, request, classify_image)
    image, options = await from_form(request)
    body = await classify(gw.dispatcher, request_id(), image, {**query_options(request.url.query), **options})
    return Response(body, media_type=JSON)


def query_options(query: str) -> dict[str, Any]:
    return {k: v for k, v in parse_qsl(query) if k == "top_k"}


async def classify(d: Dispatcher, rid: str, image: Body, options: dict[str, Any]) -> bytes:
    if not image:
        raise ValidationFailed("`file` is empty: send a PNG/JPEG/... image", field="file")
    try:
        parsed = ClassifyOptions.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "top_k"
        raise ValidationFailed(f"`{field}`: {err['msg']}. Given: {err.get('input')!r}", field=field) from None
    return await run_task(d, rid, TASK, {"options": {"top_k": parsed.top_k}}, image)


async def from_form(request: Request) -> tuple[bytes, dict[str, Any]]:
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ValidationFailed("multipart field `file` (an image file) is required", field="file")
    image = await upload.read()
    more = {k: v for k, v in form.items() if k == "top_k" and isinstance(v, str)}
    unknown = sorted(k for k in form.keys() if k not in ("file", "top_k"))
    if unknown:
        raise ValidationFailed(f"unknown form field `{unknown[0]}`; expected `file` and optionally `top_k`",
                               field=unknown[0])
    return image, more


def from_json(body: Body) -> tuple[bytes, dict[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("body must be multipart/form-data with a `file`, an image/* body, or JSON "
                         "{\"image\": base64}", field="body") from None
    if not isinstance(data, dict):
        raise ValidationFailed("JSON body must be an object {\"image\": base64, \"top_k\"?: int}", field="body")
    encoded = data.pop("image", None)
    if not isinstance(encoded, str):
        raise ValidationFailed("`image` (a base64 string) is required", field="image")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed("`image` is not valid base64", field="image") from None
    return image, data
