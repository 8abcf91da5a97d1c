"""The node's HTTP server (aiohttp): the app factory, errors, auth, receipts, health, metrics.

One way through the house: HTTP -> engine -> runtime. ``make_app`` takes models that are
already loaded (so tests and benchmarks run it in-process), an identity key and an evidence
store, and wires the route tables: OpenAI (``node/api/routes.py``), receipts, and
health/metrics. Every answer is signed as it finishes and its answer file kept in the evidence
store (``node/api/service.py``), so ``GET /v1/receipts/{id}`` serves what ``proofmesh verify`` checks.

    GET  /v1/models                  POST /v1/completions        POST /v1/chat/completions
    GET  /v1/receipts/{receipt_id}?token=   GET  /health         GET  /metrics
    GET  /v1/peers ...               (with a p2p network: node/api/peering.py)
    GET  /                           the operator's status page (HTML: node/api/status_page.py)

Errors: one middleware turns every exception into OpenAI's ``{"error": {message, type, param,
code}}`` — node errors and HTTP errors with their own status, anything unexpected as a 500
whose traceback goes to the log, never to the client. With API keys set, ``/v1/*`` needs
``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` stay open for probes, and so does
``/``, which then shows what ``/health`` does and leaves out what only ``/v1`` routes show
(peers, convictions) unless the request bears a key.

An answer file holds a client's conversation, so it is served only with its evidence token
(``?token=``, returned with the answer: ``node/api/evidence_tokens.py``) or to the operator
(``Authorization: Bearer OPERATOR_KEY``, ``--operator-key``); the receipts the node signed are
listed on ``/`` to the operator alone, each linked with its token.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from node.api import routes
from node.api.clients import BODY_BUDGET, BodyBudget, client_identity
from node.api.protocol import ErrorInfo, ErrorResponse
from node.errors import ConfigError
from node.runtime.loading import LoadedModel
from node.api.errors import HOLDS_API_KEY, IS_OPERATOR, APIError, Handler, errors_middleware, require_api_key
from node.api.evidence_tokens import TOKEN_PARAM, receipt_path
from node.api.service import NODE, Node
from node.api.status_page import MAX_ROWS, Cell, StatusPage, Table, Tone, ago, html_response, locked_table, rate_cell, receipt_cell
from node.runtime.options import DEFAULT_MAX_QUEUE
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

if TYPE_CHECKING:
    from p2p.network import NetworkConfig

log = logging.getLogger(__name__)

# A full 8k-token context is ~40 KB of text; 1 MiB leaves room for long chat histories while
# keeping a hostile body from costing real memory.
MAX_BODY_BYTES = 1 << 20
# On SIGINT/SIGTERM, answers in flight get this long to finish before they are cancelled.
SHUTDOWN_GRACE_S = 10.0
# Open connections at once (each in-flight request holds one; the queue holds 64 per model), and
# how long an idle keep-alive connection may hold its socket.
MAX_CONNECTIONS = 512
# The share of them one client (by address: ``node.api.clients``) may hold by default: attack 9
# of issue 21 held all 512 with legal keep-alive connections polling /health; with a share,
# the other half stays open to everyone else.
CONNECTION_SHARE_PER_CLIENT = 0.5
KEEPALIVE_TIMEOUT_S = 15.0
HEADER_TIMEOUT_S = 10.0  # a new connection's first request head must arrive within this



# ---------------------------------------------------------------------- middleware


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"  # bounded label values


@web.middleware
async def _metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: counts every response, errors included (``errors_middleware`` sits inside)."""
    start = time.perf_counter()
    response = await handler(request)
    request.app[NODE].metrics.observe_request(_route_label(request), response.status, time.perf_counter() - start)
    return response


# ---------------------------------------------------------------------- receipts, health, metrics


