"""How often to audit: the proof-of-sampling game (Hyperbolic's Proof of Sampling, arXiv 2405.00295).

Baseline game, per answer. A cheating node saves its compute cost ``C``. The answer is audited
with probability ``p``, decided after it is complete from a secret the node never sees, so the
node cannot cheat only on answers that will go unaudited. An audit re-executes the answer on
``k`` validators drawn at random; each one belongs to a colluding share ``r`` of the network with
probability ``r`` and then does not report. A cheat is caught when at least one validator is
honest and its re-execution detects the cheat (probability ``D``, 1 for every cheat of the cheat
suite on 64-token answers), and a caught cheater loses the answer's reward ``R`` and its stake
``S``. Cheating on one answer is then worth

    C - p * q * (R + S),     q = D * (1 - r^k)   (the chance that an audit catches a cheat)

so honesty is the best response iff ``p >= C / (q * (R + S))``: the least audit rate. With ``k = 1``
and ``D = 1`` this is the paper's ``C / ((1 - r)(R + S))``.

Extensions this module defends:

- Partial cheating (skipping a fraction ``f`` of the work on an answer, or cheating on a fraction
  of answers) saves ``f * C`` and is caught with probability ``D_f``; the rate above deters it too
  whenever ``D_f >= f * D``, which holds for every partial cheat the cheat suite measures (one
  skipped layer, a cheap-model decode: caught at the first token).
- Validator cost: each audit costs ``k`` re-executions of ``rho * C`` each (``rho``, the
  verification-cost ratio: a teacher-forced prefill against generation, measured by
  ``bench/bench_verify.py``), so auditing at rate ``p`` adds ``p * k * rho`` to the compute of the
  answers it protects: ``audit_overhead = p k rho / (1 + p k rho)`` of the total.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# verify / generate on the default model as a node serves it (native quantized weights), answers of
# 64-512 tokens at batch 1: 0.30-0.31 (bench_verify, 2-core AMD EPYC znver4; 0.14 was the fp32 path's)
VERIFY_COST_RATIO = 0.31


class GameParams(BaseModel):
    """The figures of one proof-of-sampling game."""

    reward: float = Field(ge=0, description="R: paid for one answer, forfeited when caught")
    cost: float = Field(gt=0, description="C: compute cost of one answer, what a cheat saves")
    penalty: float = Field(ge=0, description="S: stake slashed when caught")
    collusion: float = Field(0.0, ge=0, le=1, description="r: share of validators that collude with cheaters")
    validators: int = Field(1, ge=1, description="k: validators asked per audit")
    detection: float = Field(1.0, gt=0, le=1, description="D: chance an honest validator's re-execution flags a cheat")
    verify_cost_ratio: float = Field(VERIFY_COST_RATIO, ge=0, description="rho: one re-execution's cost against generation")


class AuditPlan(BaseModel):
    """The least audit rate for a game, and what it costs."""

    min_audit_rate: float | None = Field(description="least p at which honesty is a best response; None: none up to 1")
    catch_probability: float = Field(description="q: the chance one audit catches a cheat")
    audit_overhead: float | None = Field(description="share of total compute spent on audits at that rate")
    cheat_gain_per_answer: float = Field(description="C - p q (R + S) at min_audit_rate (1 if infeasible): <= 0 deters")
    params: GameParams


def catch_probability(game: GameParams) -> float:
    """q = D (1 - r^k): some validator is honest, and its re-execution flags the cheat."""
    return game.detection * (1.0 - game.collusion**game.validators)


def cheat_gain(game: GameParams, audit_rate: float) -> float:
    """Expected gain of cheating on one answer over answering honestly, at ``audit_rate``."""
    return game.cost - audit_rate * catch_probability(game) * (game.reward + game.penalty)


def audit_overhead(game: GameParams, audit_rate: float) -> float:
    """Share of all compute that audits take at ``audit_rate``: p k rho / (1 + p k rho)."""
    extra = audit_rate * game.validators * game.verify_cost_ratio
    return extra / (1.0 + extra)


def plan_audits(game: GameParams) -> AuditPlan:
    """The least audit rate at which cheating does not pay, or None where even p = 1 does not deter."""
    q = catch_probability(game)
    at_stake = q * (game.reward + game.penalty)
    rate = game.cost / at_stake if at_stake > 0 else None
    if rate is not None and rate > 1.0:
        rate = None
    return AuditPlan(
        min_audit_rate=rate,
        catch_probability=q,
        audit_overhead=None if rate is None else audit_overhead(game, rate),
        cheat_gain_per_answer=cheat_gain(game, 1.0 if rate is None else rate),
        params=game,
    )


__all__ = ["VERIFY_COST_RATIO", "AuditPlan", "GameParams", "audit_overhead", "catch_probability", "cheat_gain", "plan_audits"]
