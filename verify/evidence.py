"""Evidence and the answer file: everything a verifier needs, in one JSON document.

The answer file = receipt + signature + public key + evidence (prompt ids after templating,
output ids, sampling parameters, per-position fingerprints). Sizes are capped so a hostile
file cannot exhaust a verifier; ``version`` lets the format evolve.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from verify.receipts import Receipt
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