async def get_receipt(request: web.Request) -> web.Response:
    """The answer file behind a receipt while it is retained: what ``proofmesh verify`` takes.
    Only with the receipt's evidence token (``?token=``) or to the operator; otherwise the
    answer is the unknown receipt's 404, given before the store is read, so a refusal says
    nothing of which receipt ids exist."""
    node = request.app[NODE]
    receipt_id = request.match_info["receipt_id"]
    if request[IS_OPERATOR] or node.evidence_tokens.admits(receipt_id, request.query.get(TOKEN_PARAM)):
        answer = node.store.get(receipt_id)
        node.metrics.receipt_lookups.labels("found" if answer else "missing").inc()
    else:
        answer = None
        node.metrics.receipt_lookups.labels("refused").inc()
    if answer is None:
        raise APIError(404, f"no receipt {receipt_id!r} here (unknown, or past the retention window)",
                       param="receipt_id", code="receipt_not_found")
    return web.Response(body=answer.model_dump_json(), content_type="application/json")


NodeStatus = Literal["ok", "shutting_down", "degraded"]
_STATUS_TONES: dict[NodeStatus, Tone] = {"ok": "good", "shutting_down": "warn", "degraded": "bad"}


def _status(node: Node) -> NodeStatus:
    """Degraded: the p2p thread is down (and being restarted)."""
    if node.shutting_down:
        return "shutting_down"
    return "degraded" if node.network is not None and not node.network.running else "ok"


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    answers, size = node.store.stats()
    status = _status(node)
    return web.json_response({
        "status": status,
        "node_id": node.key.node_id,
        "public_key": node.key.public_key.hex(),
        "models": [
            {"id": s.name, "model_id": s.loaded.model_id, "backend": s.loaded.backend, "max_context": s.loaded.max_context,
             "queue_depth": s.engine.queue_depth, "running": s.engine.running}
            for s in node.models.values()
        ],
        "evidence": {"answers": answers, "bytes": size},
        **({"peer_id": node.network.peer_id, "p2p_addrs": node.network.addrs,
            "p2p": "degraded: the p2p thread is down (restarting)" if status == "degraded" else "ok"} if node.network else {}),
    })


async def status_page(request: web.Request) -> web.Response:
    """GET /: the node at a glance (what /health says; with the API key its peers and the
    convictions it knows of; to the operator also the answers it signed last)."""
    node = request.app[NODE]
    answers, size = await asyncio.to_thread(node.store.stats)
    network, status = node.network, _status(node)
    facts = [
        ("status", Cell(status, tone=_STATUS_TONES[status])),
        ("node id", Cell(node.key.node_id)),
        ("generating", rate_cell(node.token_rate.per_second(), node.token_rate.window_s)),
        ("evidence kept", Cell(f"{answers} answer{'' if answers == 1 else 's'}, {size / 2**10:,.1f} KiB")),
        ("p2p", Cell(", ".join(network.addrs) or "listening") if network is not None else Cell("no network", tone="muted")),
    ]
    models = Table("Models served", ("name", "model_id", "backend", "max context", "queued", "running"), [
        (Cell(s.name), Cell(s.loaded.model_id), Cell(s.loaded.backend), Cell(str(s.loaded.max_context)),
         Cell(str(s.engine.queue_depth)), Cell(str(s.engine.running)))
        for s in node.models.values()], "none: a gateway to its peers' models")
    signed = _signed_answers_table(node) if request[IS_OPERATOR] else locked_table("Answers signed", operator=True)
    if not request[HOLDS_API_KEY]:
        tables = [signed, locked_table("Peers"), locked_table("Fraud convictions")]
    else:
        tables = [signed, _peers_table(node), await _convictions_table(request.app, node)]
    return html_response(StatusPage("ProofMesh node", facts, [models, *tables]))


def _signed_answers_table(node: Node) -> Table:
    """The operator's: each receipt links to its answer file with its token (relative), so the
    link opens in any browser and can be handed to a verifier."""
    rows = [(Cell(a.receipt_id, href=receipt_path(a.receipt_id, node.evidence_tokens.token(a.receipt_id)).removeprefix("/")),
             Cell(a.model), Cell(str(a.output_tokens)), ago(a.signed_at))
            for a in reversed(node.signed_answers)]
    return Table(f"Answers signed (the last {MAX_ROWS} since start; each links to its answer file)",
                 ("receipt", "model", "tokens", "signed"), rows, "none yet")


