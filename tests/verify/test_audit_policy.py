"""The proof-of-sampling audit rate: the closed form held to the game played out (every split of
the validators enumerated, the least rate found by bisection), its properties, the CLI, and the
simulator agreeing with all of them."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from node.cli import main as cli_main
from tests.verify.audit_sim import SimConfig, honest_noise, simulate
from verify.audit_policy import VERIFY_COST_RATIO, GameParams, audit_overhead, cheat_gain, plan_audits

# (R, C, S, r, k, D): games with a least audit rate in (0, 1], one at p = 1 exactly, and two with none.
GAMES = [
    (1.0, 0.5, 9.0, 0.0, 1, 1.0),
    (1.0, 0.5, 9.0, 0.5, 1, 1.0),
    (1.0, 0.5, 9.0, 0.5, 2, 1.0),
    (2.0, 1.0, 0.0, 0.0, 1, 0.5),  # deterred only by auditing every answer
    (1.0, 0.3, 99.0, 0.1, 3, 0.9),
    (1.0, 0.5, 2.0, 0.6, 3, 0.7),
    (1.0, 5.0, 0.0, 0.0, 1, 1.0),  # even auditing every answer does not deter
    (1.0, 0.5, 9.0, 1.0, 4, 1.0),  # every validator colludes
]


def _game(R: float, C: float, S: float, r: float, k: int, D: float) -> GameParams:
    return GameParams(reward=R, cost=C, penalty=S, collusion=r, validators=k, detection=D)


def _enumerated_gain(game: GameParams, p: float) -> float:
    """A cheat's expected gain over honesty, from the game's story rather than its closed form:
    every way the ``k`` drawn validators can split into colluding and honest ones, each with its
    probability; an audit with an honest validator among them catches the cheat with chance
    ``D``, and a caught cheater forfeits the reward and the stake it would have kept."""
    caught = 0.0
    for colluders in itertools.product((True, False), repeat=game.validators):
        chance = math.prod(game.collusion if c else 1.0 - game.collusion for c in colluders)
        if not all(colluders):
            caught += chance * game.detection
    return game.cost - p * caught * (game.reward + game.penalty)


def _least_rate_by_bisection(game: GameParams) -> float | None:
    """The least p in [0, 1] at which the enumerated gain is not positive (None: no such p)."""
    if _enumerated_gain(game, 1.0) > 1e-12:
        return None
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _enumerated_gain(game, mid) > 0 else (low, mid)
    return high


@pytest.mark.parametrize("figures", GAMES)
def test_least_audit_rate_matches_the_game_played_out(figures):
    game = _game(*figures)
    plan = plan_audits(game)
    expected = _least_rate_by_bisection(game)
    if expected is None:
        assert plan.min_audit_rate is None and plan.audit_overhead is None and plan.cheat_gain_per_answer > 0
        return
    assert plan.min_audit_rate == pytest.approx(expected, rel=1e-9)
    assert cheat_gain(game, plan.min_audit_rate) == pytest.approx(0.0, abs=1e-9)  # indifferent exactly at the rate
    if plan.min_audit_rate < 1.0:  # just below it cheating pays, just above it does not
        assert cheat_gain(game, plan.min_audit_rate * 0.99) > 0 > cheat_gain(game, min(1.0, plan.min_audit_rate * 1.01))


def test_the_papers_case():
    """Proof of Sampling's own rate (k = 1, D = 1): C / ((1 - r)(R + S)) = 0.5 / (0.5 * 10)."""
    assert plan_audits(_game(1.0, 0.5, 9.0, 0.5, 1, 1.0)).min_audit_rate == pytest.approx(0.1, rel=1e-12)


def test_the_rate_falls_with_the_stake_and_the_validators_and_rises_with_collusion():
    rate = lambda **kw: plan_audits(_game(**{"R": 1.0, "C": 0.5, "S": 9.0, "r": 0.3, "k": 1, "D": 0.9, **kw})).min_audit_rate
    assert rate(S=99.0) < rate() < rate(S=4.0)
    assert rate(k=3) < rate(k=2) < rate()
    assert rate(r=0.0) < rate() < rate(r=0.6)
    assert rate(D=1.0) < rate()


def test_audit_overhead_is_the_audits_share_of_all_compute_counted():
    """10,000 answers of cost C at rate p: p * 10,000 audits of k re-executions at rho * C each.
    The plan's overhead is what those audits take of everything spent."""
    game = _game(1.0, 0.5, 9.0, 0.5, 2, 1.0)
    plan = plan_audits(game)
    answers = 10_000
    audits = plan.min_audit_rate * answers
    spent_on_audits = audits * game.validators * VERIFY_COST_RATIO * game.cost
    spent_on_answers = answers * game.cost
    assert plan.audit_overhead == pytest.approx(spent_on_audits / (spent_on_answers + spent_on_audits), rel=1e-12)
    assert 0 < audit_overhead(game, 0.01) < audit_overhead(game, 0.1) < audit_overhead(game, 1.0) < 1
    assert audit_overhead(game, 0.0) == 0


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
    run = simulate(SimConfig(nodes=300, cheater_share=0.0, audit_rate=0.05, seed=1), tau=math.exp(mu))
    assert run["false_convictions"] > 0
