"""The sidecar's front door: its routes (an OpenAI-compatible proxy) and the app factory.

Clients talk to the sidecar exactly as to a node; requests go upstream (``node.sidecar.upstreams``:
which node serves each), and what comes back is parsed once, bound to the request
(``node.sidecar.auditor``: binding and the audit of a share) and served rebuilt from the signed
answer files, never as the upstream's bytes (``node.sidecar.relay``). What an upstream says of
itself (its model cards) is not trusted for anything it costs others: binding uses the sidecar's
own model (its tokenizer, its context size for a chat's default budget).

A request may ask for redundant execution (``"proofmesh": {"redundancy": n}`` in the body or the
header ``X-ProofMesh-Redundancy: n``): the same request, with the same seed, goes to ``n``
distinct nodes, and the answer comes back only if all agree within the verifier's tolerances
(``verify.redundancy``), with every node's receipt; otherwise an OpenAI-shaped error names the
disagreement and every answer is audited, so the one that lied is convicted.

Routes: the proxied ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``; ``POST
/v1/audits`` (an answer file: audited now, the record returned); ``GET /v1/audits/{receipt_id}``;
``GET /v1/audits?node_id=&state=&limit=`` (those two for the sidecar's operator only); ``GET
/health``; ``GET /``, the operator's status page (``node/sidecar/status_page.py``).
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from node.api.clients import BODY_BUDGET, BodyBudget
from node.api.errors import (IS_OPERATOR, APIError, describe_validation_error, errors_middleware, json_object, read_body,
                             require_api_key, require_operator)
from node.api.protocol import ModelCard, ModelList
from node.api.rendering import TokenTexts
from node.api.server import json_response
from node.api.status_page import html_response
from node.blocking import off_loop
from node.sidecar.auditor import Auditor
from node.sidecar.relay import AuditModel, ClientRequest, Refused, parse_request, rebuild_json, relay_json, relay_stream, upstream_error
from node.sidecar.status_page import sidecar_page
from node.sidecar.upstreams import EVIDENCE_DEADLINE_S, UPSTREAM_TIMEOUT, Upstream, Upstreams
from verify.binding import Endpoint
from verify.evidence import AnswerFile
from verify.identity import NodeKey
from verify.ledger import AUDIT_STATES, Ledger
from verify.redundancy import disagreement

PROXIED_POSTS = ("/v1/chat/completions", "/v1/completions")
SIDECAR = web.AppKey("sidecar", "Sidecar")
REDUNDANCY_HEADER = "X-ProofMesh-Redundancy"


class Sidecar(Auditor):
    """The auditor with its front door: the upstreams it proxies (``upstreams``) and the models
    clients may call, by the name clients use or model_id (``backends``, held here). ``rng``:
    routing's random source (``Upstreams``)."""

    def __init__(self, upstreams: Sequence[str], ledger: Ledger, key: NodeKey, backends: dict[str, AuditModel], *,
                 audit_rate: float, validators: int = 0, secret: bytes | None = None, validator_gateway: str | None = None,
                 evidence_deadline_s: float = EVIDENCE_DEADLINE_S, hold_streams: bool = False, rng: random.Random | None = None):
        if not backends:
            raise ValueError("the sidecar needs the model it verifies: it binds every answer with its tokenizer")
        super().__init__(Upstreams(upstreams, ledger, evidence_deadline_s=evidence_deadline_s, rng=rng), ledger, key, backends,
                         audit_rate=audit_rate, validators=validators, secret=secret, validator_gateway=validator_gateway)
        self.hold_streams = hold_streams  # show a stream's text only once it is bound
        self.names = {Path(m.name).name: model_id for model_id, m in backends.items()}  # what clients call each model
        self._token_texts = {model_id: TokenTexts(m.tokenizer) for model_id, m in backends.items()}
        self.started = int(time.time())

    def client_request(self, endpoint: Endpoint, fields: dict, headers: dict[str, str]) -> ClientRequest:
        """The client's request, resolved against the sidecar's own models (by the name clients
        use, or model_id): an upstream's card never decides which model or context binds it."""
        body = parse_request(endpoint, fields)
        model_id = self.names.get(body.model, body.model)
        model = self.backends.get(model_id)
        if model is None:
            raise APIError(400, f"this verifier holds no model {body.model!r} to check its answers with; GET /v1/models "
                           "lists those it holds", param="model", code="model_not_found")
        return ClientRequest.of(endpoint, body, fields, headers, Path(model.name).name, model, self._token_texts[model_id])

    def model_cards(self) -> list[ModelCard]:
        """The models answers can be checked with here: what ``GET /v1/models`` lists."""
        return [ModelCard(id=Path(m.name).name, created=self.started, model_id=model_id, backend=m.backend,
                          max_context=m.max_context, format=m.weight_format) for model_id, m in sorted(self.backends.items())]


