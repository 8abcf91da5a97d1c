"""A validator's attestation: its signed verdict on an answer plus the fingerprints it computed
itself, signed too. Not a yes/no, so a lazy validator that copies the claim can be caught by
comparison. A verification object (the sidecar checks it without any network code); p2p/
carries it over ``/proofmesh/verify/1``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from verify.canonical import canonical_json
from verify.evidence import MAX_TOKENS, Fingerprint
from verify.fraud import SignedVerdict
from verify.identity import NodeKey, verify_signed_by


class Attestation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: SignedVerdict
    fingerprints: Annotated[list[Fingerprint], Field(max_length=MAX_TOKENS)]
    fingerprints_signature: Annotated[str, Field(min_length=1, max_length=200)]  # base64

    @staticmethod
    def fingerprint_bytes(receipt_id: str, verifier_id: str, fingerprints: list[Fingerprint]) -> bytes:
        return canonical_json({"receipt_id": receipt_id, "verifier_id": verifier_id,
                               "fingerprints": [f.model_dump() for f in fingerprints]})

    @classmethod
    def sign(cls, verdict: SignedVerdict, fingerprints: list[Fingerprint], key: NodeKey) -> "Attestation":
        data = cls.fingerprint_bytes(verdict.verdict.receipt_id, key.node_id, fingerprints)
        return cls(verdict=verdict, fingerprints=fingerprints, fingerprints_signature=key.sign_base64(data))

    def is_valid(self) -> bool:
        """Both signatures are the verifier's."""
        v = self.verdict
        data = self.fingerprint_bytes(v.verdict.receipt_id, v.verifier_id, list(self.fingerprints))
        return v.signature_is_valid() and verify_signed_by(v.verifier_id, bytes.fromhex(v.public_key), data,
                                                           self.fingerprints_signature)


__all__ = ["Attestation"]
