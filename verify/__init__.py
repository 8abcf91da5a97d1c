"""ProofMesh's trust core, usable alone by a client: canonical hashing, re-checkable sampling,
node identity (Ed25519 = libp2p peer id), Merkle fingerprints, signed receipts, answer files and
their SQLite evidence store, the teacher-forced verifier with calibrated tolerances
(``bench/calibration/``), signed verdicts and fraud proofs, and the grammars of structured
output (``verify.grammar``: token masks inside the seeded draw; ``verify.structured``: what a
request's ``response_format`` and ``tools`` ask for), which a client re-checks like the rest.

Imports neither ``node`` nor ``p2p`` (a test enforces it): the verifier reaches a model through
the small ``ScoringBackend`` protocol that node/ implements.
"""

from verify.binding import Asked, BindingReport, asked_of, bind_answers
from verify.canonical import canonical_hash, canonical_json, output_hash, request_hash, sha256_hex
from verify.errors import IdentityError, VerifyError
from verify.evidence import AnswerFile, Evidence, Fingerprint, position_fingerprint, top_k_fingerprint
from verify.evidence_store import EvidenceStore
from verify.finish import StopChecker
from verify.fraud import FraudProof, SignedVerdict, check_fraud_proof, make_fraud_proof, sign_verdict
from verify.grammar import GrammarError, GrammarState, GrammarVocabulary
from verify.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id, verify_signature
from verify.ledger import Ledger
from verify.merkle import fingerprint_leaf, merkle_proof, merkle_root, verify_merkle_proof
from verify.receipts import Receipt, fingerprint_root, make_receipt, verify_receipt
from verify.sampling import SamplingParams, decision_scores, gumbel_noise, log_normalizer, sample_token, token_margin
from verify.verifier import ScoringBackend, Tolerances, Verdict, WrongModelError, verify_answer

__all__ = [
    "AnswerFile",
    "Asked",
    "BindingReport",
    "Evidence",
    "EvidenceStore",
    "Fingerprint",
    "FraudProof",
    "GrammarError",
    "GrammarState",
    "GrammarVocabulary",
    "IdentityError",
    "Ledger",
    "NodeKey",
    "Receipt",
    "SamplingParams",
    "ScoringBackend",
    "SignedVerdict",
    "StopChecker",
    "Tolerances",
    "Verdict",
    "VerifyError",
    "WrongModelError",
    "asked_of",
    "bind_answers",
    "canonical_hash",
    "canonical_json",
    "check_fraud_proof",
    "decision_scores",
    "fingerprint_leaf",
    "fingerprint_root",
    "gumbel_noise",
    "log_normalizer",
    "make_fraud_proof",
    "make_receipt",
    "merkle_proof",
    "merkle_root",
    "output_hash",
    "peer_id_from_public_key",
    "position_fingerprint",
    "public_key_from_peer_id",
    "request_hash",
    "sample_token",
    "sha256_hex",
    "sign_verdict",
    "token_margin",
    "top_k_fingerprint",
    "verify_answer",
    "verify_merkle_proof",
    "verify_receipt",
    "verify_signature",
]
