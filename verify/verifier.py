"""Teacher-forced re-checking of an answer (DESIGN.md, "Verification").

One prefill over prompt + claimed output on the verifier's own backend gives its logits at
every output position. Then, at each position t:

1. sampling: the claimed token must win the seeded Gumbel-max (argmax at T = 0) computed from
   the verifier's logits, within a margin ``eps`` in logit units: honest hardware that differs in
   the last bits may resolve a near-tie the other way, a cheater's token loses by far more. With
   a grammar, the verifier rebuilds its mask at every position (``verify.grammar``): a token
   outside it loses by ``-inf``, whatever the rounding;
2. fingerprint: the committed top-k logits, the claimed token's logit and the log-normaliser
   (what a client's logprobs are derived from) must match the verifier's within ``tau``: catches
   another model, dtype or quantization, skipped layers, and logprobs shifted by the node.

Before any model work the answer must be the node's, in this order:

- ``unattributable``: the receipt's signature does not verify for its node id, or the evidence
  does not hash to the signed ``evidence_hash``. Such an answer proves nothing against the node
  named in it (anyone holding an honest receipt could otherwise alter its evidence and frame
  the node): never a conviction, never a reputation loss for it.
- ``malformed``: the node signed evidence that breaks the protocol's shape or its own
  commitments (fingerprints not exactly k distinct in-vocabulary ids, request_hash, output_hash,
  counts or fingerprint_root that do not follow from the evidence). A failed audit for the
  node that served it, but not a fraud proof: nothing about the model was checked.
- then the finish rules (``verify.finish``) and the two model checks; a failure of any of
  these on the node's own signed evidence is ``fraud``, what ``check_fraud_proof`` upholds.

``eps`` and ``tau`` come from the calibration table (see ``Tolerances``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence

import numpy as np
from pydantic import BaseModel

from verify.canonical import output_hash, request_hash
from verify.errors import VerifyError
from verify.evidence import AnswerFile
from verify.finish import finish_failures
from verify.receipts import fingerprint_root, verify_receipt
from verify.grammar import ENGINE, GrammarVocabulary, foreign_engine, grammar_problems
from verify.sampling import SamplingParams, decision_scores, log_normalizer, token_margin


MARGIN_CLIP = 1e9


class ScoringBackend(Protocol):
    """What the verifier needs from a model runtime (node/ implements it). The end-of-sequence
    ids and the decoding come from the tokenizer, which ``model_id`` covers."""

    model_id: str
    vocab_size: int
    eos_token_ids: Sequence[int]

    def score_blocks(self, token_ids: Sequence[int], from_position: int = 0) -> Iterable[np.ndarray]:
        """Logits of rows ``from_position..n-1`` in consecutive blocks (one block is fine); row i
        predicts token ``from_position + i + 1``. Blocks let a long re-check run without holding
        every row at once."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens skipped (for stop strings)."""

    def grammar_vocabulary(self) -> GrammarVocabulary:
        """The vocabulary as the grammar engine sees it; asked only for answers with a grammar."""


class WrongModelError(VerifyError, ValueError):
    """The answer is for another model than the backend runs: no verdict can be given here."""


@dataclass(frozen=True)
class Tolerances:
    """Set by measurement: ``python -m bench.calibrate`` re-checked 10,520 honest answers across
    backends (host/generic TVM, 1/2 threads, batch 1/8, numpy float64; fp32, bf16, Q8_0 and the
    default model's Q4_1) and found at most 1.5e-4 logit difference and no flipped draw; these are
    10x that, rounded up (``bench/calibration/calibration.md``). Cheats sit far above: fp16-rounded
    weights differ by ~1.6e-2, a skipped layer by ~9 (``bench/bench_cheats.py``)."""

    eps: float = 2e-3  # sampling lead a claimed token may lack, logit units
    tau: float = 2e-3  # fingerprint logit difference


class PositionFailure(BaseModel):
    position: int
    check: Literal["sampling", "fingerprint", "finish"]
    value: float  # the margin (sampling), the logit difference (fingerprint), 0 (finish: see reasons)


VerdictKind = Literal["pass", "fraud", "unattributable", "malformed"]


class Verdict(BaseModel):
    receipt_id: str
    verdict: VerdictKind
    reasons: list[str]
    failures: list[PositionFailure]
    min_margin: float | None = None  # smallest sampling margin seen, logit units
    max_logit_diff: float | None = None  # largest fingerprint difference seen


def attribution_problems(answer: AnswerFile) -> list[str]:
    """Why this answer file is not the named node's own (empty: it is): the signature, and the
    evidence hashing to the signed ``evidence_hash``. Needs no model."""
    r = answer.receipt
    if not verify_receipt(r, answer.signature, bytes.fromhex(answer.public_key)):
        return ["the receipt's signature does not verify for its node id"]
    if answer.evidence.digest() != r.evidence_hash:
        return ["the evidence does not hash to the receipt's evidence_hash: it is not what the node signed"]
    return []


def commitment_problems(answer: AnswerFile, vocab_size: int | None = None) -> list[str]:
    """Where the node's signed evidence breaks the protocol's shape or its own receipt."""
    r, ev = answer.receipt, answer.evidence
    problems = ev.shape_problems(vocab_size)
    if r.request_hash != request_hash(r.model_id, ev.prompt_ids, ev.sampling.to_canonical_dict()):
        problems.append("request_hash does not match the evidence's prompt and sampling parameters")
    if r.seed != ev.sampling.seed:
        problems.append("receipt seed differs from the evidence's seed")
    if r.output_hash != output_hash(ev.output_ids):
        problems.append("output_hash does not match the evidence's output ids")
    if (r.n_prompt_tokens, r.n_output_tokens) != (len(ev.prompt_ids), len(ev.output_ids)):
        problems.append("token counts differ from the evidence")
    if len(ev.fingerprints) == len(ev.output_ids) and r.fingerprint_root != fingerprint_root([(f.ids, f.logits) for f in ev.fingerprints]):
        problems.append("fingerprint_root does not match the evidence's fingerprints")
    if ev.sampling.grammar is not None:
        problems.extend(f"the committed grammar does not compile: {why}" for why in grammar_problems(ev.sampling.grammar))
    return problems


