"""ProofMesh's trust core, usable alone by a client: canonical hashing, re-checkable sampling,
node identity (Ed25519 = libp2p peer id), Merkle fingerprints and signed receipts.

Imports neither ``node`` nor ``p2p`` (a test enforces it). Evidence, answer files and the
teacher-forced verifier come next (verification issue).
"""

from verify.canonical import canonical_hash, canonical_json, output_hash, request_hash, sha256_hex
from verify.errors import IdentityError, VerifyError
from verify.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id, verify_signature
from verify.merkle import fingerprint_leaf, merkle_proof, merkle_root, verify_merkle_proof
from verify.receipts import Receipt, fingerprint_root, make_receipt, verify_receipt
from verify.sampling import SamplingParams, StopChecker, decision_scores, gumbel_noise, sample_token, token_margin, top_k_fingerprint

__all__ = [
    "IdentityError",
    "NodeKey",
    "Receipt",
    "VerifyError",
    "fingerprint_leaf",
    "fingerprint_root",
    "make_receipt",
    "merkle_proof",
    "merkle_root",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "verify_merkle_proof",
    "verify_receipt",
    "verify_signature",
    "SamplingParams",
    "StopChecker",
    "canonical_hash",
    "canonical_json",
    "decision_scores",
    "gumbel_noise",
    "output_hash",
    "request_hash",
    "sample_token",
    "sha256_hex",
    "token_margin",
    "top_k_fingerprint",
]
