"""The node's aiohttp application: ``make_app`` wires its middlewares and routes; the receipt,
health, metrics and status-page handlers live here (serving it on a port: ``node/api/server.py``).

One way through the house: HTTP -> engine -> runtime. ``make_app`` takes models that are
already loaded (so tests and benchmarks run it in-process), an identity key and an evidence
store, and wires the route tables: OpenAI (``node/api/routes.py``), receipts, and
health/metrics. Every answer is signed as it finishes and its answer file kept in the evidence
store (``node/api/service.py``), so ``GET /v1/receipts/{id}`` serves what ``proofmesh verify`` checks.
The handlers read the store and the ledger through ``node.blocking.off_loop``: their locks are
held across fsync'd commits, never by the event loop.

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

import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from node.api import routes
from node.api.clients import BODY_BUDGET, BodyBudget
from node.api.errors import HOLDS_API_KEY, IS_OPERATOR, APIError, Handler, errors_middleware, require_api_key
from node.api.evidence_tokens import TOKEN_PARAM
from node.api.server import ON_BOUND, json_response
from node.api.service import NODE, Node
from node.api.status_page import (MAX_ROWS, Cell, StatusPage, Tone, convictions_table, html_response, locked_table,
                                  models_table, peers_table, rate_cell, signed_answers_table)
from node.blocking import off_loop
from node.errors import ConfigError
from node.runtime.loading import LoadedModel
from node.runtime.options import DEFAULT_MAX_QUEUE
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Conviction, Ledger

if TYPE_CHECKING:
    from p2p.network import NetworkConfig

# A full 8k-token context is ~40 KB of text; 1 MiB leaves room for long chat histories while
# keeping a hostile body from costing real memory.
MAX_BODY_BYTES = 1 << 20


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


# ---------------------------------------------------------------------- receipts, health, metrics, status


async def get_receipt(request: web.Request) -> web.Response:
    """The answer file behind a receipt while it is retained: what ``proofmesh verify`` takes.
    Only with the receipt's evidence token (``?token=``) or to the operator; otherwise the
    answer is the unknown receipt's 404, given before the store is read, so a refusal says
    nothing of which receipt ids exist."""
    node = request.app[NODE]
    receipt_id = request.match_info["receipt_id"]
    if request[IS_OPERATOR] or node.evidence_tokens.admits(receipt_id, request.query.get(TOKEN_PARAM)):
        answer = await off_loop(node.store.get, receipt_id)
        node.metrics.receipt_lookups.labels("found" if answer else "missing").inc()
    else:
        answer = None
        node.metrics.receipt_lookups.labels("refused").inc()
    if answer is None:
        raise APIError(404, f"no receipt {receipt_id!r} here (unknown, or past the retention window)",
                       param="receipt_id", code="receipt_not_found")
    return json_response(answer)


NodeStatus = Literal["ok", "shutting_down", "degraded"]
_STATUS_TONES: dict[NodeStatus, Tone] = {"ok": "good", "shutting_down": "warn", "degraded": "bad"}


def _status(node: Node) -> NodeStatus:
    """Degraded: the p2p thread is down (and being restarted)."""
    if node.shutting_down:
        return "shutting_down"
    return "degraded" if node.network is not None and not node.network.running else "ok"


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    answers, size = await off_loop(node.store.stats)
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
    answers, size = await off_loop(node.store.stats)
    network, status = node.network, _status(node)
    facts = [
        ("status", Cell(status, tone=_STATUS_TONES[status])),
        ("node id", Cell(node.key.node_id)),
        ("generating", rate_cell(node.token_rate.per_second(), node.token_rate.window_s)),
        ("evidence kept", Cell(f"{answers} answer{'' if answers == 1 else 's'}, {size / 2**10:,.1f} KiB")),
        ("p2p", Cell(", ".join(network.addrs) or "listening") if network is not None else Cell("no network", tone="muted")),
    ]
    signed = signed_answers_table(node) if request[IS_OPERATOR] else locked_table("Answers signed", operator=True)
    if not request[HOLDS_API_KEY]:
        tables = [signed, locked_table("Peers"), locked_table("Fraud convictions")]
    else:
        tables = [signed, peers_table(network), convictions_table(await _convictions(request.app, node))]
    return html_response(StatusPage("ProofMesh node", facts, [models_table(node), *tables]))


async def _convictions(app: web.Application, node: Node) -> list[Conviction] | None:
    """The newest convictions in the node's ledger; None without a network (no ledger)."""
    if node.network is None:
        return None
    from node.api import peering  # loaded already: the node joined a network

    return await off_loop(app[peering.SERVICES].ledger.convictions, limit=MAX_ROWS)


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    states = [(s.name, s.engine.queue_depth, s.engine.running) for s in node.models.values()]
    body = node.metrics.render(states, await off_loop(node.store.stats))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------- the app


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

    def bound(url: str) -> None:  # where peers reach the node (``NodeServices.infer`` answers through it)
        node.url = url

    async def mark_shutting_down(_: web.Application) -> None:
        node.shutting_down = True

    async def close_engines(_: web.Application) -> None:
        await node.close()

    app[ON_BOUND] = bound
    app.on_shutdown.append(mark_shutting_down)  # after the listener closes, before in-flight requests end
    app.on_cleanup.append(close_engines)  # after in-flight requests ended or were cancelled
    return app
