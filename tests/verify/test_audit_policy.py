"""The proof-of-sampling audit rate: the closed form, the CLI, and the simulator agreeing with both."""

from __future__ import annotations

import json
from math import exp

import pytest

from bench.simulate_audits import SimConfig, honest_noise, simulate
from node.cli import main as cli_main
from verify.audit_policy import VERIFY_COST_RATIO, GameParams, plan_audits

# (R, C, S, r, k, D) -> least audit rate, worked by hand from p = C / (D (1 - r^k) (R + S))
CASES = [
    ((1.0, 0.5, 9.0, 0.0, 1, 1.0), 0.05),
    ((1.0, 0.5, 9.0, 0.5, 1, 1.0), 0.10),  # the paper's C / ((1 - r)(R + S))
    ((1.0, 0.5, 9.0, 0.5, 2, 1.0), 0.5 / (0.75 * 10)),
    ((2.0, 1.0, 0.0, 0.0, 1, 0.5), 1.0),
    ((1.0, 0.3, 99.0, 0.1, 3, 0.9), 0.3 / (0.9 * 0.999 * 100)),
    ((1.0, 5.0, 0.0, 0.0, 1, 1.0), None),  # even auditing every answer does not deter
    ((1.0, 0.5, 9.0, 1.0, 4, 1.0), None),  # every validator colludes
]


@pytest.mark.parametrize("figures,expected", CASES)
def test_least_audit_rate_is_the_closed_form(figures, expected):
    R, C, S, r, k, D = figures
    plan = plan_audits(GameParams(reward=R, cost=C, penalty=S, collusion=r, validators=k, detection=D))
    if expected is None:
        assert plan.min_audit_rate is None and plan.audit_overhead is None and plan.cheat_gain_per_answer > 0
    else:
        assert plan.min_audit_rate == pytest.approx(expected, rel=1e-12)
        assert plan.cheat_gain_per_answer == pytest.approx(0.0, abs=1e-12)  # indifferent exactly at the rate
        rho_k = VERIFY_COST_RATIO * k
        assert plan.audit_overhead == pytest.approx(expected * rho_k / (1 + expected * rho_k))


def test_cli_prints_the_plan_as_json_and_rejects_bad_figures(capsys):
    assert cli_main(["posp", "--reward", "1", "--cost", "0.5", "--penalty", "9", "--collusion", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["min_audit_rate"] == pytest.approx(0.1) and out["params"]["collusion"] == 0.5
    assert cli_main(["posp", "--reward", "1", "--cost", "0", "--penalty", "9"]) == 2
    assert "--cost" in capsys.readouterr().err


def sim(**kw):
    return simulate(SimConfig(**{"nodes": 300, "cheater_share": 0.1, "hours": 48.0, "seed": 3, **kw}))


def test_simulated_cheating_stops_paying_at_the_posp_rate():
    """Repeated game (convicted nodes pay and stay): the simulated net gain per cheated answer
    follows C - p q (R + S) and changes sign at the rate proofmesh posp computes."""
    p_star = sim(audit_rate=0.05)["closed_form_min_audit_rate"]
    below = sim(audit_rate=0.6 * p_star, keep_convicted=True)
    above = sim(audit_rate=1.6 * p_star, keep_convicted=True)
    assert below["gain_per_cheated_answer"] > 0 > above["gain_per_cheated_answer"]
    for run in (below, above):
        assert run["gain_per_cheated_answer"] == pytest.approx(run["closed_form_gain"], abs=0.1)


def test_cheaters_are_caught_at_the_expected_pace_and_honest_nodes_never_convicted():
    run = sim(audit_rate=0.05)
    assert run["cheaters_caught"] == run["cheaters"] == 30
    expected_hours = 1 / (10.0 * 0.05 * run["closed_form_catch_probability"])  # exponential wait for a caught audit
    assert run["mean_hours_to_catch"] == pytest.approx(expected_hours, rel=0.3)
    assert run["false_convictions"] == 0 and run["false_flag_probability_per_audit"] < 1e-12
    assert run["audit_overhead"] == pytest.approx(0.05 * VERIFY_COST_RATIO, rel=0.15)


def test_a_tolerance_inside_the_honest_noise_convicts_honest_nodes():
    """The false-conviction count can fail: at tau = the honest median difference it does."""
    mu, _ = honest_noise()
    run = simulate(SimConfig(nodes=300, cheater_share=0.0, audit_rate=0.05, seed=1), tau=exp(mu))
    assert run["false_convictions"] > 0
