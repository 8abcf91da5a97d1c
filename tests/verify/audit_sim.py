"""Discrete-event simulation of sampled audits over a network of 10^2 to 10^4 nodes.

Each node answers as a Poisson process; a share of nodes cheats on a share of its answers. Every
answer is audited with probability ``p`` (thinning: audit events are a Poisson process of rate
``answers_per_hour * p`` per node, kept in one time-ordered event queue). An audit draws ``k``
validators among the nodes still in the network; colluding validators (the cheaters, covering for
each other) stay silent, an honest one flags a cheated answer with probability ``D``. A flagged
node is convicted and leaves the routing table (or, with ``keep_convicted``, pays the penalty and
goes on: the repeated one-shot game that ``proofmesh posp`` solves). Honest answers meet honest
hardware noise: per-position fingerprint differences drawn from a log-normal fitted to the widest
honest row of the calibration table (p50 and p99); an honest answer is falsely flagged if any of
its positions exceeds ``tau``.

Reports time to catch each cheater, false convictions, audit overhead (re-execution compute over
generation compute), and each cheated answer's net gain beside the closed form ``C - p q (R + S)``.

Why in tests/: it is the independent check of ``verify.audit_policy`` (its tests hold the closed
form to it), not something a node or a client runs; ``bench/simulate_audits.py`` sweeps audit
rates with it, prints the table and draws the plot.
"""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from verify.audit_policy import VERIFY_COST_RATIO, GameParams, catch_probability, cheat_gain, plan_audits
from verify.verifier import Tolerances

CALIBRATION = Path(__file__).resolve().parents[2] / "bench" / "calibration" / "calibration.json"  # the measured table


class SimConfig(BaseModel):
    nodes: int = Field(1000, ge=2)
    cheater_share: float = Field(0.05, ge=0, le=1)
    cheat_rate: float = Field(1.0, ge=0, le=1, description="share of a cheater's answers that are cheated")
    audit_rate: float = Field(0.05, ge=0, le=1)
    validators: int = Field(1, ge=1)
    detection: float = Field(1.0, ge=0, le=1)
    answers_per_hour: float = Field(10.0, gt=0)
    hours: float = Field(48.0, gt=0)
    positions: int = Field(64, ge=1, description="fingerprinted positions per answer")
    reward: float = 1.0
    cost: float = 0.5
    penalty: float = 10.0
    verify_cost_ratio: float = VERIFY_COST_RATIO
    keep_convicted: bool = False
    seed: int = 0


def honest_noise(calibration: Path = CALIBRATION) -> tuple[float, float]:
    """(mu, sigma) of log |diff| from the calibration row with the widest honest p99."""
    rows = json.loads(calibration.read_text())["rows"]
    worst = max(rows, key=lambda r: r["diff_p99"])
    p50, p99 = max(worst["diff_p50"], 1e-9), worst["diff_p99"]
    return math.log(p50), max(math.log(p99 / p50), 1e-6) / 2.326  # z(0.99)


def false_flag_probability(tau: float, positions: int, noise: tuple[float, float]) -> float:
    """P(an honest answer has some position whose difference exceeds tau)."""
    mu, sigma = noise
    tail = 0.5 * math.erfc((math.log(tau) - mu) / (sigma * math.sqrt(2)))
    return -math.expm1(positions * math.log1p(-tail)) if tail < 1 else 1.0


def simulate(cfg: SimConfig, tau: float = Tolerances().tau, noise: tuple[float, float] | None = None) -> dict:
    rng = np.random.default_rng(cfg.seed)
    n_cheaters = round(cfg.nodes * cfg.cheater_share)
    cheater = np.zeros(cfg.nodes, bool)
    cheater[rng.choice(cfg.nodes, n_cheaters, replace=False)] = True
    active = np.ones(cfg.nodes, bool)
    p_false = false_flag_probability(tau, cfg.positions, noise or honest_noise())
    audit_rate_per_node = cfg.answers_per_hour * cfg.audit_rate

    events: list[tuple[float, int]] = []  # (time, node): the node's next audited answer
    if audit_rate_per_node > 0:
        for node in range(cfg.nodes):
            heapq.heappush(events, (rng.exponential(1 / audit_rate_per_node), node))
    caught_at: dict[int, float] = {}
    catches = audits = cheated_audits = false_convictions = 0
    while events:
        t, node = heapq.heappop(events)
        if t > cfg.hours:
            break
        if not active[node]:
            continue
        audits += 1
        others = np.flatnonzero(active)
        others = others[others != node]
        drawn = rng.choice(others, min(cfg.validators, len(others)), replace=False)
        honest_validators = int((~cheater[drawn]).sum())
        if cheater[node] and rng.random() < cfg.cheat_rate:
            cheated_audits += 1
            flagged = rng.random() < 1 - (1 - cfg.detection) ** honest_validators
        else:
            flagged = honest_validators > 0 and rng.random() < 1 - (1 - p_false) ** honest_validators
            false_convictions += flagged
        if flagged and cheater[node]:
            catches += 1
            caught_at.setdefault(node, t)
        if flagged and not cfg.keep_convicted:
            active[node] = False
            continue
        heapq.heappush(events, (t + rng.exponential(1 / audit_rate_per_node), node))

    # Answers served: Poisson over each node's time in the network; cheated ones by binomial thinning.
    time_in = np.full(cfg.nodes, cfg.hours)
    for node, t in caught_at.items():
        if not cfg.keep_convicted:
            time_in[node] = t
    answers = rng.poisson(cfg.answers_per_hour * time_in)
    cheated = int(rng.binomial(answers[cheater], cfg.cheat_rate).sum()) if n_cheaters else 0
    times = sorted(caught_at.values())
    game = GameParams(reward=cfg.reward, cost=cfg.cost, penalty=cfg.penalty, collusion=cfg.cheater_share,
                      validators=cfg.validators, detection=cfg.detection, verify_cost_ratio=cfg.verify_cost_ratio)
    return {
        "config": cfg.model_dump(),
        "cheaters": n_cheaters,
        "cheaters_caught": len(caught_at),
        "mean_hours_to_catch": float(np.mean(times)) if times else None,
        "median_hours_to_catch": float(np.median(times)) if times else None,
        "false_convictions": false_convictions,
        "false_flag_probability_per_audit": p_false,
        "audits": audits,
        "answers": int(answers.sum()),
        "audit_overhead": audits * cfg.validators * cfg.verify_cost_ratio / max(int(answers.sum()), 1),
        "cheated_answers": cheated,
        # Each cheated answer saves C; each catch costs R + S. Only meaningful with keep_convicted.
        "gain_per_cheated_answer": (cfg.cost * cheated - (cfg.reward + cfg.penalty) * catches) / cheated if cheated else None,
        "closed_form_gain": cheat_gain(game, cfg.audit_rate),
        "closed_form_catch_probability": catch_probability(game),
        "closed_form_min_audit_rate": plan_audits(game).min_audit_rate,
    }
