"""The node's side of the p2p network (``p2p/``): what the node offers its peers, and how its
HTTP API reaches theirs.

Serving peers: ``NodeServices`` implements ``p2p.protocols.LocalNode``. A forwarded request is
answered through this node's own HTTP API on loopback, so it takes exactly the path of a direct
request (validation, admission, 429s, signing, evidence, metrics) and the bytes that go back are
the ones a direct client would get, receipt included (about a millisecond of extra cost).
Re-checks run the verifier on the engine's thread, between batch steps.

Using peers: ``forward_to_peers`` (middleware) sends a generation request for a model this node
does not serve, or serves but is too full to admit, to the network and relays the answer; ``/v1/models`` adds the network's models
(``Node.model_cards``); three routes report and reach peers:

    GET  /v1/peers                                 known peers: capabilities, load, last seen
    POST /v1/peers/verify[?exclude=ID,...]         an answer file -> a peer's signed attestation
    POST /v1/fraud-proofs                          a fraud proof: re-checked here if possible, then spread
    GET  /v1/peers/{peer_id}/receipts/{receipt_id}?token=
                                                   an answer file, fetched from its signer

That last route is no way around the evidence token (``node/api/evidence_tokens.py``): this node
cannot check another node's tokens, so it passes the token on and the signer decides; without
one it asks nobody. Its own operator key is no master key for other nodes' answers.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections import OrderedDict
from contextlib import aclosing
from typing import AsyncIterator, Iterator, Sequence

import aiohttp
import numpy as np
from aiohttp import web

from node.api.errors import RETRY_AFTER_S, APIError, Handler, json_object, parse_body, read_body
from node.api.evidence_tokens import TOKEN_PARAM
from node.api.server import json_response
from node.api.service import NODE, Node
from node.blocking import off_loop
from node.errors import ClientShareError, ConfigError, EngineBusyError
from node.runtime.loading import LoadedModel
from p2p.errors import NoPeerAvailable, P2PError, RemoteError, Unavailable
from p2p.network import SSE_CONTENT_TYPE, NetworkConfig, PeerNetwork
from p2p.protocols import InferPart
from p2p.wire import EVIDENCE_TOKEN_MAX_CHARS, FRAUD_PROTOCOL, FraudNotice, InferData, InferEnd, InferHead, InferRequest, ModelOffer
from verify.attestation import Attestation
from verify.evidence import AnswerFile, Fingerprint, position_fingerprint
from verify.fraud import FraudProof, accusation_problems, check_fraud_proof, sign_verdict
from verify.ledger import Ledger
from verify.verifier import verify_answer

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-ProofMesh-Forwarded"  # marks loopback requests from a peer: never forwarded again
PEER_HEADER = "X-ProofMesh-Peer"  # on a forwarded answer: the peer that served it
# Distinct observed serving peers whose vouchers convict on a node that cannot re-check a proof
# (0: such a node never convicts); see NodeServices.fraud.
DEFAULT_FRAUD_QUORUM = 2
FRAUD_MEMORY = 4096  # receipts whose fraud notices are remembered (dedupe), oldest forgotten first
INFER_PATHS = ("/v1/completions", "/v1/chat/completions")

SERVICES = web.AppKey("services", "NodeServices")
WATCHDOG = web.AppKey("p2p_watchdog", asyncio.Task)
WATCHDOG_INTERVAL_S = 5.0


async def _watchdog(network: PeerNetwork) -> None:
    """Supervise the p2p thread: if it ever ends (nothing a peer sends should do that: every
    handler and discovery round is contained), /health says degraded and it is started again."""
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        if not network.running:
            log.error("the p2p thread is not running: starting it again")
            try:
                await network.restart()
            except P2PError as exc:
                log.error("the p2p thread could not be restarted: %s (next try in %.0f s)", exc, WATCHDOG_INTERVAL_S)


# ---------------------------------------------------------------------- serving peers


class _RecordingBackend:
    """A verifier backend that keeps the top-k fingerprint of every row it computed (the
    validator's own fingerprints, at the answer's claimed tokens), block by block: never every
    row's logits at once."""

    def __init__(self, model: LoadedModel, output_ids: Sequence[int]):
        self.model, self.model_id, self.vocab_size = model, model.model_id, model.vocab_size
        self.output_ids = output_ids
        self.eos_token_ids, self.decode, self.grammar_vocabulary = model.eos_token_ids, model.decode, model.grammar_vocabulary
        self.fingerprints: list[Fingerprint] = []

    def score_blocks(self, token_ids: Sequence[int], from_position: int = 0) -> Iterator[np.ndarray]:
        for block in self.model.score_blocks(token_ids, from_position):
            for row in block[:len(self.output_ids) - len(self.fingerprints)]:
                self.fingerprints.append(position_fingerprint(row, self.output_ids[len(self.fingerprints)]))
            yield block


