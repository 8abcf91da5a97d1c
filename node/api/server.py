"""The node's and the sidecar's socket layer: how an aiohttp app is put on a port and kept there.

Both apps face strangers on one listener, so both get the same guards aiohttp leaves out:

- a cap on open connections (503 past ``MAX_CONNECTIONS``) and a share of them per client (429
  past ``CONNECTION_SHARE_PER_CLIENT``, counted by address: ``node.api.clients``), answered before
  aiohttp sees a byte, so idle or merely many connections of one client cannot take every socket;
- a deadline for a new connection's first request head (``HEADER_TIMEOUT_S``: slowloris), and a
  keep-alive timeout of seconds, not aiohttp's hour;
- a clean stop on SIGINT/SIGTERM that gives answers in flight ``SHUTDOWN_GRACE_S``.

``json_response`` is the one way a pydantic model becomes a JSON response, for every route of
both apps. Loads neither TVM nor libp2p (the sidecar serves through it).
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from typing import Callable, Mapping

from aiohttp import web
from pydantic import BaseModel

from node.api.clients import client_identity
from node.api.protocol import ErrorInfo, ErrorResponse

# On SIGINT/SIGTERM, answers in flight get this long to finish before they are cancelled.
SHUTDOWN_GRACE_S = 10.0
# Open connections at once: each in-flight request holds one, and a node's engine queues up to
# ``node.runtime.engine.DEFAULT_MAX_QUEUE`` requests per model besides those it runs.
MAX_CONNECTIONS = 512
# The share of them one client (by address: ``node.api.clients``) may hold by default: attack 9
# of issue 21 held all 512 with legal keep-alive connections polling /health; with a share,
# the other half stays open to everyone else.
CONNECTION_SHARE_PER_CLIENT = 0.5
KEEPALIVE_TIMEOUT_S = 15.0  # how long an idle keep-alive connection may hold its socket
HEADER_TIMEOUT_S = 10.0  # a new connection's first request head must arrive within this

ON_BOUND = web.AppKey("on_bound", Callable[[str], None])
"""Set by an app that wants to know its own URL once ``start_server`` has bound it (a node: its
peers reach it there); called with ``http://host:port``."""


def json_response(model: BaseModel, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``model`` as its JSON (pydantic's own serializer: exactly the bytes a verifier re-reads)."""
    return web.Response(status=status, body=model.model_dump_json(), headers=headers, content_type="application/json")


def _refuse(transport: asyncio.BaseTransport, status: bytes, message: str, kind: str, code: str) -> None:
    """Answer a connection that is not taken with an OpenAI-shaped error and Retry-After, then close it."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, code=code)).model_dump_json().encode()
    transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    transport.close()


class _Delegating(asyncio.Protocol):
    """Passes every call on to ``inner``, aiohttp's handler for one connection (the base of the wrappers below)."""

    def __init__(self, inner: asyncio.Protocol):
        self._inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _HeadDeadline(_Delegating):
    """Closes the connection if the first request's head (request line and headers) has not
    arrived within ``HEADER_TIMEOUT_S``: aiohttp sets no such deadline, so a client trickling
    header bytes would hold its socket (and a slot under the cap) for ever."""

    def __init__(self, inner: asyncio.Protocol):
        super().__init__(inner)
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT_S, transport.close)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            window = self._tail + data  # the terminator may straddle two reads
            if b"\r\n\r\n" in window:  # the head is complete: from here aiohttp's own timeouts apply
                self._timer.cancel()
                self._timer = None
            self._tail = window[-3:]
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)


class _Admitted(_Delegating):
    """A connection under the caps: past ``max_connections`` it is told 503, past its client's
    share (``max_connections_per_client``, counted by address) 429, and closed at once;
    otherwise it counts against its client until it closes."""

    def __init__(self, site: "_CappedSite"):
        super().__init__(asyncio.Protocol())  # a do-nothing handler until admitted: a refused one's bytes go nowhere
        self._site = site
        self._client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        peer = transport.get_extra_info("peername")
        client = client_identity(None, peer[0] if isinstance(peer, tuple) else None)
        if len(site.server.connections) >= site.max_connections:
            return _refuse(transport, b"503 Service Unavailable", "too many connections; retry later", "server_error", "server_busy")
        if site.open_by_client[client] >= site.max_connections_per_client:
            return _refuse(transport, b"429 Too Many Requests",
                           f"this client holds {site.max_connections_per_client} connections, its share; close one or retry later",
                           "rate_limit_error", "client_share_exceeded")
        site.open_by_client[client] += 1
        self._client = client
        self._inner = _HeadDeadline(site.server())
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is not None:
            open_by_client = self._site.open_by_client
            open_by_client[self._client] -= 1
            if not open_by_client[self._client]:
                del open_by_client[self._client]
        super().connection_lost(exc)


class _CappedSite(web.TCPSite):
    """A TCP site that holds at most ``max_connections`` open connections and at most
    ``max_connections_per_client`` of one client: slow, idle or merely many connections of one
    client cannot take every socket (``_Admitted``), and a connection whose first request head
    is not in within ``HEADER_TIMEOUT_S`` is closed (``_HeadDeadline``)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int, max_connections_per_client: int):
        super().__init__(runner, host, port)
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.open_by_client: Counter[str] = Counter()

    @property
    def server(self) -> web.Server:
        return self._runner.server

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        self._server = await asyncio.get_running_loop().create_server(lambda: _Admitted(self), self._host, self._port,
                                                                      backlog=self._backlog)
        self._bound_port = self._server.sockets[0].getsockname()[1]


async def start_server(app: web.Application, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                       max_connections_per_client: int | None = None) -> tuple[web.AppRunner, int]:
    """Listen on ``host:port`` (0 = any free port); returns the runner and the bound port.
    ``max_connections_per_client``: default ``CONNECTION_SHARE_PER_CLIENT`` of ``max_connections``.

    ``handler_cancellation``: a client that disconnects cancels its handler at once, which
    cancels its sequences, even while it waits in the queue and nothing is being written.
    Connections are capped (``max_connections``, and per client) and an idle keep-alive connection is closed
    after ``KEEPALIVE_TIMEOUT_S`` (aiohttp's default is an hour); request bodies must arrive
    within ``BODY_TIMEOUT_S`` (``node.api.errors.parse_body``)."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S,
                           keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    await runner.setup()
    per_client = max(1, int(max_connections * CONNECTION_SHARE_PER_CLIENT)) if max_connections_per_client is None else max_connections_per_client
    site = _CappedSite(runner, host, port, max_connections, per_client)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    if ON_BOUND in app:
        app[ON_BOUND](f"http://{host}:{bound}")
    return runner, bound


async def serve_until_signalled(app: web.Application, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly: stop listening, give answers in
    flight ``SHUTDOWN_GRACE_S`` to finish, cancel the rest, run the app's cleanup (a node closes
    its engines). A second signal during that falls back to Python's default (Ctrl-C interrupts
    at once)."""
    runner, bound = await start_server(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        on_ready(f"http://{host}:{bound}")
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
