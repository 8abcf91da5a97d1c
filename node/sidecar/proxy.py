"""The verifier sidecar: an OpenAI-compatible proxy in front of a node that audits what passes.

Clients talk to the sidecar exactly as to a node; requests go upstream, and what comes back is
parsed once, bound to the request with the evidence behind every receipt in it (fetched always,
so the serving node sees the same traffic for audited and unaudited answers), and served rebuilt
from the signed answer files, never as the upstream's bytes (``node.sidecar.relay``). Then a
fraction ``audit_rate`` of the answers is audited. Whether a receipt is audited
is ``HMAC(secret, receipt_id) < audit_rate``: the secret is drawn at start and never leaves the
sidecar, and the receipt id is fixed by the node's signature before the decision, so the node
can neither predict nor steer it. An audit re-executes the answer by teacher forcing on a local
copy of the model (``verify.verifier``), signs the verdict with the sidecar's key, and records
audit, verdict and, on fraud, a fraud proof in the ledger (``verify.ledger``), where reputation
moves. With ``validators = k`` each audit is also re-executed on ``k`` peers of the network,
asked through an upstream node's ``POST /v1/peers/verify`` (which excludes the signer and the
peers already asked); each answers with its own signed verdict and fingerprints, and a validator
whose verdict goes against the outcome loses reputation, so a lazy one (yes to everything) is
caught the first time it passes a cheat. A fraud proof goes to an upstream node's ``POST
/v1/fraud-proofs``, from where the network re-checks and spreads it (``/proofmesh/fraud/1``).

Blame follows signatures: a refusal (an answer that is not bound, a replayed receipt, evidence
withheld) counts against the upstream connection that served it (``Upstream.ledger_id``), never
against the node a response or an unverified file names; a node id loses reputation only through
audits of evidence its own signature covers. What an upstream says of itself (its node id, its
model cards) is not trusted for anything it costs others: binding uses the sidecar's own model
(its tokenizer, its context size for a chat's default budget).

With several ``upstreams`` the sidecar routes each request to one of them, drawn with
probability proportional to reputation (the lower of its connection's and its declared node's,
so declaring another's id gains nothing) and never to a node the ledger has convicted; a request may ask for redundant
execution (``"proofmesh": {"redundancy": n}`` in the body or the header
``X-ProofMesh-Redundancy: n``): the same request, with the same seed, goes to ``n`` distinct
nodes, and the answer comes back only if all agree within the verifier's tolerances
(``verify.redundancy``), with every node's receipt; otherwise an OpenAI-shaped error names the
disagreement and every answer is audited, so the one that lied is convicted.

Routes: the proxied ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``; ``POST
/v1/audits`` (an answer file: audited now, the record returned); ``GET /v1/audits/{receipt_id}``;
``GET /v1/audits?node_id=&state=&limit=`` (those two for the sidecar's operator only); ``GET
/health``; ``GET /``, the operator's status page (``node/sidecar/status_page.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
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
from node.api.evidence_tokens import peer_receipt_path, receipt_path
from node.api.metrics import TokenRate
from node.api.protocol import ModelCard, ModelList
from node.api.rendering import TokenTexts
from node.api.status_page import html_response
from node.sidecar.relay import (AuditModel, ClientRequest, Refused, Upstream, parse_request, rebuild_json, receipts_in,
                                relay_json, relay_stream, upstream_error)
from node.sidecar.status_page import sidecar_page
from verify.attestation import Attestation
from verify.binding import Endpoint, bind_answers
from verify.evidence import AnswerFile
from verify.fraud import FraudProof, SignedVerdict, sign_verdict
from verify.identity import NodeKey
from verify.ledger import AUDIT_STATES, AuditRecord, Ledger
from verify.redundancy import disagreement
from verify.sampling import U64
from verify.verifier import verify_answer

log = logging.getLogger("proofmesh.sidecar")

PROXIED_POSTS = ("/v1/chat/completions", "/v1/completions")
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10)
SIDECAR = web.AppKey("sidecar", "Sidecar")
REDUNDANCY_HEADER = "X-ProofMesh-Redundancy"
# How long the evidence behind a served receipt may take to arrive (retried): past it, withheld.
EVIDENCE_DEADLINE_S = 5.0


def audit_draw(secret: bytes, receipt_id: str) -> float:
    """A uniform number in [0, 1) fixed by the secret and the receipt id: audit iff below the rate."""
    digest = hmac.new(secret, receipt_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / U64


class Sidecar:
    """Proxy, routing, audit decisions, binding, audits, ledger. ``backends``: model_id -> a model
    held here. ``validator_gateway``: the URL of the sidecar's own gateway into the network
    (``--bootstrap``), from whose peer table validators are drawn; never an audited upstream."""

    def __init__(self, upstreams: Sequence[str], ledger: Ledger, key: NodeKey, backends: dict[str, AuditModel], *,
                 audit_rate: float, validators: int = 0, secret: bytes | None = None, validator_gateway: str | None = None,
                 evidence_deadline_s: float = EVIDENCE_DEADLINE_S, hold_streams: bool = False):
        if not 0.0 <= audit_rate <= 1.0:
            raise ValueError("the audit rate is a probability in [0, 1]")
        if not upstreams:
            raise ValueError("the sidecar needs at least one upstream node")
        if not backends:
            raise ValueError("the sidecar needs the model it verifies: it binds every answer with its tokenizer")
        if validators and validator_gateway is None:
            raise ValueError("validators are drawn from the sidecar's own gateway into the network (--bootstrap), "
                             "never through a node it audits")
        self.upstreams = [Upstream(url.rstrip("/")) for url in upstreams]
        self.ledger = ledger
        self.key = key
        self.backends = backends
        self.audit_rate = audit_rate
        self.validators = validators
        self.validator_gateway = validator_gateway.rstrip("/") if validator_gateway else None
        self.evidence_deadline_s = evidence_deadline_s
        self.hold_streams = hold_streams  # show a stream's text only once it is bound
        self._secret = secret or secrets.token_bytes(32)
        self._model_lock = asyncio.Lock()  # one runtime per model, not thread-safe: audits take turns
        self._tasks: set[asyncio.Task] = set()
        self.names = {Path(m.name).name: model_id for model_id, m in backends.items()}  # what clients call each model
        self._token_texts = {model_id: TokenTexts(m.tokenizer) for model_id, m in backends.items()}
        self.started = int(time.time())
        self.token_rate = TokenRate()  # tokens of the answers upstreams gave clients, for the status page
        self.session: aiohttp.ClientSession | None = None

    async def identify(self) -> None:
        """Learn each upstream's node id (its /health), for routing by reputation and conviction."""
        for up in self.upstreams:
            if up.node_id is None:
                try:
                    async with self.session.get(f"{up.url}/health") as resp:
                        up.node_id = (await resp.json())["node_id"]
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
                    log.warning("upstream %s: no node id yet (%s)", up.url, exc)

    def pick(self, n: int) -> list[Upstream]:
        """``n`` distinct upstreams, never a convicted node, each drawn with probability
        proportional to its weight (``weight``): an exponential race, ``random() ** (1 / w)``,
        the largest ``n`` keys win (Efraimidis and Spirakis' weighted sampling without replacement)."""
        convicted = self.ledger.convicted()
        routable = [up for up in self.upstreams if up.node_id not in convicted]
        if len(routable) < n:
            raise APIError(503, f"{n} node(s) needed, {len(routable)} routable (of {len(self.upstreams)}; "
                           f"{len(self.upstreams) - len(routable)} convicted of fraud)", code="not_enough_nodes")
        keys = {id(up): random.random() ** (1.0 / max(self.weight(up), 1e-9)) for up in routable}
        return sorted(routable, key=lambda up: -keys[id(up)])[:n]

    def weight(self, up: Upstream) -> float:
        """The lower of the connection's reputation and its declared node's: refusals lower the
        first, failed audits of the node's own signed answers the second."""
        score = self.ledger.reputation(up.ledger_id).score
        return min(score, self.ledger.reputation(up.node_id).score) if up.node_id else score

    def chosen(self, receipt_id: str) -> bool:
        return audit_draw(self._secret, receipt_id) < self.audit_rate

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

    async def evidence(self, up: Upstream, receipt_id: str, node_id: str, token: str | None,
                       headers: dict[str, str]) -> AnswerFile | None:
        """The answer file behind a receipt: from ``up`` if it signed it, else through ``up`` from
        the peer that did (a gateway relays other nodes' answers; their evidence stays with them).
        Fetched as the client that asked would fetch it (its token, its key: ``headers``).
        Retried until ``evidence_deadline_s``: None then means it was withheld."""
        deadline = asyncio.get_running_loop().time() + self.evidence_deadline_s
        delay = 0.05
        while True:
            for path in (receipt_path(receipt_id, token), peer_receipt_path(node_id, receipt_id, token)):
                try:
                    async with self.session.get(f"{up.url}{path}", headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=self.evidence_deadline_s)) as resp:
                        body, status = await resp.read(), resp.status
                    if status == 200:
                        return AnswerFile.model_validate_json(body)
                    log.info("no evidence for %s at %s%s (%d)", receipt_id, up.url, path, status)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValidationError) as exc:
                    log.warning("evidence for %s through %s unusable: %s", receipt_id, up.url, str(exc)[:200])
                if up.node_id == node_id or not node_id:
                    break
            if asyncio.get_running_loop().time() + delay > deadline:
                return None
            await asyncio.sleep(delay)
            delay *= 2

    async def bind(self, up: Upstream, req: ClientRequest, received: dict | list[dict]) -> list[AnswerFile]:
        """Fetch the evidence of every receipt in ``received`` (the parsed response, or a
        stream's chunks) and bind the answer to the request; returns the answer files in choice
        order. Raises ``Refused`` (the caller counts it against ``up``): evidence withheld (also
        a failed audit of the connection), not the request's answer, a receipt served before."""
        receipts = dict.fromkeys(receipts_in(received))  # a response repeats the first choice's receipt
        answers: dict[str, AnswerFile] = {}
        for receipt_id, node_id, token in receipts:
            answer = await self.evidence(up, receipt_id, node_id, token, req.headers)
            if answer is None or answer.receipt.receipt_id != receipt_id:
                await asyncio.to_thread(self._withheld, receipt_id, up.ledger_id)
                raise Refused(f"upstream {up.url} withheld the evidence of receipt {receipt_id}")
            answers[receipt_id] = answer
        report = await asyncio.to_thread(bind_answers, req.asked, received, answers, req.tokenizer, model_id=req.model.model_id)
        if not report.ok:
            raise Refused(f"the answer of upstream {up.url} is not the answer to this request: {report.summary()}")
        for receipt_id, node_id, _ in receipts:
            if not await asyncio.to_thread(self.ledger.first_sight, receipt_id, node_id):
                raise Refused(f"upstream {up.url} served receipt {receipt_id} before: a replay")
        return [answers[report.receipts[index]] for index in range(len(req.choices))]

    async def refuse(self, up: Upstream, why: str) -> APIError:
        """Count a refused answer against the connection that served it; the error its client gets."""
        log.warning("refused an answer from %s: %s", up.url, why)
        await asyncio.to_thread(self.ledger.record_refusal, "", up.ledger_id, why)
        return APIError(502, why, code="answer_refused")

    def _withheld(self, receipt_id: str, ledger_id: str) -> None:
        """A failed audit of the connection whose evidence never came (its model is unknown)."""
        self.ledger.open_audit(receipt_id, ledger_id, "")
        self.ledger.close_audit(receipt_id, "withheld")

    def answered(self, answers: Sequence[AnswerFile]) -> None:
        """Answers bound to a client's request (every copy of a redundant one): count their tokens,
        then audit a share of them after the response."""
        self.token_rate.add(sum(len(a.evidence.output_ids) for a in answers))
        self.spawn(self.audit_chosen(answers))

    async def audit_chosen(self, answers: Sequence[AnswerFile]) -> None:
        for answer in answers:
            if self.chosen(answer.receipt.receipt_id):
                await self.audit(answer)

    def spawn(self, coroutine) -> None:
        """Run ``coroutine`` after the response (audits must not delay the client)."""
        self.track(asyncio.create_task(coroutine))

    def track(self, task: asyncio.Task) -> None:
        """Keep ``task`` until done (``drain`` waits for it): a relay whose client left, an audit."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def audit_all(self, answers: Sequence[AnswerFile]) -> None:
        for answer in answers:
            await self.audit(answer)

    async def audit(self, answer: AnswerFile) -> AuditRecord:
        """Re-execute ``answer`` locally and, with ``validators``, on that many peers drawn by the
        sidecar's own gateway; record every signed verdict, settle the outcome, and hold
        validators to it. The local verdict decides when there is one, else the peers' majority
        (a tie is escalated to as many peers again, and stays an error if still tied). A validator
        whose verdict went against the outcome — a lazy one says pass to everything — loses
        reputation. Every audit ends in a state, never pending: an answer that is not the node's
        own is ``unattributable`` (nothing moves), broken evidence it signed is ``malformed``."""
        receipt = answer.receipt
        await asyncio.to_thread(self.ledger.open_audit, receipt.receipt_id, receipt.node_id, receipt.model_id)
        local = None
        backend = self.backends.get(receipt.model_id)
        try:
            if backend is not None:
                async with self._model_lock:
                    local = sign_verdict(await asyncio.to_thread(verify_answer, answer, backend), self.key)
                await asyncio.to_thread(self.ledger.add_verdict, local)
            remote: list[SignedVerdict] = []
            if self.validators and (local is None or local.verdict.verdict in ("pass", "fraud")):
                remote = await self.attestations(answer, self.validators, exclude=set())
                if local is None and _tied(remote):
                    remote += await self.attestations(answer, len(remote), exclude={v.verifier_id for v in remote})
                for verdict in remote:
                    await asyncio.to_thread(self.ledger.add_verdict, verdict)
        except Exception:  # noqa: BLE001 - whatever failed, the audit must not stay pending
            log.exception("audit %s failed", receipt.receipt_id)
            await asyncio.to_thread(self.ledger.close_audit, receipt.receipt_id, "error")
            return self.ledger.audit(receipt.receipt_id)
        outcome = local.verdict.verdict if local else _majority(remote)
        if outcome is None:
            log.warning("audit %s: no verdict (no local model%s)", receipt.receipt_id, ", peers tied" if remote else "")
            await asyncio.to_thread(self.ledger.close_audit, receipt.receipt_id, "error")
            return self.ledger.audit(receipt.receipt_id)
        for verdict in remote:
            await asyncio.to_thread(self.ledger.record_validator, verdict.verifier_id, agreed=verdict.verdict.verdict == outcome)
        if outcome == "fraud":
            proof = FraudProof(answer=answer, verdict=local or next(v for v in remote if v.verdict.verdict == "fraud"))
            await asyncio.to_thread(self.ledger.add_fraud_proof, proof)
            await self.publish(proof)
        await asyncio.to_thread(self.ledger.close_audit, receipt.receipt_id, outcome)
        return self.ledger.audit(receipt.receipt_id)

    async def publish(self, proof: FraudProof) -> None:
        """Hand a fraud proof to the network (``POST /v1/fraud-proofs``): through the sidecar's own
        gateway when it has one, else to every upstream but the accused. Nodes that serve the
        model re-check it and spread it; the sidecar's own gateway convicts on its key's verdict."""
        accused = proof.answer.receipt.node_id
        targets = [self.validator_gateway] if self.validator_gateway else [up.url for up in self.upstreams if up.node_id != accused]
        for url in targets:
            try:
                async with self.session.post(f"{url}/v1/fraud-proofs", data=proof.model_dump_json(),
                                             headers={"Content-Type": "application/json"}) as resp:
                    if resp.status != 202:
                        log.warning("fraud proof not taken by %s (%d): %s", url, resp.status, (await resp.text())[:200])
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("fraud proof not delivered to %s: %s", url, exc)

    async def attestations(self, answer: AnswerFile, k: int, exclude: set[str]) -> list[SignedVerdict]:
        """Up to ``k`` signed verdicts from distinct peers, drawn at random by the sidecar's own
        gateway (never the signer), each checked: both its signatures, and that it is about this
        receipt (a peer's own fingerprints come with it, signed)."""
        found: list[SignedVerdict] = []
        exclude.add(answer.receipt.node_id)
        for _ in range(k):
            query = f"?exclude={','.join(sorted(exclude))}"
            try:
                async with self.session.post(f"{self.validator_gateway}/v1/peers/verify{query}", data=answer.model_dump_json(),
                                             headers={"Content-Type": "application/json"}) as resp:
                    body, status = await resp.read(), resp.status
                if status != 200:
                    log.info("no more validators through %s (%d)", self.validator_gateway, status)
                    break
                attestation = Attestation.model_validate_json(body)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValidationError) as exc:
                log.warning("validator through %s unusable: %s", self.validator_gateway, exc)
                break
            verdict = attestation.verdict
            exclude.add(verdict.verifier_id)
            if attestation.is_valid() and verdict.verdict.receipt_id == answer.receipt.receipt_id:
                found.append(verdict)
            else:
                log.warning("attestation from %s is badly signed or about another receipt: ignored", verdict.verifier_id)
        return found

    async def drain(self) -> None:
        """Wait for the audits already started (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _majority(verdicts: Sequence[SignedVerdict]) -> str | None:
    passes = sum(v.verdict.verdict == "pass" for v in verdicts)
    frauds = sum(v.verdict.verdict == "fraud" for v in verdicts)
    return None if passes == frauds else ("pass" if passes > frauds else "fraud")


def _tied(verdicts: Sequence[SignedVerdict]) -> bool:
    return bool(verdicts) and _majority(verdicts) is None


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
    await sidecar.identify()
    (up,) = sidecar.pick(1)
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
    await sidecar.identify()
    chosen = sidecar.pick(n)
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
    return web.Response(body=ModelList(data=request.app[SIDECAR].model_cards()).model_dump_json(), content_type="application/json")


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
    return web.Response(body=record.model_dump_json(), content_type="application/json")


async def get_audit(request: web.Request) -> web.Response:
    """The operator's: which answers were audited must stay hidden from the nodes (and a
    receipt id from the other clients: ``node/api/evidence_tokens.py``)."""
    require_operator(request, "an audit record")
    record = request.app[SIDECAR].ledger.audit(request.match_info["receipt_id"])
    if record is None:
        return APIError(404, f"no audit of receipt {request.match_info['receipt_id']!r}", code="audit_not_found").response()
    return web.Response(body=record.model_dump_json(), content_type="application/json")


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
    records = request.app[SIDECAR].ledger.audits(node_id=q.get("node_id"), state=state, limit=max(1, min(limit, 1000)))
    return web.json_response({"object": "list", "data": [json.loads(r.model_dump_json()) for r in records]})


async def health(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    return web.json_response({"status": "ok", "upstreams": [{"url": up.url, "node_id": up.node_id} for up in sidecar.upstreams],
                              "convicted": sorted(sidecar.ledger.convicted()), "audit_rate": sidecar.audit_rate,
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
        sidecar.session = aiohttp.ClientSession(timeout=UPSTREAM_TIMEOUT)

    async def close_session(_: web.Application) -> None:
        await sidecar.drain()
        await sidecar.session.close()

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


__all__ = ["Sidecar", "Upstream", "audit_draw", "make_sidecar_app"]