class NodeServices:
    """What this node does for its peers (``p2p.protocols.LocalNode``)."""

    def __init__(self, node: Node, api_key: str | None, ledger: Ledger, fraud_quorum: int = DEFAULT_FRAUD_QUORUM):
        self.node = node
        self.ledger = ledger
        self.fraud_quorum = fraud_quorum
        self._headers = {FORWARDED_HEADER: "1", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._session: aiohttp.ClientSession | None = None
        self._fraud_seen: OrderedDict[str, set[str]] = OrderedDict()  # receipt id -> fraud vouchers seen

    def offers(self) -> tuple[list[ModelOffer], int, str | None]:
        models = [ModelOffer(name=s.name, model_id=s.loaded.model_id, backend=s.loaded.backend,
                             max_context=s.loaded.max_context) for s in self.node.models.values()]
        load = sum(s.engine.queue_depth + s.engine.running for s in self.node.models.values())
        return models, load, self.node.url

    async def infer(self, request: InferRequest) -> AsyncIterator[InferPart]:
        if self.node.url is None:
            yield InferHead(status=503, content_type="application/json", end=True)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        url = self.node.url.replace("//0.0.0.0:", "//127.0.0.1:") + request.path
        headers = {**self._headers, "Content-Type": "application/json"}
        async with self._session.post(url, data=request.body.encode(), headers=headers) as response:
            content_type = response.headers.get("Content-Type", "application/json")
            if not content_type.startswith(SSE_CONTENT_TYPE):  # whole at once: all in the head
                body = await response.read()
                yield InferHead(status=response.status, content_type=content_type,
                                data=body.decode("utf-8", errors="replace"), end=True)
                return
            yield InferHead(status=response.status, content_type=content_type)
            text = codecs.getincrementaldecoder("utf-8")()  # a chunk may end inside a character
            async for chunk in response.content.iter_any():
                if data := text.decode(chunk):
                    yield InferData(data=data)
            if data := text.decode(b"", final=True):
                yield InferData(data=data)
        yield InferEnd()

    async def verify(self, answer: AnswerFile) -> Attestation:
        served = self.node.by_model_id(answer.receipt.model_id)
        if served is None:
            raise LookupError(f"model {answer.receipt.model_id} is not served here")
        backend = _RecordingBackend(served.loaded, answer.evidence.output_ids)
        try:
            verdict = await served.engine.run_exclusive(verify_answer, answer, backend)
        except EngineBusyError as exc:
            raise Unavailable(str(exc)) from exc
        fingerprints = backend.fingerprints[:len(answer.evidence.output_ids)]
        return await off_loop(lambda: Attestation.sign(sign_verdict(verdict, self.node.key), fingerprints, self.node.key))

    async def evidence(self, receipt_id: str, token: str) -> AnswerFile | None:
        if not self.node.evidence_tokens.admits(receipt_id, token):
            return None  # as for an unknown receipt: which ids exist is not told
        return await off_loop(self.node.store.get, receipt_id)

    async def fraud(self, notice: FraudNotice, sender: str) -> FraudNotice | None:
        """Act on a fraud proof, and say what to pass on (None: nothing).

        Conviction policy (DESIGN.md): a node that serves the accused answer's model re-checks the
        proof itself, once per receipt (``check_fraud_proof``: the verdict inside is never
        trusted; evidence that is not the accused node's own never convicts), and, if it holds,
        convicts the signer and adds its own signed verdict as a voucher. A node without the model
        convicts only when at least ``fraud_quorum`` distinct peers whose service it has itself
        observed (they answered requests it forwarded) vouch, or when the accusation is signed
        with its own key (a verifier sidecar and its embedded gateway are one party); a quorum of
        0 means never. It passes the notice on whenever it learnt a new voucher, so peers that can
        re-check it see it, and drops it otherwise, which ends the flood. Receipts are remembered
        in a bounded table (``FRAUD_MEMORY``); convictions and their proofs persist in the ledger."""
        proof = notice.proof
        receipt = proof.answer.receipt
        network = self.node.network
        if accusation_problems(proof):
            network.metrics.reject(FRAUD_PROTOCOL, "bad_signature")
            return None
        if receipt.node_id in network.table.convicted():
            return None
        served = self.node.by_model_id(receipt.model_id)
        if served is not None:
            if receipt.receipt_id in self._fraud_seen:
                return None  # re-checked already: one model run per receipt, whatever the vouchers
            try:
                check = await served.engine.run_exclusive(check_fraud_proof, proof, served.loaded)
            except EngineBusyError:
                log.warning("fraud proof against %s from %s not re-checked now: the engine is busy", receipt.node_id, sender)
                return None  # not remembered: the next notice of this receipt gets its re-check
            self._remember(receipt.receipt_id, set())
            if not check.upheld:
                log.warning("fraud proof against %s from %s does not hold: %s", receipt.node_id, sender, check.reasons)
                return None
            await self._convict(proof, "re-checked the proof on the model")
            voucher = await off_loop(sign_verdict, check.recomputed, self.node.key)
            return notice.model_copy(update={"vouchers": [*notice.vouchers, voucher]})
        signed = {v.verifier_id for v in (proof.verdict, *notice.vouchers) if v.signature_is_valid()
                  and v.verdict.verdict == "fraud" and v.verdict.receipt_id == receipt.receipt_id}
        known = self._fraud_seen.get(receipt.receipt_id)
        if known is not None and signed <= known:
            return None  # nothing new about this receipt
        vouched = self._remember(receipt.receipt_id, signed)
        observed = network.table.observed(receipt.model_id)
        trusted = {v for v in vouched if v in observed}
        if self.node.key.node_id in vouched:
            await self._convict(proof, "the accusation is signed with this node's own key")
        elif self.fraud_quorum and len(trusted) >= self.fraud_quorum:
            await self._convict(proof, f"vouched for by {len(trusted)} observed serving peers: {', '.join(sorted(trusted))}")
        return notice

    def _remember(self, receipt_id: str, vouchers: set[str]) -> set[str]:
        """The vouchers known for a receipt, ``vouchers`` added; the oldest receipt is forgotten
        past ``FRAUD_MEMORY`` (a flood of distinct proofs cannot grow memory)."""
        known = self._fraud_seen.pop(receipt_id, set()) | vouchers
        self._fraud_seen[receipt_id] = known
        while len(self._fraud_seen) > FRAUD_MEMORY:
            self._fraud_seen.popitem(last=False)
        return known

    async def _convict(self, proof: FraudProof, why: str) -> None:
        receipt = proof.answer.receipt
        await off_loop(self.ledger.add_fraud_proof, proof)  # persisted first: a conviction survives a restart
        self.node.network.table.convict(receipt.node_id)
        log.warning("convicted %s of fraud (receipt %s): %s", receipt.node_id, receipt.receipt_id, why)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def attach(app: web.Application, node: Node, config: NetworkConfig, api_key: str | None, ledger: Ledger,
           fraud_quorum: int = DEFAULT_FRAUD_QUORUM) -> None:
    """Join the network with the app: start on startup, leave on cleanup, add the peer routes.
    Convictions in ``ledger`` (from earlier runs) hold from the start."""
    services = NodeServices(node, api_key, ledger, fraud_quorum)
    app[SERVICES] = services
    try:
        node.network = PeerNetwork(node.key, config, services, node.metrics.registry)
    except P2PError as exc:
        raise ConfigError(str(exc)) from exc
    for convicted in ledger.convicted():
        node.network.table.convict(convicted)

    async def start(_: web.Application) -> None:
        try:
            await node.network.start()
        except P2PError as exc:
            raise ConfigError(f"cannot join the p2p network: {exc}") from exc
        app[WATCHDOG] = asyncio.create_task(_watchdog(node.network))

    async def stop(_: web.Application) -> None:
        app[WATCHDOG].cancel()
        await asyncio.gather(app[WATCHDOG], return_exceptions=True)
        await node.network.stop()
        await services.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_routes(routes)


# ---------------------------------------------------------------------- using peers


def _model_of(raw: bytes) -> str | None:
    try:
        model = json_object(raw).get("model")
    except APIError:
        return None  # not a JSON object: the route's own validation answers
    return model if isinstance(model, str) else None


@web.middleware
async def forward_to_peers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send a request to the best peer when its model is served elsewhere, or served here but
    full (the engine refused it: nothing was sent yet), and relay the peer's answer. A client
    refused for its own share (``ClientShareError``) is not forwarded."""
    node = request.app[NODE]
    if (node.network is None or request.method != "POST" or request.path not in INFER_PATHS
            or FORWARDED_HEADER in request.headers):
        return await handler(request)
    raw = await read_body(request)
    model = _model_of(raw)
    if model is None or not node.network.serves(model):
        return await handler(request)
    if node.serves(model):
        try:
            return await handler(request)
        except ClientShareError:
            raise  # this client holds its share here: the network's capacity is no way round that
        except EngineBusyError:
            log.info("full: forwarding a request for %s to a peer", model)
    return await _relay(request, node, model, raw)


async def _relay(request: web.Request, node: Node, model: str, raw: bytes) -> web.StreamResponse:
    try:
        answer = await node.network.forward(model, request.path, raw.decode("utf-8", errors="replace"))
    except NoPeerAvailable as exc:
        raise APIError(503, str(exc), code="no_peer_available", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    response = web.StreamResponse(status=answer.head.status,
                                  headers={"Content-Type": answer.head.content_type, PEER_HEADER: answer.peer_id})
    await response.prepare(request)
    try:
        async with aclosing(answer.body) as body:  # a client that leaves cancels the peer's answer now
            async for data in body:
                await response.write(data.encode())
    except P2PError as exc:  # only a stream can fail here: its headers are out, report in-band
        log.warning("peer %s failed mid-stream: %s", answer.peer_id, exc)
        error = APIError(502, f"the serving peer {answer.peer_id} failed mid-stream: {exc}", code="peer_failed")
        await response.write(b"data: " + error.body().model_dump_json().encode() + b"\n\ndata: [DONE]\n\n")
    return response


routes = web.RouteTableDef()


@routes.get("/v1/peers")
async def list_peers(request: web.Request) -> web.Response:
    network = request.app[NODE].network
    convicted = network.table.convicted()
    peers = [{
        "peer_id": p.record.peer_id,
        "models": [m.model_dump() for m in p.record.models],
        "load": p.record.load,
        "in_flight": p.in_flight,
        "http": p.record.http,
        "addrs": p.record.addrs,
        "last_seen": p.last_seen,
        "latency_ms": None if p.latency_s is None else round(p.latency_s * 1000, 2),
        "failures": p.failures,
        "expires": p.record.expires,
        "convicted": p.record.peer_id in convicted,
    } for p in sorted(network.peers(), key=lambda p: p.record.peer_id)]
    return web.json_response({"object": "list", "peer_id": network.peer_id, "data": peers, "convicted": sorted(convicted)})


@routes.post("/v1/peers/verify")
async def verify_on_peer(request: web.Request) -> web.Response:
    answer = await parse_body(request, AnswerFile)
    exclude = {peer for peer in request.query.get("exclude", "").split(",") if peer}  # validators the caller has
    try:
        attestation = await request.app[NODE].network.verify(answer, exclude)
    except NoPeerAvailable as exc:
        raise APIError(503, str(exc), code="no_peer_available") from exc
    return json_response(attestation)


@routes.post("/v1/fraud-proofs")
async def submit_fraud_proof(request: web.Request) -> web.Response:
    """A fraud proof (a verifier sidecar's): acted on as a notice from this node itself, then
    spread over ``/proofmesh/fraud/1``."""
    proof = await parse_body(request, FraudProof)
    if problems := accusation_problems(proof):
        raise APIError(400, f"not an accusation against the node: {'; '.join(problems)}", param="verdict",
                       code="invalid_fraud_proof")
    network = request.app[NODE].network
    onward = await network.local.fraud(FraudNotice(proof=proof), network.peer_id)
    relayed = await network.spread_fraud(onward) if onward is not None else 0
    accused = proof.answer.receipt.node_id
    return web.json_response({"accused": accused, "convicted": accused in network.table.convicted(), "relayed_to": relayed},
                             status=202)


@routes.get("/v1/fraud-proofs/{receipt_id}")
async def get_fraud_proof(request: web.Request) -> web.Response:
    """The proof a conviction rests on, so anyone holding the model can re-check why."""
    receipt_id = request.match_info["receipt_id"]
    proof = await off_loop(request.app[SERVICES].ledger.fraud_proof, receipt_id)
    if proof is None:
        raise APIError(404, f"no fraud proof for receipt {receipt_id!r} here", param="receipt_id", code="fraud_proof_not_found")
    return json_response(proof)


@routes.get("/v1/peers/{peer_id}/receipts/{receipt_id}")
async def evidence_from_peer(request: web.Request) -> web.Response:
    peer_id, receipt_id = request.match_info["peer_id"], request.match_info["receipt_id"]
    token = request.query.get(TOKEN_PARAM)
    if not token or len(token) > EVIDENCE_TOKEN_MAX_CHARS:
        raise APIError(404, f"no receipt {receipt_id!r} without its evidence token (?{TOKEN_PARAM}=)", param=TOKEN_PARAM,
                       code="receipt_not_found")
    try:
        answer = await request.app[NODE].network.evidence(peer_id, receipt_id, token)
    except RemoteError as exc:
        raise APIError(404, str(exc), code="receipt_not_found") from exc
    except P2PError as exc:
        raise APIError(502, f"cannot fetch the evidence from {peer_id}: {exc}", code="peer_failed") from exc
    return json_response(answer)
