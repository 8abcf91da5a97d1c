"""Evidence and the answer file: everything a verifier needs, in one JSON document.

The answer file = receipt + signature + public key + evidence (prompt ids after templating,
output ids, sampling parameters, per-position fingerprints). Sizes are capped so a hostile
file cannot exhaust a verifier; ``version`` lets the format evolve.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from verify.canonical import canonical_hash, request_hash
from verify.identity import NodeKey
from verify.receipts import FinishReason, Receipt, SeedSource, make_receipt
from verify.sampling import SamplingParams, log_normalizer

MAX_TOKENS = 65536  # prompt or output ids per answer
MAX_TOP_K = 32
# The protocol's fingerprint width: every output position commits exactly this many (token id,
# logit) pairs (fewer only when the vocabulary is smaller). Fixed, so a node cannot commit
# fewer and dodge the fingerprint check.
FINGERPRINT_K = 8
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]  # JSON may spell NaN; evidence may not
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
_FINGERPRINT_WINDOWS = (4.0, 16.0)  # logit units below the best; then the whole row


def top_k_fingerprint(logits: np.ndarray, k: int = FINGERPRINT_K) -> tuple[list[int], list[float]]:
    """The k highest raw logits: ids and values, ordered by (-logit, id).

    Values are taken at float32 precision (what the backends produce; exact as JSON floats), so
    a float64 reference and a float32 backend commit comparable numbers; ranking is done on those
    float32 values. Returns fewer than k entries when the vocabulary is smaller.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    k = min(int(k), row.size)
    if k == 0:
        if np.isnan(row).any():
            raise ValueError("logits must not contain NaN")
        return [], []
    best = row.max()  # NaN propagates here: one pass checks it and finds the best
    if np.isnan(best):
        raise ValueError("logits must not contain NaN")
    # The k best lie among the tokens near the best whenever at least k are there: look in a
    # window first (a few dozen tokens on a language model's logits), the whole row if need be.
    for window in _FINGERPRINT_WINDOWS:
        candidates = np.flatnonzero(row >= best - window)  # increasing ids
        if candidates.size >= k:
            break
    else:
        threshold = np.partition(row, row.size - k)[row.size - k]  # the k-th largest value
        candidates = np.flatnonzero(row >= threshold)  # every tie at the threshold, increasing ids
    order = candidates[np.argsort(-row[candidates], kind="stable")][:k]
    return [int(i) for i in order], [float(row[i]) for i in order]


class Fingerprint(BaseModel):
    """One output position as the node computed it: the top-k token ids and their raw logits, the
    raw logit of the token it output there, and the log-normaliser (logsumexp of every raw logit).

    The last two make every logprob a client reads derivable from what the node signed (a logprob
    is a logit minus the normaliser; differences of logits alone leave the absolute values free),
    and the verifier re-checks both against its own logits with the fingerprint tolerance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ids: list[TokenId] = Field(max_length=MAX_TOP_K)
    logits: list[FiniteFloat] = Field(max_length=MAX_TOP_K)
    token_logit: FiniteFloat
    log_normalizer: FiniteFloat

    def token_logprob(self) -> float:
        """The output token's log-softmax: what an API serves as its ``logprob``."""
        return self.token_logit - self.log_normalizer

    def top_logprobs(self) -> list[tuple[int, float]]:
        """``(token id, log-softmax)`` of the committed top-k, best first: ``top_logprobs``."""
        return [(i, v - self.log_normalizer) for i, v in zip(self.ids, self.logits)]

    @model_validator(mode="after")
    def _same_length(self) -> "Fingerprint":
        if len(self.ids) != len(self.logits):
            raise ValueError("fingerprint ids and logits differ in length")
        return self


def position_fingerprint(logits: np.ndarray, token: int) -> Fingerprint:
    """What a node commits at one output position, from that position's raw logits (the engine,
    a validator and the verifier's cheat tools all take it from here)."""
    ids, top = top_k_fingerprint(logits)
    return Fingerprint(ids=ids, logits=top, token_logit=float(np.float32(logits[token])), log_normalizer=log_normalizer(logits))


class Evidence(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_ids: list[TokenId] = Field(min_length=1, max_length=MAX_TOKENS)
    output_ids: list[TokenId] = Field(min_length=1, max_length=MAX_TOKENS)
    sampling: SamplingParams
    fingerprints: list[Fingerprint] = Field(max_length=MAX_TOKENS)

    def digest(self) -> str:
        """sha256 of the canonical evidence: what a receipt's ``evidence_hash`` commits to, so every
        byte of the evidence is the signer's (altered evidence under an honest receipt is nobody's)."""
        return canonical_hash(self.model_dump(mode="json"))

    def shape_problems(self, vocab_size: int | None = None) -> list[str]:
        """What makes this evidence unusable before any model work: one fingerprint of exactly
        ``FINGERPRINT_K`` distinct ids per output token, every id inside the vocabulary (when known)."""
        problems = []
        if len(self.fingerprints) != len(self.output_ids):
            problems.append(f"{len(self.fingerprints)} fingerprints for {len(self.output_ids)} output tokens")
        width = FINGERPRINT_K if vocab_size is None else min(FINGERPRINT_K, vocab_size)
        bad = [t for t, f in enumerate(self.fingerprints) if len(f.ids) != width or len(set(f.ids)) != len(f.ids)]
        if bad:
            problems.append(f"fingerprints must hold {width} distinct token ids (position {bad[0]} and {len(bad) - 1} more do not)")
        if vocab_size is not None:
            ids = [*self.prompt_ids, *self.output_ids, *(i for f in self.fingerprints for i in f.ids)]
            if max(ids) >= vocab_size:
                problems.append(f"token id {max(ids)} outside the vocabulary of {vocab_size}")
        return problems


class AnswerFile(BaseModel):
    """What ``GET /v1/receipts/{id}`` serves and ``proofmesh verify FILE`` checks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[2] = 2  # 2: fingerprints commit the output token's logit and the log-normaliser
    receipt: Receipt
    signature: str = Field(max_length=200)  # base64 Ed25519 signature of the receipt
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")  # hex, 32 bytes
    evidence: Evidence


def sign_answer(
    key: NodeKey,
    *,
    model_id: str,
    backend: str,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    params: SamplingParams,
    fingerprints: Sequence[Fingerprint],
    finish_reason: FinishReason,
    seed_source: SeedSource = "node",
) -> AnswerFile:
    """Commit to an answer: the signed receipt (request hash computed here from the model, the
    prompt ids and every sampling parameter; evidence hash over all of the evidence) and the
    evidence behind it, as one answer file."""
    prompt_ids, output_ids = list(prompt_ids), list(output_ids)
    evidence = Evidence(prompt_ids=prompt_ids, output_ids=output_ids, sampling=params, fingerprints=list(fingerprints))
    receipt, signature = make_receipt(
        key, model_id=model_id, backend=backend, request_hash=request_hash(model_id, prompt_ids, params.to_canonical_dict()),
        seed=params.seed, seed_source=seed_source, prompt_ids=prompt_ids, output_ids=output_ids,
        fingerprints=[(f.ids, f.logits) for f in fingerprints], finish_reason=finish_reason, evidence_hash=evidence.digest(),
    )
    return AnswerFile(receipt=receipt, signature=signature, public_key=key.public_key.hex(), evidence=evidence)
