"""Signed output commitments (DESIGN.md, "Receipts").

A receipt is the canonical JSON of exactly these fields, signed with the node's Ed25519 key:
``{v, receipt_id, model_id, node_id, backend, request_hash, seed, seed_source, n_prompt_tokens,
n_output_tokens, output_hash, fingerprint_root, evidence_hash, finish_reason, created}``.
``request_hash`` binds it to one request (model, templated prompt ids, every sampling
parameter), so it cannot be replayed for another; ``receipt_id`` is 128 random bits, unique per
answer. ``evidence_hash`` covers every byte of the evidence (``Evidence.digest``): evidence that
does not hash to it is not the signer's, so nobody can be framed with altered evidence under
their honest receipt. ``seed_source`` says who chose the seed: a seed the node chose can be
ground (drawn many times, the cheapest kept), so clients and sidecars may require ``client``.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from verify.canonical import canonical_json, output_hash
from verify.identity import NodeKey, verify_signed_by
from verify.merkle import fingerprint_leaf, merkle_root

RECEIPT_VERSION = 2
HEX64 = r"^[0-9a-f]{64}$"
RECEIPT_ID_PATTERN = r"^[0-9a-f]{32}$"  # 128 random bits in hex (also what a status page links by)
SeedSource = Literal["client", "node"]
FinishReason = Literal["stop", "length"]


class Receipt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[2] = RECEIPT_VERSION
    receipt_id: str = Field(pattern=RECEIPT_ID_PATTERN)
    model_id: str = Field(pattern=HEX64)
    node_id: str = Field(min_length=1, max_length=128)
    backend: str = Field(min_length=1, max_length=200)
    request_hash: str = Field(pattern=HEX64)
    seed: int = Field(ge=0, lt=2**64)
    seed_source: SeedSource
    n_prompt_tokens: int = Field(ge=0)
    n_output_tokens: int = Field(ge=0)
    output_hash: str = Field(pattern=HEX64)
    fingerprint_root: str = Field(pattern=HEX64)
    evidence_hash: str = Field(pattern=HEX64)
    finish_reason: FinishReason
    created: int = Field(ge=0)  # unix seconds

    def signing_bytes(self) -> bytes:
        return canonical_json(self.model_dump())


def fingerprint_root(fingerprints: Sequence[tuple[Sequence[int], Sequence[float]]]) -> str:
    """Merkle root over the per-position top-k fingerprints of an answer."""
    return merkle_root([fingerprint_leaf(p, ids, logits) for p, (ids, logits) in enumerate(fingerprints)])


def make_receipt(
    key: NodeKey,
    *,
    model_id: str,
    backend: str,
    request_hash: str,
    seed: int,
    seed_source: SeedSource,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    fingerprints: Sequence[tuple[Sequence[int], Sequence[float]]],
    finish_reason: FinishReason,
    evidence_hash: str,
) -> tuple[Receipt, str]:
    """Build and sign a receipt; returns it with its base64 signature."""
    receipt = Receipt(
        receipt_id=secrets.token_hex(16),
        model_id=model_id,
        node_id=key.node_id,
        backend=backend,
        request_hash=request_hash,
        seed=seed,
        seed_source=seed_source,
        n_prompt_tokens=len(prompt_ids),
        n_output_tokens=len(output_ids),
        output_hash=output_hash(list(output_ids)),
        fingerprint_root=fingerprint_root(fingerprints),
        evidence_hash=evidence_hash,
        finish_reason=finish_reason,
        created=int(time.time()),
    )
    return receipt, key.sign_base64(receipt.signing_bytes())


def verify_receipt(receipt: Receipt, signature: str, public_key: bytes) -> bool:
    """True iff ``signature`` is ``public_key``'s signature of this exact receipt and the
    receipt names that key's node id."""
    return verify_signed_by(receipt.node_id, public_key, receipt.signing_bytes(), signature)