def _redundancy(request: web.Request, body: dict) -> int:
    asked = request.headers.get(REDUNDANCY_HEADER)
    extension = body.pop("proofmesh", None)
    if asked is None and isinstance(extension, dict):
        asked = extension.get("redundancy")
    if asked is None:
        return 1
    if isinstance(asked, str) and asked.strip().isdigit():
        asked = int(asked)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
        raise APIError(400, f"redundancy must be a positive integer, got {asked!r}", code="invalid_redundancy")
    return asked


def _endpoint(path: str) -> Endpoint:
    return "chat" if path.endswith("/chat/completions") else "completions"


async def proxy_post(request: web.Request) -> web.StreamResponse:
    """Forward a completion request with a seed the sidecar drew when the client gave none (a node
    that picks its own seed can grind it), bind the answer and serve it rebuilt from what the node
    signed (``node.sidecar.relay``), and audit a share; or, with redundancy n, the same request to
    n nodes. The work goes on in its own task when the client hangs up: binding and audit finish."""
    sidecar = request.app[SIDECAR]
    fields = json_object(await read_body(request))
    n = _redundancy(request, fields)
    if fields.get("seed") is None:
        fields["seed"] = secrets.randbits(63)  # the sidecar's CSPRNG: committed as a client seed
    auth = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}  # the client's key goes on
    req = await asyncio.to_thread(sidecar.client_request, _endpoint(request.path), fields, auth)
    headers = {**auth, "Content-Type": "application/json"}
    if n > 1:
        return await _redundant(request, sidecar, req, n, headers)
    await sidecar.upstreams.identify()
    (up,) = await sidecar.upstreams.pick(1)
    task = asyncio.create_task(_forward(request, sidecar, up, req, headers))
    sidecar.track(task)
    return await asyncio.shield(task)


async def _forward(request: web.Request, sidecar: Sidecar, up: Upstream, req: ClientRequest, headers: dict) -> web.StreamResponse:
    try:
        upstream = await sidecar.session.post(f"{up.url}{request.path}", data=json.dumps(req.fields).encode(), headers=headers,
                                              allow_redirects=False)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise APIError(502, f"upstream node {up.url} unreachable: {exc}", code="upstream_unreachable") from exc
    async with upstream:
        if not 200 <= upstream.status < 300:
            if upstream.status < 400:  # a redirect, or no answer at all
                raise await sidecar.refuse(up, f"upstream answered {upstream.status}, not an answer")
            raise upstream_error(upstream.status, await upstream.read())
        if req.body.stream:
            return await relay_stream(sidecar, up, req, upstream, request, hold=sidecar.hold_streams)
        try:
            return await relay_json(sidecar, up, req, await upstream.read())
        except Refused as exc:
            raise await sidecar.refuse(up, str(exc)) from None


async def _redundant(request: web.Request, sidecar: Sidecar, req: ClientRequest, n: int, headers: dict) -> web.Response:
    """The same request, with one seed, on ``n`` distinct nodes; their answers must agree."""
    if req.body.stream:
        raise APIError(400, "redundant execution returns one agreed answer: set stream to false", code="invalid_redundancy")
    await sidecar.upstreams.identify()
    chosen = await sidecar.upstreams.pick(n)
    payload = json.dumps(req.fields).encode()

    async def ask(up: Upstream) -> tuple[BaseModel, list[AnswerFile]]:
        try:
            async with sidecar.session.post(f"{up.url}{request.path}", data=payload, headers=headers, allow_redirects=False) as resp:
                data, status = await resp.read(), resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise APIError(502, f"node {up.node_id or up.url} failed: {exc}", code="upstream_unreachable") from exc
        if not 200 <= status < 300:
            raise upstream_error(status if status >= 400 else 502, data)
        try:
            return await rebuild_json(sidecar, up, req, data)
        except Refused as exc:
            raise await sidecar.refuse(up, str(exc)) from None

    results = await asyncio.gather(*(ask(up) for up in chosen))
    (first, first_answers), rest = results[0], results[1:]
    for up, (_, answers) in zip(chosen[1:], rest):
        problem = (f"{len(first_answers)} vs {len(answers)} answers" if len(answers) != len(first_answers) else
                   next((d for a, b in zip(first_answers, answers) if (d := disagreement(a, b))), None))
        if problem:
            sidecar.spawn(sidecar.audit_all([a for _, group in results for a in group]))  # escalate: who lied?
            raise APIError(502, f"nodes {chosen[0].node_id} and {up.node_id} disagree: {problem}", code="redundancy_disagreement")
    body = first.model_dump(mode="json")
    body["proofmesh_redundancy"] = {
        "agreed": True,
        "answers": [{"node_id": answers[0].receipt.node_id, "proofmesh": [a.model_dump(include={"receipt", "signature", "public_key"})
                                                                          for a in answers]} for _, answers in results],
    }
    for _, answers in results:  # their evidence is in hand already
        sidecar.answered(answers)
    return web.json_response(body)