def _sampling_margin(row: np.ndarray, params: SamplingParams, rh: bytes, step: int, previous: Sequence[int], claimed: int,
                     eps: float, allowed: np.ndarray | None) -> float:
    """How far ``claimed`` leads the seeded draw from the verifier's logits, in logit units
    (< 0: another token wins). Scores are divided by T before the noise, so the lead is
    multiplied back by T.

    A token outside the verifier's top-k / top-p set has lead -inf, but honest rounding can sit
    right on that boundary: then the claimed logit is raised by ``eps`` (the most honest hardware
    can differ by) and the lead re-measured, minus ``eps``. A token that stays masked is fraud;
    so is a token outside the grammar's mask (``allowed``), which no rounding can move.
    """
    unit = params.temperature if params.temperature > 0 else 1.0
    lead = token_margin(decision_scores(row, params, rh, step, previous, (claimed,), allowed), claimed) * unit
    if lead == -math.inf:
        nudged = np.array(row, dtype=np.float64)
        nudged[claimed] += eps
        lead = token_margin(decision_scores(nudged, params, rh, step, previous, (claimed,), allowed), claimed) * unit - eps
    # Verdicts are signed canonical JSON, which has no infinities.
    return float(np.clip(lead, -MARGIN_CLIP, MARGIN_CLIP))


@dataclass(frozen=True)
class PositionChecks:
    """Per output position: the claimed token's sampling lead and the fingerprint difference."""

    margins: np.ndarray  # logit units, see _sampling_margin
    logit_diffs: np.ndarray  # max |committed - recomputed| over the fingerprint's values


def check_positions(answer: AnswerFile, backend: ScoringBackend, eps: float) -> PositionChecks:
    """The model work of verification: one teacher-forced prefill, then both checks at every
    output position (the calibration script reads these raw numbers)."""
    r, ev = answer.receipt, answer.evidence
    rh = bytes.fromhex(r.request_hash)
    n_prompt = len(ev.prompt_ids)
    grammar = backend.grammar_vocabulary().state(ev.sampling.grammar) if ev.sampling.grammar is not None else None
    blocks = backend.score_blocks(ev.prompt_ids + ev.output_ids[:-1], n_prompt - 1)  # row t predicts output t
    rows = (row for block in blocks for row in block)
    margins, diffs = [], []
    for t, (claimed, row, fp) in enumerate(zip(ev.output_ids, rows, ev.fingerprints)):
        allowed = None
        if grammar is not None:
            allowed = grammar.allowed()
            grammar.advance(claimed)
        margins.append(_sampling_margin(row, ev.sampling, rh, t, ev.output_ids[:t], claimed, eps, allowed))
        diffs.append(max(float(np.max(np.abs(np.asarray(fp.logits) - row[fp.ids]))),  # shape checked: k ids each
                         abs(fp.token_logit - float(row[claimed])), abs(fp.log_normalizer - log_normalizer(row))))
    return PositionChecks(np.asarray(margins), np.asarray(diffs))


def verify_answer(answer: AnswerFile, backend: ScoringBackend, tol: Tolerances = Tolerances()) -> Verdict:
    """Check an answer file end to end (see the module docstring for the order of the checks);
    ``fraud`` names every failed check and position. Raises ``WrongModelError`` for an answer of
    another model than ``backend`` runs."""
    r, ev = answer.receipt, answer.evidence
    if r.model_id != backend.model_id:
        raise WrongModelError(f"the answer is for model {r.model_id[:16]}…, this verifier runs {backend.model_id[:16]}…")
    if ev.sampling.grammar is not None and (engine := foreign_engine(ev.sampling.grammar)):
        raise WrongModelError(f"the answer's grammar was made for {engine}; this verifier runs {ENGINE}")
    if problems := attribution_problems(answer):
        return Verdict(receipt_id=r.receipt_id, verdict="unattributable", reasons=problems, failures=[])
    if problems := commitment_problems(answer, backend.vocab_size):
        return Verdict(receipt_id=r.receipt_id, verdict="malformed", reasons=problems, failures=[])

    finish = finish_failures(ev.output_ids, ev.sampling, r.finish_reason, backend.eos_token_ids, backend.decode)
    checks = check_positions(answer, backend, tol.eps)
    failures = [PositionFailure(position=t, check="finish", value=0.0) for t, _ in finish]
    failures += [PositionFailure(position=t, check="sampling", value=m) for t, m in enumerate(checks.margins.tolist()) if m < -tol.eps]
    failures += [PositionFailure(position=t, check="fingerprint", value=d) for t, d in enumerate(checks.logit_diffs.tolist()) if d > tol.tau]
    failures.sort(key=lambda f: (f.position, f.check))
    return Verdict(
        receipt_id=r.receipt_id,
        verdict="fraud" if failures else "pass",
        reasons=sorted({f"{f.check} check failed" for f in failures} | {why for _, why in finish}),
        failures=failures,
        min_margin=float(checks.margins.min()),
        max_logit_diff=float(checks.logit_diffs.max()),
    )
