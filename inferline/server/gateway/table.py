"""The gateway's one route table. Each route declares its method and path, its handler, where its model comes from
and its docs; everything else derives from the entry:

- the hot path (hot.py) serves the routes that have a bare-ASGI `hot` handler, matched here;
- FastAPI's routes (the API document and every other request) are generated from the entries (`mount`);
- the security layer asks `model_of` which model a request is for, before anything is read or queued, and
  `admin_route` whether a request is for the management API (`admin=True`): security.py requires the `admin`
  scope for it, audit.AdminGate refuses it from anywhere but loopback while no key exists and logs every call.

Adding a route means adding one entry to ROUTES, below; the route modules hold handlers and docs, no paths."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.types import Message, Receive

from inferline.server.auth.keys import SCOPE_ADMIN
from inferline.server.config import Settings
from inferline.server.gateway import record
from inferline.server.gateway.routes import (
    admin,
    chat,
    classify,
    fleet,
    forecast,
    generate,
    health,
    kserve,
    models,
    openai,
    predict,
    repository,
    sentiment,
)
from inferline.server.gateway.routes.common import Handler, answer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from inferline.server.gateway.core import Gateway

# (the gateway, the request) -> a Response, or a value FastAPI serialises as JSON.
Endpoint = Callable[["Gateway", Request], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class ModelFrom:
    """Where a route's model comes from: a path parameter, a field of its JSON body, or the deployment that the
    configuration binds to a task (`task = "forecast"`). All None: the route serves no one model."""

    path: str | None = None
    body: str | None = None
    task: str | None = None


NO_MODEL = ModelFrom()
IN_PATH = ModelFrom(path="model")
IN_BODY = ModelFrom(body="model")


def for_task(task: str) -> ModelFrom:
    return ModelFrom(task=task)


@dataclass(frozen=True, slots=True)
class Route:
    """One route. `endpoint` serves it through FastAPI; `hot`, when set, serves it below FastAPI (the hot path) and
    through FastAPI alike (routes/common.answer), so a route needs only one of them. `docs`: FastAPI's keyword
    arguments for the API document (summary, responses, openapi_extra, response_class, include_in_schema)."""

    method: str
    path: str
    endpoint: Endpoint | None = None
    hot: Handler | None = None
    model: ModelFrom = NO_MODEL
    tags: tuple[str, ...] = ()
    docs: Mapping[str, Any] = field(default_factory=dict)
    admin: bool = False   # the management API: needs a key with the `admin` scope (security.py), loopback while no
                          # key exists, and every call is logged (audit.py)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{"))


class RouteTable:
    """Matches a request to its route (no regular expressions: a dict for fixed paths, segment compares for the
    rest, ~1 µs) and says which model a request is for."""

    def __init__(self, routes: Iterable[Route], settings: Settings) -> None:
        self.routes = tuple(routes)
        self.settings = settings
        self.fixed: dict[tuple[str, str], Route] = {}
        # (method, segment count) -> [(each segment: (its fixed text, or None for a parameter; its name), route)]
        self.templated: dict[tuple[str, int], list[tuple[tuple[tuple[str | None, str], ...], Route]]] = {}
        for route in self.routes:
            parts = route.path.split("/")
            if not route.params:
                if (route.method, route.path) in self.fixed:
                    raise ValueError(f"route {route.method} {route.path} is declared twice")
                self.fixed[route.method, route.path] = route
                continue
            pattern = tuple((None, p[1:-1]) if p.startswith("{") else (p, "") for p in parts)
            self.templated.setdefault((route.method, len(parts)), []).append((pattern, route))
        # The fixed heads of the admin routes' paths (up to their first parameter): a request whose path starts with
        # none of them is no admin call, known without a match (~0.1 µs; the layers in front of the hot path ask).
        self.admin_heads = tuple(sorted({r.path.split("{", 1)[0] for r in self.routes if r.admin}))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route for a request and its path parameters, or None (FastAPI then answers 404 or 405)."""
        route = self.fixed.get((method, path))
        if route is not None:
            return route, {}
        parts = path.split("/")
        for pattern, route in self.templated.get((method, len(parts)), ()):
            values = {}
            for (want, name), got in zip(pattern, parts, strict=True):
                if want is None:
                    if not got:
                        break
                    values[name] = got
                elif want != got:
                    break
            else:
                return route, values
        return None

    def admin_route(self, method: str, path: str) -> Route | None:
        """The admin route a request is for, or None (any other route, or none)."""
        if not self.admin_heads or not path.startswith(self.admin_heads):
            return None
        found = self.match("GET" if method == "HEAD" else method, path)
        return found[0] if found is not None and found[0].admin else None

    def deployment(self, task: str) -> str | None:
        """The deployment the configuration binds to `task`, or None (the route then answers 404)."""
        spec = self.settings.deployment_for(task)
        return spec.name if spec is not None else None

    async def model_of(self, method: str, path: str, receive: Receive) -> tuple[str | None, Receive]:
        """The model a request is for (None: a route tied to no model, or no route at all), and the receive to pass
        on: a replay of the body when it had to be read for its model field. HEAD is asked as GET: Starlette serves
        a HEAD with the GET route's handler."""
        found = self.match("GET" if method == "HEAD" else method, path)
        if found is None:
            return None, receive
        route, params = found
        source = route.model
        if source.path is not None:
            return params.get(source.path), receive
        if source.task is not None:
            return self.deployment(source.task), receive
        if source.body is not None:
            return await field_of_body(source.body, receive)
        return None, receive


