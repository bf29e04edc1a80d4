"""The gateway's route table on its own: matching, and which model a request is for. Pure and fast (no Redis);
the security tests drive the same table through real gateway processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.types import Message, Receive

from inferline.server.config import Settings
from inferline.server.gateway.table import IN_BODY, IN_PATH, ROUTES, Route, RouteTable


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RouteTable:
    monkeypatch.chdir(tmp_path)   # no ./inferline.toml: these deployments only
    settings = Settings(redis_url="redis://127.0.0.1:1/0", models={
        "fc": {"task": "forecast"}, "gen": {"task": "generate"}, "plain": {}})
    return RouteTable(ROUTES, settings)


def receiver(*chunks: bytes) -> tuple[list[Message], Receive]:
    """An ASGI receive that hands out `chunks` as one body, and the list of what it handed out."""
    given: list[Message] = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> Message:
        message = messages.pop(0) if messages else {"type": "http.disconnect"}
        given.append(message)
        return message
    return given, receive


def test_every_route_has_a_handler_and_path_models_name_a_parameter() -> None:
    for route in ROUTES:
        assert route.endpoint is not None or route.hot is not None, route.path
        if route.model is IN_PATH:
            assert "model" in route.params, route.path


def test_a_route_declared_twice_is_refused(table: RouteTable) -> None:
    with pytest.raises(ValueError, match="declared twice"):
        RouteTable([*ROUTES, Route("GET", "/healthz")], table.settings)


def test_matching(table: RouteTable) -> None:
    route, params = table.match("POST", "/forecast") or (None, None)
    assert route is not None and route.path == "/forecast" and params == {}
    found = table.match("POST", "/v2/models/cnn/versions/3/infer")
    assert found is not None and found[0].path == "/v2/models/{model}/versions/{version}/infer"
    assert found[1] == {"model": "cnn", "version": "3"}
    found = table.match("GET", "/v2/models/cnn")
    assert found is not None and found[1] == {"model": "cnn"}
    assert table.match("GET", "/forecast") is None                 # another method: FastAPI answers 405
    assert table.match("POST", "/v2/models//infer") is None        # an empty parameter is no match
    assert table.match("POST", "/v2/models/a/b/infer") is None     # a parameter is one segment
    assert table.match("POST", "/nowhere") is None


async def test_the_model_comes_from_the_path_the_task_binding_or_the_body(table: RouteTable) -> None:
    _, receive = receiver(b"")
    assert (await table.model_of("POST", "/v1/models/plain/predict", receive))[0] == "plain"
    assert (await table.model_of("POST", "/forecast", receive))[0] == "fc"          # the config's binding
    assert (await table.model_of("GET", "/info", receive))[0] == "gen"
    assert (await table.model_of("HEAD", "/v2/models/plain/ready", receive))[0] == "plain"   # served as GET
    assert (await table.model_of("POST", "/sentiment", receive))[0] is None         # no deployment bound: 404 later
    assert (await table.model_of("GET", "/v1/models", receive))[0] is None          # no one model
    assert (await table.model_of("POST", "/nowhere", receive))[0] is None


async def test_a_model_in_the_body_is_read_and_the_body_replayed(table: RouteTable) -> None:
    assert table.match("POST", "/v1/chat/completions")[0].model is IN_BODY   # type: ignore[index]
    given, receive = receiver(b'{"model": "ge', b'n", "messages": []}')
    model, replay = await table.model_of("POST", "/v1/chat/completions", receive)
    assert model == "gen" and len(given) == 2
    first = await replay()
    assert first == {"type": "http.request", "body": b'{"model": "gen", "messages": []}', "more_body": False}
    assert (await replay())["type"] == "http.disconnect"   # after the replay, the connection's own messages
    for body in (b"not json", b'{"model": 7}', b"[1]"):
        _, receive = receiver(body)
        model, replay = await table.model_of("POST", "/v1/completions", receive)
        assert model is None and (await replay())["body"] == body   # the route answers 400/422 for it
