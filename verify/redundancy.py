"""Redundant execution: do answers to the same request, from different nodes, agree?

Two honest backends given the same model, prompt, sampling parameters and seed draw the same
tokens (the seeded draw is a function of the logits, and honest logits differ by far less than
the calibrated tolerance), so their answers must have the same request hash and output tokens,
and at every position the logits both committed for the same token must agree within ``tau``.
"""

from __future__ import annotations

from verify.evidence import AnswerFile
from verify.verifier import Tolerances


def disagreement(a: AnswerFile, b: AnswerFile, tol: Tolerances = Tolerances()) -> str | None:
    """Why ``a`` and ``b`` are not the same answer, or None when they agree."""
    ra, rb = a.receipt, b.receipt
    if ra.model_id != rb.model_id:
        return f"different models ({ra.model_id[:12]} vs {rb.model_id[:12]})"
    if ra.request_hash != rb.request_hash:
        return "different requests (prompt or sampling parameters)"
    out_a, out_b = a.evidence.output_ids, b.evidence.output_ids
    for position, (x, y) in enumerate(zip(out_a, out_b)):
        if x != y:
            return f"tokens differ at position {position} ({x} vs {y})"
    if len(out_a) != len(out_b):
        return f"lengths differ ({len(out_a)} vs {len(out_b)} tokens)"
    for position, (fa, fb) in enumerate(zip(a.evidence.fingerprints, b.evidence.fingerprints)):
        theirs = dict(zip(fb.ids, fb.logits))
        for token, logit in zip(fa.ids, fa.logits):
            if token in theirs and abs(logit - theirs[token]) > tol.tau:
                return f"logits differ at position {position} (token {token}: {logit:.6g} vs {theirs[token]:.6g})"
    return None


__all__ = ["disagreement"]