async def field_of_body(name: str, receive: Receive) -> tuple[str | None, Receive]:
    """A string field of a JSON body, and a receive that replays the body. The body is bounded by the Edge's
    max_body_bytes. Not JSON, or no such string field: None (the route answers 400 or 422; nothing is queued)."""
    body, replay = await read_body(receive)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    value = parsed.get(name) if isinstance(parsed, dict) else None
    return (value if isinstance(value, str) else None), replay


async def read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole body (bounded by the Edge's max_body_bytes) and a receive that replays it to the next layer. A
    disconnect before the body's end: what came, and the original receive (the next layer reads the disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def path_parameters(route: Route) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in route.params]


def mount(app: FastAPI, gateway: Gateway, table: RouteTable) -> None:
    """Add a FastAPI route for each entry: the API document, and every request the hot path leaves to FastAPI."""
    for route in table.routes:
        docs = dict(route.docs)
        extra = dict(docs.pop("openapi_extra", {}))
        if route.params:
            extra["parameters"] = [*path_parameters(route), *extra.get("parameters", [])]
        target = route.endpoint or route.hot
        assert target is not None, f"route {route.method} {route.path} has no handler"
        if route.admin:   # the document says which routes need the admin scope (tests/test_security.py reads it)
            extra["x-inferline-scope"] = SCOPE_ADMIN
        app.add_api_route(route.path, endpoint_for(gateway, route), methods=[route.method], tags=list(route.tags),
                          name=target.__name__, openapi_extra=extra or None, **docs)


def endpoint_for(gateway: Gateway, route: Route) -> Callable[[Request], Awaitable[Any]]:
    async def endpoint(request: Request) -> Any:
        current = record.current.get()
        if current is not None:
            current.route = route.path
        if route.endpoint is not None:
            return await route.endpoint(gateway, request)
        assert route.hot is not None
        return await answer(gateway.dispatcher, request, route.hot)
    return endpoint


OPS, MODELS, TASKS = ("operations",), ("models",), ("tasks",)
V2, TGI, OPENAI = ("open inference protocol",), ("text generation (TGI)",), ("text generation (OpenAI)",)
ADMIN, REPOSITORY = ("admin",), ("open inference protocol: model repository",)
GENERATE = for_task(generate.TASK)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", health.healthz, tags=OPS, docs=health.HEALTHZ_DOCS),
    Route("GET", "/readyz", health.readyz, tags=OPS, docs=health.READYZ_DOCS),
    Route("GET", "/metrics", health.metrics, tags=OPS, docs=health.METRICS_DOCS),
    Route("GET", "/v1/models", models.list_models, tags=OPS, docs=models.DOCS),
    Route("POST", "/v1/models/{model}/predict", hot=predict.predict, model=IN_PATH, tags=MODELS, docs=predict.DOCS),
    Route("POST", "/classify-image", classify.classify_form, hot=classify.classify_image,
          model=for_task(classify.TASK), tags=TASKS, docs=classify.DOCS),
    Route("POST", "/forecast", hot=forecast.forecast, model=for_task(forecast.TASK), tags=TASKS, docs=forecast.DOCS),
    Route("POST", "/sentiment", hot=sentiment.sentiment, model=for_task(sentiment.SENTIMENT), tags=TASKS,
          docs=sentiment.SENTIMENT_DOCS),
    Route("POST", "/classify-text", hot=sentiment.classify_text, model=for_task(sentiment.CLASSIFY_TEXT), tags=TASKS,
          docs=sentiment.CLASSIFY_TEXT_DOCS),
    Route("GET", "/v2", kserve.server_metadata, tags=V2, docs=kserve.SERVER_DOCS),
    Route("GET", "/v2/health/live", kserve.live, tags=V2, docs=kserve.LIVE_DOCS),
    Route("GET", "/v2/health/ready", kserve.ready, tags=V2, docs=kserve.READY_DOCS),
    Route("GET", "/v2/models/{model}", kserve.metadata, model=IN_PATH, tags=V2, docs=kserve.METADATA),
    Route("GET", "/v2/models/{model}/versions/{version}", kserve.metadata, model=IN_PATH, tags=V2,
          docs=kserve.METADATA),
    Route("GET", "/v2/models/{model}/ready", kserve.model_ready, model=IN_PATH, tags=V2, docs=kserve.MODEL_READY),
    Route("GET", "/v2/models/{model}/versions/{version}/ready", kserve.model_ready, model=IN_PATH, tags=V2,
          docs=kserve.MODEL_READY),
    Route("POST", "/v2/models/{model}/infer", hot=kserve.infer, model=IN_PATH, tags=V2, docs=kserve.INFER_DOCS),
    Route("POST", "/v2/models/{model}/versions/{version}/infer", kserve.infer_version, model=IN_PATH, tags=V2,
          docs=kserve.VERSION_INFER_DOCS),
    Route("POST", "/generate", generate.generate, model=GENERATE, tags=TGI, docs=generate.GENERATE_DOCS),
    Route("POST", "/generate_stream", generate.generate_stream, model=GENERATE, tags=TGI, docs=generate.STREAM_DOCS),
    Route("POST", "/", generate.compat, model=GENERATE, tags=TGI, docs=generate.COMPAT_DOCS),
    Route("GET", "/info", generate.info, model=GENERATE, tags=TGI, docs=generate.INFO_DOCS),
    Route("POST", "/tokenize", generate.tokenize, model=GENERATE, tags=TGI, docs=generate.TOKENIZE_DOCS),
    Route("GET", "/health", generate.health, model=GENERATE, tags=TGI, docs=generate.HEALTH_DOCS),
    Route("POST", "/v1/completions", openai.completions, model=IN_BODY, tags=OPENAI, docs=openai.DOCS),
    Route("POST", "/v1/chat/completions", chat.chat_completions, model=IN_BODY, tags=OPENAI, docs=chat.DOCS),
    # the management API: the admin scope, loopback only while no key exists, every call logged (audit.py)
    Route("POST", "/v2/repository/index", repository.index, tags=REPOSITORY, docs=repository.INDEX_DOCS,
          admin=True),
    Route("POST", "/v2/repository/models/{model}/load", repository.load, model=IN_PATH, tags=REPOSITORY,
          docs=repository.LOAD_DOCS, admin=True),
    Route("POST", "/v2/repository/models/{model}/unload", repository.unload, model=IN_PATH, tags=REPOSITORY,
          docs=repository.UNLOAD_DOCS, admin=True),
    Route("GET", "/admin/deployments", admin.deployments, tags=ADMIN, docs=admin.DEPLOYMENTS_DOCS, admin=True),
    Route("POST", "/admin/workers/{worker}/drain", admin.drain_worker, tags=ADMIN, docs=admin.DRAIN_DOCS,
          admin=True),
    Route("GET", "/admin/models/{model}/dead-letters", admin.list_dead_letters, model=IN_PATH, tags=ADMIN,
          docs=admin.DEAD_LETTERS_DOCS, admin=True),
    Route("POST", "/admin/models/{model}/dead-letters/replay", admin.replay_dead_letters, model=IN_PATH,
          tags=ADMIN, docs=admin.REPLAY_DOCS, admin=True),
    Route("POST", "/admin/models/{model}/dead-letters/purge", admin.purge_dead_letters, model=IN_PATH, tags=ADMIN,
          docs=admin.PURGE_DOCS, admin=True),
    Route("POST", "/admin/models/{model}/rollout", fleet.start_rollout, model=IN_PATH, tags=ADMIN,
          docs=fleet.ROLLOUT_DOCS, admin=True),
    Route("GET", "/admin/models/{model}/rollout", fleet.rollout_status, model=IN_PATH, tags=ADMIN,
          docs=fleet.STATUS_DOCS, admin=True),
    Route("POST", "/admin/models/{model}/promote", fleet.promote, model=IN_PATH, tags=ADMIN, docs=fleet.PROMOTE_DOCS,
          admin=True),
    Route("POST", "/admin/models/{model}/scale", fleet.scale, model=IN_PATH, tags=ADMIN, docs=fleet.SCALE_DOCS,
          admin=True),
)
