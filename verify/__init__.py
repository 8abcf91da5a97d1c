"""ProofMesh's trust core, usable alone by a client: canonical hashing, re-checkable sampling,
node identity (Ed25519 = libp2p peer id), Merkle fingerprints, signed receipts, answer files and
their SQLite evidence store, the teacher-forced verifier with calibrated tolerances
(``bench/calibration/``), signed verdicts and fraud proofs, and the grammars of structured
output (``verify.grammar``: token masks inside the seeded draw; ``verify.structured``: what a
request's ``response_format`` and ``tools`` ask for), which a client re-checks like the rest.

Imports neither ``node`` nor ``p2p`` (a test enforces it): the verifier reaches a model through
the small ``ScoringBackend`` protocol that node/ implements.
"""

from verify.canonical import canonical_hash, canonical_json, output_hash, request_hash, sha256_hex
from verify.errors import IdentityError, VerifyError
from verify.evidence import AnswerFile, Evidence, Fingerprint
from verify.evidence_store import EvidenceStore
from verify.fraud import FraudProof, SignedVerdict, check_fraud_proof, make_fraud_proof, sign_verdict
from verify.grammar import GrammarError, GrammarState, GrammarVocabulary
from verify.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id, verify_signature
from verify.merkle import fingerprint_leaf, merkle_proof, merkle_root, verify_merkle_proof
from verify.receipts import Receipt, fingerprint_root, make_receipt, verify_receipt
from verify.sampling import SamplingParams, StopChecker, decision_scores, gumbel_noise, sample_token, token_margin, top_k_fingerprint
from verify.verifier import ScoringBackend, Tolerances, Verdict, verify_answer

__all__ = [
    "AnswerFile",
    "GrammarError",
    "GrammarState",
    "GrammarVocabulary",
    "Evidence",
    "EvidenceStore",
    "Fingerprint",
    "FraudProof",
    "ScoringBackend",
    "SignedVerdict",
    "Tolerances",
    "Verdict",
    "check_fraud_proof",
    "make_fraud_proof",
    "sign_verdict",
    "verify_answer",
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