def _peers_table(node: Node) -> Table:
    if node.network is None:
        return Table("Peers", (), (), "no network (proofmesh run --p2p-listen or --bootstrap joins one)")
    convicted = node.network.table.convicted()
    peers = sorted(node.network.peers(), key=lambda p: p.record.peer_id)[:MAX_ROWS]
    rows = [(Cell(p.record.peer_id, tone="bad" if p.record.peer_id in convicted else None),
             Cell(", ".join(m.name for m in p.record.models) or "none"), Cell(str(p.record.load)),
             Cell("-" if p.latency_s is None else f"{p.latency_s * 1000:.0f} ms"), Cell(str(p.failures)),
             Cell("convicted", tone="bad") if p.record.peer_id in convicted else Cell("ok", tone="good"), ago(p.last_seen))
            for p in peers]
    return Table("Peers", ("peer id", "models", "load", "latency", "failures", "standing", "last seen"), rows, "none known yet")


async def _convictions_table(app: web.Application, node: Node) -> Table:
    if node.network is None:
        return Table("Fraud convictions", (), (), "no network: convictions come from peers' fraud proofs")
    from node.api import peering  # loaded already: the node joined a network

    convictions = await asyncio.to_thread(app[peering.SERVICES].ledger.convictions, limit=MAX_ROWS)
    rows = [(Cell(c.node_id, tone="bad"), receipt_cell(c.receipt_id, "v1/fraud-proofs"), ago(c.created)) for c in convictions]
    return Table("Fraud convictions (each receipt links to its fraud proof)", ("convicted node", "receipt", "when"), rows, "none")


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    states = [(s.name, s.engine.queue_depth, s.engine.running) for s in node.models.values()]
    body = node.metrics.render(states, node.store.stats())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------- app and serving


def make_app(
    models: Sequence[LoadedModel],
    key: NodeKey,
    store: EvidenceStore,
    *,
    api_keys: Sequence[str] = (),
    operator_keys: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = MAX_BODY_BYTES,
    network: NetworkConfig | None = None,
    ledger: Ledger | None = None,
    fraud_quorum: int | None = None,
) -> web.Application:
    """The node's app. Each model gets its own engine (which owns that model's runtime: do not
    serve one ``LoadedModel`` from two apps at once); engines close on app cleanup, the store
    stays the caller's to close. With ``network`` the node joins the p2p network on startup
    (``node/api/peering.py``); then it may serve no model itself (a gateway). Its convictions and
    their fraud proofs go to ``ledger`` (kept across restarts; without one, in memory); a node
    without a network loads no libp2p at all. ``operator_keys``: the bearer keys of the node's
    operator, who may read every answer file (``node.api.errors.IS_OPERATOR``)."""
    if not models and network is None:
        raise ConfigError("make_app needs at least one model (or a p2p network to forward to)")
    node = Node(models, key, store, max_queue=max_queue)
    middlewares = [_metrics, errors_middleware(lambda: node.shutting_down), require_api_key(api_keys, operator_keys)]
    if network is not None:
        from node.api import peering  # libp2p only for a node that joins a network

        middlewares.append(peering.forward_to_peers)
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[NODE] = node
    app[BODY_BUDGET] = BodyBudget()
    if network is not None:
        peering.attach(app, node, network, api_keys[0] if api_keys else None,
                       ledger if ledger is not None else Ledger(Path(":memory:")),
                       peering.DEFAULT_FRAUD_QUORUM if fraud_quorum is None else fraud_quorum)
    app.router.add_routes(routes.routes)
    app.router.add_get("/v1/receipts/{receipt_id}", get_receipt)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", status_page)

    async def mark_shutting_down(_: web.Application) -> None:
        node.shutting_down = True

    async def close_engines(_: web.Application) -> None:
        await node.close()

    app.on_shutdown.append(mark_shutting_down)  # after the listener closes, before in-flight requests end
    app.on_cleanup.append(close_engines)  # after in-flight requests ended or were cancelled
    return app


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
    if NODE in app:  # a node's app (not, say, the verifier sidecar's): peers reach it here
        app[NODE].url = f"http://{host}:{bound}"
    return runner, bound


async def serve_until_signalled(app: web.Application, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly: stop listening, give answers in
    flight ``SHUTDOWN_GRACE_S`` to finish, cancel the rest, close the engines. A second signal
    during that falls back to Python's default (Ctrl-C interrupts at once)."""
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
