"""The HTTP listener's limits, on a real socket: connections past the cap get a 503 at once (a
crowd of idle or slow clients cannot take every socket), an idle keep-alive connection is
closed, a body that trickles in past its deadline gets a 408 and a head that trickles in is cut
off. The servers run as every test server does (``http_fixtures.serving``), with a small cap."""

from __future__ import annotations

import socket
import time

import httpx
from aiohttp import web

from node.api import errors, server
from node.api.errors import errors_middleware, parse_body
from node.api.protocol import ErrorInfo
from node.api.server import KEEPALIVE_TIMEOUT_S
from tests.node.api.http_fixtures import serving


async def _echo(request: web.Request) -> web.Response:
    body = await parse_body(request, ErrorInfo)
    return web.json_response({"message": body.message})


def _echo_app() -> web.Application:
    app = web.Application(middlewares=[errors_middleware()])
    app.router.add_post("/echo", _echo)
    return app


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_connections_past_the_cap_are_refused_at_once():
    with serving(_echo_app(), max_connections=3, max_connections_per_client=3) as url:  # one client may take all here
        idle = [socket.create_connection(("127.0.0.1", _port(url))) for _ in range(3)]  # hold every slot, send nothing
        time.sleep(0.3)
        refused = httpx.post(f"{url}/echo", json={"message": "x", "type": "t"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "server_busy"
        for s in idle:
            s.close()
        time.sleep(0.3)
        served = httpx.post(f"{url}/echo", json={"message": "x", "type": "t"}, timeout=10)
        assert served.status_code == 200 and served.json() == {"message": "x"}


def test_a_trickling_body_gets_408_and_an_idle_connection_is_closed(monkeypatch):
    monkeypatch.setattr(errors, "BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server, "KEEPALIVE_TIMEOUT_S", 0.5)
    with serving(_echo_app(), max_connections=8) as url:
        with socket.create_connection(("127.0.0.1", _port(url))) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            s.settimeout(10)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        with socket.create_connection(("127.0.0.1", _port(url))) as s:  # a served keep-alive connection, then silence
            body = b'{"message": "x", "type": "t"}'
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            s.settimeout(10)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert s.recv(4096) == b""  # closed by the server once idle past its keep-alive timeout
            assert time.monotonic() - started < 5
    assert KEEPALIVE_TIMEOUT_S <= 30  # (the real setting: aiohttp's default would hold it for an hour)


def test_a_head_that_trickles_in_is_cut_off(monkeypatch):
    """Slowloris: a request line and half its headers, then nothing: the connection is closed
    once the head deadline passes, and the slot is free again."""
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 0.5)
    with serving(_echo_app(), max_connections=1) as url:
        with socket.create_connection(("127.0.0.1", _port(url))) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(10)
            started = time.monotonic()
            assert s.recv(4096) == b"" and time.monotonic() - started < 5  # closed by the server
        time.sleep(0.2)
        served = httpx.post(f"{url}/echo", json={"message": "x", "type": "t"}, timeout=10)
        assert served.status_code == 200  # the one slot is free again
