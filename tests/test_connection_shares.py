"""Fair connections, probed as the abuse issue probed them, with real gateway processes on loopback: one client
(a peer address of its own: 127.0.0.2) holding many connections that send their body a byte a second, or that
never send a byte, leaves another client served; a stalled body is answered 408 in its route's family shape
within gateway.body_timeout_s and a bound."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Cluster
from tests.security_cluster import ECHO, start_gateway, v2_body

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"   # all of 127.0.0.0/8 is loopback: a second client with an address of its own
SHARES = {"max_connections": 200, "max_connections_per_client": 50, "max_idle_connections_per_client": 20}


def open_from(url: str, source: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect((host, int(port)))
    return s


def reply_of(s: socket.socket, timeout: float) -> bytes:
    """What the server sent on `s` until it closed it, or within `timeout` (then what came so far)."""
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def body_of(reply: bytes) -> Any:
    return orjson.loads(reply.partition(b"\r\n\r\n")[2])


def served(url: str, n: int) -> list[int]:
    """n inference requests from this (another) client, one after another: their statuses."""
    with httpx.Client(timeout=10) as client:
        return [client.post(url + "/v2/models/echo/infer", json=v2_body(i)).status_code for i in range(n)]


@pytest.mark.slow
def test_one_clients_slow_bodies_leave_another_client_served(cluster: Cluster) -> None:
    """300 connections from one client, each sending a body a byte a second (the probe's 2,100 against 2,048 in
    total): 50 (its share) are admitted, the rest answered 503 at once, and the admitted ones get 408 when their
    body is not in within body_timeout_s. Meanwhile another client's requests are all served."""
    cluster.spec("echo", runtime=ECHO)
    cluster.start_worker("echo")
    url = start_gateway(cluster, gateway={**SHARES, "body_timeout_s": 4.0})
    head = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n")
    slow = []
    for _ in range(300):
        s = open_from(url, ATTACKER)
        s.sendall(head + b"{")
        slow.append(s)
    started = time.monotonic()
    codes = []
    for second in range(6):   # a byte a second on every connection still open, while the other client is served
        for s in slow:
            try:
                s.sendall(b" ")
            except OSError:   # answered and closed already
                pass
        codes += served(url, 5)
        time.sleep(max(0.0, started + second + 1 - time.monotonic()))
    assert codes == [200] * len(codes), codes
    replies = [reply_of(s, 3) for s in slow]
    for s in slow:
        s.close()
    statuses = [status_of(r) for r in replies]
    assert statuses.count(408) == 50, statuses     # its share, each closed at its body deadline
    assert statuses.count(503) == 250, statuses    # the rest, answered at once
    refused = body_of(next(r for r in replies if status_of(r) == 503))
    assert refused["error_type"] == "overloaded" and refused["field"] == "max_connections_per_client", refused
    assert b"retry-after: " in next(r for r in replies if status_of(r) == 503).lower()
    timed_out = body_of(next(r for r in replies if status_of(r) == 408))
    assert timed_out == {"error": timed_out["error"]} and "gateway.body_timeout_s" in timed_out["error"]   # /v2 shape
    assert served(url, 3) == [200] * 3


def test_one_clients_idle_connections_leave_another_client_served(cluster: Cluster) -> None:
    """A client opening 150 connections that never send a byte (and reopening what is closed) holds at most its
    idle share (20) past the grace: those over its share (50) are answered 503 at once, those over its idle share
    once their grace is over. Another client is served throughout, and the first client can still send a request
    on a connection it holds."""
    cluster.spec("echo", runtime=ECHO)
    cluster.start_worker("echo")
    url = start_gateway(cluster, gateway={**SHARES, "header_timeout_s": 3.0})
    idle = [open_from(url, ATTACKER) for _ in range(150)]
    codes = served(url, 10)
    time.sleep(1.5)   # past the grace (connlimits.IDLE_GRACE_S)
    answered = [reply_of(s, 1) for s in idle[20:]]
    for s in idle[20:]:
        s.close()
    assert {status_of(r) for r in answered} == {503}, answered
    fields = [body_of(r)["field"] for r in answered]
    assert fields.count("max_connections_per_client") == 100 and fields.count("max_idle_connections_per_client") == 30
    # one of the idle connections it holds sends a request: served
    idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status_of(idle[0].recv(65536)) == 200
    for _ in range(3):   # reopened: still at most the idle share held a grace later
        codes += served(url, 3)
        more = [open_from(url, ATTACKER) for _ in range(60)]
        time.sleep(1.5)
        statuses = [status_of(reply_of(s, 0.2)) for s in more]
        assert statuses.count(503) >= 60 - 20, statuses
        for s in more:
            s.close()
    for s in idle[:20]:
        s.close()
    assert codes == [200] * len(codes), codes


@pytest.mark.parametrize("path,shape", [("/v1/completions", "openai"), ("/generate", "tgi"),
                                        ("/v2/models/echo/infer", "kserve")])
def test_a_stalled_body_gets_408_in_its_routes_shape(cluster: Cluster, path: str, shape: str) -> None:
    cluster.spec("echo", runtime=ECHO)
    url = start_gateway(cluster, gateway={"body_timeout_s": 1.5})
    with open_from(url, "127.0.0.1") as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
                  f"x-request-id: stalled-1\r\n\r\n{{\"in".encode())
        started = time.monotonic()
        reply = reply_of(s, 10)
        took = time.monotonic() - started
    assert status_of(reply) == 408, reply
    assert 1.5 <= took < 1.5 + 1.0, took
    assert b"x-request-id: stalled-1" in reply and b"connection: close" in reply
    body = body_of(reply)
    if shape == "openai":
        assert body["error"]["param"] == "body" and "gateway.body_timeout_s" in body["error"]["message"], body
    elif shape == "tgi":
        assert body["error_type"] == "timeout" and body["field"] == "body" and body["request_id"] == "stalled-1"
    else:
        assert set(body) == {"error"} and "gateway.body_timeout_s" in body["error"], body
    assert httpx.get(url + "/healthz").status_code == 200