async def proxy_models(request: web.Request) -> web.Response:
    """The models this sidecar checks answers with (its own, not an upstream's list)."""
    return json_response(ModelList(data=request.app[SIDECAR].model_cards()))


async def submit_audit(request: web.Request) -> web.Response:
    """POST /v1/audits: an answer file, audited now."""
    sidecar = request.app[SIDECAR]
    try:
        answer = AnswerFile.model_validate_json(await read_body(request))
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        raise APIError(400, f"not an answer file: {message}", param=param, code="invalid_answer_file") from None
    if answer.receipt.model_id not in sidecar.backends:
        raise APIError(400, f"this verifier holds no model {answer.receipt.model_id[:16]}… to audit the answer on",
                       code="model_not_held")
    record = await sidecar.audit(answer)
    return json_response(record)


async def get_audit(request: web.Request) -> web.Response:
    """The operator's: which answers were audited must stay hidden from the nodes (and a
    receipt id from the other clients: ``node/api/evidence_tokens.py``)."""
    require_operator(request, "an audit record")
    record = await off_loop(request.app[SIDECAR].ledger.audit, request.match_info["receipt_id"])
    if record is None:
        return APIError(404, f"no audit of receipt {request.match_info['receipt_id']!r}", code="audit_not_found").response()
    return json_response(record)


async def list_audits(request: web.Request) -> web.Response:
    """The operator's, as ``get_audit``."""
    require_operator(request, "the audit list")
    q = request.query
    state = q.get("state")
    if state is not None and state not in AUDIT_STATES:
        return APIError(400, f"state is one of {', '.join(AUDIT_STATES)}", code="invalid_state").response()
    try:
        limit = int(q.get("limit", 100))
    except ValueError:
        return APIError(400, "limit is an integer", code="invalid_limit").response()
    records = await off_loop(request.app[SIDECAR].ledger.audits, node_id=q.get("node_id"), state=state, limit=max(1, min(limit, 1000)))
    return web.json_response({"object": "list", "data": [json.loads(r.model_dump_json()) for r in records]})


async def health(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    convicted = await off_loop(sidecar.ledger.convicted)
    return web.json_response({"status": "ok", "upstreams": [{"url": up.url, "node_id": up.node_id} for up in sidecar.upstreams],
                              "convicted": sorted(convicted), "audit_rate": sidecar.audit_rate,
                              "verifier_id": sidecar.key.node_id, "models": sorted(sidecar.backends)})


async def status_page(request: web.Request) -> web.Response:
    return html_response(await sidecar_page(request.app[SIDECAR], request[IS_OPERATOR]))


def make_sidecar_app(sidecar: Sidecar, api_keys: Sequence[str] = (), operator_keys: Sequence[str] = ()) -> web.Application:
    """The sidecar's app; with ``api_keys`` every /v1 route needs one (audits and proofs included);
    reading audits needs one of ``operator_keys`` (none: nobody reads them over HTTP)."""
    app = web.Application(client_max_size=16 << 20,  # long answer files
                          middlewares=[errors_middleware(), require_api_key(api_keys, operator_keys)])
    app[SIDECAR] = sidecar
    app[BODY_BUDGET] = BodyBudget()
    for path in PROXIED_POSTS:
        app.router.add_post(path, proxy_post)
    app.router.add_get("/v1/models", proxy_models)
    app.router.add_post("/v1/audits", submit_audit)
    app.router.add_get("/v1/audits", list_audits)
    app.router.add_get("/v1/audits/{receipt_id}", get_audit)
    app.router.add_get("/health", health)
    app.router.add_get("/", status_page)

    async def open_session(_: web.Application) -> None:
        sidecar.upstreams.session = aiohttp.ClientSession(timeout=UPSTREAM_TIMEOUT)

    async def close_session(_: web.Application) -> None:
        await sidecar.drain()
        await sidecar.session.close()

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


__all__ = ["Sidecar", "make_sidecar_app"]
