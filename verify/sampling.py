"""Sampling that anyone can re-check from the same logits (DESIGN.md, "Sampling that can be re-checked").

A sampled token must be reproducible by a verifier holding the logits, the seed and the
request hash. So sampling is Gumbel-max with counter-based noise, and everything before the
noise is a deterministic function of the logits and of the earlier output tokens. Order:

1. penalties (OpenAI): ``score[j] = logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty``
   where ``count`` counts token j among the tokens generated so far;
2. temperature: ``score /= T`` (T = 0 means greedy: the argmax of the penalised scores);
3. top-k: keep the k best scores;
4. top-p: keep the smallest set of best tokens whose softmax mass reaches ``top_p`` (at least one);
5. the token is ``argmax(score + g)`` over the kept tokens, ``g`` Gumbel noise for this step.

Ranking ties are broken by the lower token id (a stable sort on ``-score``). All arithmetic is
float64.

The noise for step t (exactly, so another implementation can reproduce it): key = the first 16
bytes of ``sha256(b"proofmesh/gumbel/v1" || seed as 8 bytes big-endian || request_hash)``, read
as two little-endian uint64 words; numpy's Philox-4x64-10 with that key and counter
``[0, 0, 0, t]``; draw ``vocab_size`` uint64s with ``random_raw``; ``u = ((x >> 11) + 0.5) / 2**53``
(strictly inside (0, 1)); ``g = -log(-log(u))``.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

NOISE_DOMAIN = b"proofmesh/gumbel/v1"
MAX_STOP_STRINGS = 4


class SamplingParams(BaseModel):
    """Every parameter that decides which tokens are produced (all hashed into request_hash)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 disables
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: int = Field(256, ge=1)
    seed: int = Field(..., ge=0, lt=2**64)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    def to_canonical_dict(self) -> dict:
        data = self.model_dump()
        data["stop"] = list(self.stop)
        data["stop_token_ids"] = list(self.stop_token_ids)
        return data


def gumbel_noise(seed: int, request_hash: bytes, step: int, vocab_size: int) -> np.ndarray:
    """Gumbel(0, 1) noise for one step, as the module docstring specifies (float64)."""
    digest = hashlib.sha256(NOISE_DOMAIN + int(seed).to_bytes(8, "big") + bytes(request_hash)).digest()
    key = np.frombuffer(digest[:16], dtype="<u8")
    bitgen = np.random.Philox(key=key, counter=np.array([0, 0, 0, step], dtype=np.uint64))
    raw = bitgen.random_raw(vocab_size)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)
    return -np.log(-np.log(u))


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Token ids from best to worst score, ties to the lower id."""
    return np.argsort(-scores, kind="stable")


def process_logits(logits: np.ndarray, params: SamplingParams, previous_output_ids: Sequence[int]) -> np.ndarray:
    """Steps 1-4: penalised, tempered, truncated scores (float64; -inf for dropped tokens)."""
    scores = np.array(logits, dtype=np.float64).reshape(-1)
    if len(previous_output_ids) and (params.frequency_penalty or params.presence_penalty):
        counts = np.bincount(np.asarray(previous_output_ids, dtype=np.int64), minlength=scores.size)[: scores.size]
        scores -= counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
    if params.temperature > 0:
        scores /= params.temperature
    if params.top_k and params.top_k < scores.size:
        drop = _ranked(scores)[params.top_k :]
        scores[drop] = -np.inf
    if params.top_p < 1.0:
        order = _ranked(scores)
        kept = scores[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        cumulative = np.cumsum(probs)
        n_keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        scores[order[n_keep:]] = -np.inf
    return scores


def decision_scores(
    logits: np.ndarray, params: SamplingParams, request_hash: bytes, step: int, previous_output_ids: Sequence[int]
) -> np.ndarray:
    """The array whose argmax is the sampled token (processed scores, plus noise when T > 0)."""
    scores = process_logits(logits, params, previous_output_ids)
    if params.temperature > 0:
        scores = scores + gumbel_noise(params.seed, request_hash, step, scores.size)
    return scores


def sample_token(
    logits: np.ndarray, params: SamplingParams, request_hash: bytes, step: int, previous_output_ids: Sequence[int]
) -> int:
    """The token for this step: argmax of ``decision_scores`` (lowest id on exact ties)."""
    return int(np.argmax(decision_scores(logits, params, request_hash, step, previous_output_ids)))


def token_margin(scores: np.ndarray, token_id: int) -> float:
    """How far ``token_id`` wins (> 0) or loses (< 0) the argmax of ``scores``."""
    others = np.delete(scores, token_id)
    return float(scores[token_id] - np.max(others)) if others.size else float("inf")


def top_k_fingerprint(logits: np.ndarray, k: int = 8) -> tuple[list[int], list[float]]:
    """The k highest raw logits: ids and values, ordered by (-logit, id)."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    k = min(k, row.size)
    candidates = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
    # argpartition may cut a tie at the k-th value arbitrarily: widen to every tied value.
    threshold = row[candidates].min()
    candidates = np.flatnonzero(row >= threshold)
    order = candidates[np.lexsort((candidates, -row[candidates]))][:k]
    return [int(i) for i in order], [float(row[i]) for i in order]


class StopChecker:
    """Stop strings and stop token ids, applied to text as it streams (OpenAI semantics:
    the stop string and anything after it are not returned)."""

    def __init__(self, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = ()):
        self.stop = tuple(stop)
        self.stop_token_ids = frozenset(stop_token_ids)
        self._held = ""
        self.stopped = False

    def check_token(self, token_id: int) -> bool:
        return token_id in self.stop_token_ids

    def feed_text(self, new_text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string completed."""
        if self.stopped:
            return "", True
        text = self._held + new_text
        if not self.stop:
            self._held = ""
            return text, False
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)], True
        # Hold back the longest suffix that is a prefix of some stop string.
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


__all__ = [
    "SamplingParams",
    "StopChecker",
    "decision_scores",
    "gumbel_noise",
    "process_logits",
    "sample_token",
    "token_margin",
    "top_k_fingerprint",
]
