"""The sidecar's checks of what upstreams serve: every answer bound to its request, a share of
them audited.

Every answer is bound to the client's request with the evidence behind every receipt in it
(fetched always, so the serving node sees the same traffic for audited and unaudited answers);
then a fraction ``audit_rate`` of the answers is audited. Whether a receipt is audited is
``HMAC(secret, receipt_id) < audit_rate``: the secret is drawn at start and never leaves the
sidecar, and the receipt id is fixed by the node's signature before the decision, so the node
can neither predict nor steer it. An audit re-executes the answer by teacher forcing on a local
copy of the model (``verify.verifier``), signs the verdict with the sidecar's key, and records
audit, verdict and, on fraud, a fraud proof in the ledger (``verify.ledger``), where reputation
moves. With ``validators = k`` each audit is also re-executed on ``k`` peers of the network,
asked through the sidecar's own gateway's ``POST /v1/peers/verify`` (which excludes the signer
and the peers already asked); each answers with its own signed verdict and fingerprints, and a
validator whose verdict goes against the outcome loses reputation, so a lazy one (yes to
everything) is caught the first time it passes a cheat. A fraud proof goes to ``POST
/v1/fraud-proofs`` of that gateway (else of the upstreams but the accused), from where the
network re-checks and spreads it (``/proofmesh/fraud/1``).

Every ledger call (an fsync'd SQLite commit) and every signature goes through
``node.blocking.off_loop``. Binding and re-execution are CPU work of a request's or an
answer's length and go to ``asyncio.to_thread`` instead: in off_loop's few workers, sized for
commits, a re-execution would keep the ledger's writes waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Coroutine, Sequence
from typing import Any

import aiohttp
from pydantic import ValidationError

from node.api.errors import APIError
from node.api.metrics import TokenRate
from node.blocking import off_loop
from node.sidecar.relay import AuditModel, ClientRequest, Refused, receipts_in
from node.sidecar.upstreams import Upstream, Upstreams
from verify.attestation import Attestation
from verify.binding import bind_answers
from verify.evidence import AnswerFile
from verify.fraud import FraudProof, SignedVerdict, sign_verdict
from verify.identity import NodeKey
from verify.ledger import AuditRecord, AuditState, Ledger
from verify.sampling import U64
from verify.verifier import verify_answer

log = logging.getLogger("proofmesh.sidecar")


def audit_draw(secret: bytes, receipt_id: str) -> float:
    """A uniform number in [0, 1) fixed by the secret and the receipt id: audit iff below the rate."""
    digest = hmac.new(secret, receipt_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / U64


class Auditor:
    """Binding, audit decisions, audits, ledger. ``backends``: model_id -> a model held here.
    ``validator_gateway``: the URL of the sidecar's own gateway into the network
    (``--bootstrap``), from whose peer table validators are drawn; never an audited upstream."""

    def __init__(self, upstreams: Upstreams, ledger: Ledger, key: NodeKey, backends: dict[str, AuditModel], *,
                 audit_rate: float, validators: int = 0, secret: bytes | None = None, validator_gateway: str | None = None):
        if not 0.0 <= audit_rate <= 1.0:
            raise ValueError("the audit rate is a probability in [0, 1]")
        if validators and validator_gateway is None:
            raise ValueError("validators are drawn from the sidecar's own gateway into the network (--bootstrap), "
                             "never through a node it audits")
        self.upstreams = upstreams
        self.ledger = ledger
        self.key = key
        self.backends = backends
        self.audit_rate = audit_rate
        self.validators = validators
        self.validator_gateway = validator_gateway.rstrip("/") if validator_gateway else None
        self._secret = secret or secrets.token_bytes(32)
        self._model_lock = asyncio.Lock()  # one runtime per model, not thread-safe: audits take turns
        self._tasks: set[asyncio.Task] = set()
        self.token_rate = TokenRate()  # tokens of the answers upstreams gave clients, for the status page

    @property
    def session(self) -> aiohttp.ClientSession:
        """The sidecar's one HTTP client (``Upstreams.session``)."""
        return self.upstreams.session

    def chosen(self, receipt_id: str) -> bool:
        return audit_draw(self._secret, receipt_id) < self.audit_rate

    async def bind(self, up: Upstream, req: ClientRequest, received: dict | list[dict]) -> list[AnswerFile]:
        """Fetch the evidence of every receipt in ``received`` (the parsed response, or a
        stream's chunks) and bind the answer to the request; returns the answer files in choice
        order. Raises ``Refused`` (the caller counts it against ``up``): evidence withheld (also
        a failed audit of the connection), not the request's answer, a receipt served before."""
        receipts = dict.fromkeys(receipts_in(received))  # a response repeats the first choice's receipt
        answers: dict[str, AnswerFile] = {}
        for receipt_id, node_id, token in receipts:
            answer = await self.upstreams.evidence(up, receipt_id, node_id, token, req.headers)
            if answer is None or answer.receipt.receipt_id != receipt_id:
                await off_loop(self._withheld, receipt_id, up.ledger_id)
                raise Refused(f"upstream {up.url} withheld the evidence of receipt {receipt_id}")
            answers[receipt_id] = answer
        report = await asyncio.to_thread(bind_answers, req.asked, received, answers, req.tokenizer, model_id=req.model.model_id)
        if not report.ok:
            raise Refused(f"the answer of upstream {up.url} is not the answer to this request: {report.summary()}")
        for receipt_id, node_id, _ in receipts:
            if not await off_loop(self.ledger.first_sight, receipt_id, node_id):
                raise Refused(f"upstream {up.url} served receipt {receipt_id} before: a replay")
        return [answers[report.receipts[index]] for index in range(len(req.choices))]

    async def refuse(self, up: Upstream, why: str) -> APIError:
        """Count a refused answer against the connection that served it; the error its client gets."""
        log.warning("refused an answer from %s: %s", up.url, why)
        await off_loop(self.ledger.record_refusal, "", up.ledger_id, why)
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

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
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
        await off_loop(self.ledger.open_audit, receipt.receipt_id, receipt.node_id, receipt.model_id)
        local = None
        backend = self.backends.get(receipt.model_id)
        try:
            if backend is not None:
                async with self._model_lock:
                    verdict = await asyncio.to_thread(verify_answer, answer, backend)  # CPU work: see the module docstring
                local = await off_loop(sign_verdict, verdict, self.key)
                await off_loop(self.ledger.add_verdict, local)
            remote: list[SignedVerdict] = []
            if self.validators and (local is None or local.verdict.verdict in ("pass", "fraud")):
                remote = await self.attestations(answer, self.validators, exclude=set())
                if local is None and _tied(remote):
                    remote += await self.attestations(answer, len(remote), exclude={v.verifier_id for v in remote})
                for verdict in remote:
                    await off_loop(self.ledger.add_verdict, verdict)
        except Exception:  # noqa: BLE001 - whatever failed, the audit must not stay pending
            log.exception("audit %s failed", receipt.receipt_id)
            return await off_loop(self._closed, receipt.receipt_id, "error")
        outcome = local.verdict.verdict if local else _majority(remote)
        if outcome is None:
            log.warning("audit %s: no verdict (no local model%s)", receipt.receipt_id, ", peers tied" if remote else "")
            return await off_loop(self._closed, receipt.receipt_id, "error")
        for verdict in remote:
            await off_loop(self.ledger.record_validator, verdict.verifier_id, agreed=verdict.verdict.verdict == outcome)
        if outcome == "fraud":
            proof = FraudProof(answer=answer, verdict=local or next(v for v in remote if v.verdict.verdict == "fraud"))
            await off_loop(self.ledger.add_fraud_proof, proof)
            await self.publish(proof)
        return await off_loop(self._closed, receipt.receipt_id, outcome)

    def _closed(self, receipt_id: str, state: AuditState) -> AuditRecord:
        """Close an audit and read its record back: one trip off the loop."""
        self.ledger.close_audit(receipt_id, state)
        return self.ledger.audit(receipt_id)

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


__all__ = ["Auditor", "audit_draw"]
