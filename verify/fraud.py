"""Signed verdicts and fraud proofs.

A verifier signs its verdict with its own node key, so the verdict can travel (gossip, the
ledger) and be attributed. A *fraud proof* is the accused node's signed answer file plus the
verifier's signed ``fraud`` verdict on it: the node's own signature ties it to the answer, so
anyone holding the model re-checks the whole accusation with one call,
``check_fraud_proof(proof, backend)``, which re-runs the teacher-forced verification itself
and never trusts the verdict's content.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from verify.canonical import canonical_json
from verify.evidence import AnswerFile
from verify.identity import NodeKey, verify_signed_by
from verify.verifier import ScoringBackend, Tolerances, Verdict, attribution_problems, verify_answer


class SignedVerdict(BaseModel):
    """A verdict with the verifier's identity and Ed25519 signature over its canonical JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    verdict: Verdict
    verifier_id: str = Field(min_length=1, max_length=128)  # the verifier's libp2p peer id
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(max_length=200)  # base64

    @staticmethod
    def signing_bytes(verdict: Verdict, verifier_id: str) -> bytes:
        return canonical_json({"verdict": verdict.model_dump(), "verifier_id": verifier_id})

    def signature_is_valid(self) -> bool:
        return verify_signed_by(self.verifier_id, bytes.fromhex(self.public_key), self.signing_bytes(self.verdict, self.verifier_id),
                                self.signature)


def sign_verdict(verdict: Verdict, key: NodeKey) -> SignedVerdict:
    signature = key.sign_base64(SignedVerdict.signing_bytes(verdict, key.node_id))
    return SignedVerdict(verdict=verdict, verifier_id=key.node_id, public_key=key.public_key.hex(), signature=signature)


class FraudProof(BaseModel):
    """The accused answer (as the node signed it) and a verifier's signed fraud verdict on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    answer: AnswerFile
    verdict: SignedVerdict


def make_fraud_proof(answer: AnswerFile, verdict: Verdict, key: NodeKey) -> FraudProof:
    if verdict.verdict != "fraud" or verdict.receipt_id != answer.receipt.receipt_id:
        raise ValueError("a fraud proof needs a fraud verdict on this very answer")
    return FraudProof(answer=answer, verdict=sign_verdict(verdict, key))


class FraudProofCheck(BaseModel):
    upheld: bool  # the accusation stands: signed by its verifier, and the answer re-checks as fraud
    reasons: list[str]
    recomputed: Verdict | None = None


def accusation_problems(proof: FraudProof) -> list[str]:
    """The cheap part of a fraud proof, checked before any model work or relaying: a fraud
    verdict, signed by its verifier, on this very answer, which is the accused node's own
    (signed by it, evidence hashing to what it signed). Empty: worth a re-check."""
    reasons = []
    if not proof.verdict.signature_is_valid():
        reasons.append("the verdict's signature does not verify for its verifier id")
    if proof.verdict.verdict.verdict != "fraud":
        reasons.append("the verdict is not a fraud verdict")
    if proof.verdict.verdict.receipt_id != proof.answer.receipt.receipt_id:
        reasons.append("the verdict names another receipt")
    reasons += [f"no evidence against the accused node: {why}" for why in attribution_problems(proof.answer)]
    return reasons


def check_fraud_proof(proof: FraudProof, backend: ScoringBackend, tol: Tolerances = Tolerances()) -> FraudProofCheck:
    """Re-check an accusation from scratch on ``backend``.

    Upheld only if the accusation is well formed (``accusation_problems``) and our own
    verification of the answer, which is the node's own, finds fraud: a model check or a finish
    rule failing on evidence the node signed. Evidence that is not the node's (``unattributable``)
    or merely malformed never convicts anyone; the verdict's content is never trusted."""
    reasons = accusation_problems(proof)
    if proof.answer.receipt.model_id != backend.model_id:
        reasons.append("the answer is for another model than the one checking it: cannot judge")
    if reasons:
        return FraudProofCheck(upheld=False, reasons=reasons)
    recomputed = verify_answer(proof.answer, backend, tol)
    if recomputed.verdict != "fraud":
        return FraudProofCheck(upheld=False, reasons=[f"the answer re-checks as {recomputed.verdict} here", *recomputed.reasons],
                               recomputed=recomputed)
    return FraudProofCheck(upheld=True, reasons=recomputed.reasons, recomputed=recomputed)
