"""ProofMesh's trust core, usable alone by a client: canonical hashing and re-checkable sampling.

Imports neither ``node`` nor ``p2p`` (a test enforces it). Receipts, evidence and the verifier
come with the verification issue.
"""

from verify.canonical import canonical_hash, canonical_json, output_hash, request_hash, sha256_hex
from verify.sampling import SamplingParams, StopChecker, decision_scores, gumbel_noise, sample_token, token_margin, top_k_fingerprint

__all__ = [
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
