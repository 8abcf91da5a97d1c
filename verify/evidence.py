"""Evidence and the answer file: everything a verifier needs, in one JSON document.

The answer file = receipt + signature + public key + evidence (prompt ids after templating,
output ids, sampling parameters, per-position fingerprints). Sizes are capped so a hostile
file cannot exhaust a verifier; ``version`` lets the format evolve.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from verify.canonical import request_hash
from verify.identity import NodeKey
from verify.receipts import Receipt, make_receipt
from verify.sampling import SamplingParams

MAX_TOKENS = 65536  # prompt or output ids per answer
MAX_TOP_K = 32


class Fingerprint(BaseModel):
    """One output position: the top-k token ids and their logits, as the node computed them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ids: list[int] = Field(max_length=MAX_TOP_K)
    logits: list[float] = Field(max_length=MAX_TOP_K)

    @model_validator(mode="after")
    def _same_length(self) -> "Fingerprint":
        if len(self.ids) != len(self.logits):
            raise ValueError("fingerprint ids and logits differ in length")
        return self


class Evidence(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_ids: list[int] = Field(min_length=1, max_length=MAX_TOKENS)
    output_ids: list[int] = Field(min_length=1, max_length=MAX_TOKENS)
    sampling: SamplingParams
    fingerprints: list[Fingerprint] = Field(max_length=MAX_TOKENS)


class AnswerFile(BaseModel):
    """What ``GET /v1/receipts/{id}`` serves and ``proofmesh verify FILE`` checks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
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
    fingerprints: Sequence[tuple[Sequence[int], Sequence[float]]],
    finish_reason: Literal["stop", "length"],
) -> AnswerFile:
    """Commit to an answer: the signed receipt (request hash computed here from the model, the
    prompt ids and every sampling parameter) and the evidence behind it, as one answer file."""
    prompt_ids, output_ids = list(prompt_ids), list(output_ids)
    receipt, signature = make_receipt(
        key, model_id=model_id, backend=backend, request_hash=request_hash(model_id, prompt_ids, params.to_canonical_dict()),
        seed=params.seed, prompt_ids=prompt_ids, output_ids=output_ids, fingerprints=fingerprints, finish_reason=finish_reason,
    )
    evidence = Evidence(prompt_ids=prompt_ids, output_ids=output_ids, sampling=params,
                        fingerprints=[Fingerprint(ids=list(i), logits=list(v)) for i, v in fingerprints])
    return AnswerFile(receipt=receipt, signature=signature, public_key=key.public_key.hex(), evidence=evidence)
