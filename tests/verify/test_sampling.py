"""Seeded, re-checkable sampling: determinism, statistics, and OpenAI's parameter semantics."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from pydantic import ValidationError

from verify.sampling import (
    SamplingParams,
    StopChecker,
    decision_scores,
    gumbel_noise,
    process_logits,
    sample_token,
    token_margin,
    top_k_fingerprint,
)

RH = hashlib.sha256(b"request").digest()


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"seed": 1, **kw})


def draw(logits, p, steps, rh=RH):
    return [sample_token(logits, p, rh, t, []) for t in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    a = draw(logits, params(seed=5, temperature=1.0), 32)
    assert a == draw(logits, params(seed=5, temperature=1.0), 32)
    assert a != draw(logits, params(seed=6, temperature=1.0), 32)
    assert a != draw(logits, params(seed=5, temperature=1.0), 32, rh=hashlib.sha256(b"other").digest())


def test_noise_is_counter_based_and_ignores_global_rng():
    n1 = gumbel_noise(9, RH, 3, 64)
    np.random.seed(123)
    np.random.random(1000)
    assert np.array_equal(n1, gumbel_noise(9, RH, 3, 64))
    assert not np.array_equal(n1, gumbel_noise(9, RH, 4, 64))
    assert np.all(np.isfinite(n1))
    # The construction in the docstring, written out independently.
    digest = hashlib.sha256(b"proofmesh/gumbel/v1" + (9).to_bytes(8, "big") + RH).digest()
    bg = np.random.Philox(key=np.frombuffer(digest[:16], "<u8"), counter=np.array([0, 0, 0, 3], np.uint64))
    u = ((bg.random_raw(64) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    assert np.array_equal(n1, -np.log(-np.log(u)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_gumbel_max_frequencies_match_softmax(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    p = params(temperature=temperature, seed=77)
    n = 20000
    counts = np.bincount(draw(logits, p, n), minlength=6)
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom: p < 0.001 beyond 20.5


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([0.1, 3.0, 3.0, -1.0])
    assert sample_token(logits, params(temperature=0.0), RH, 0, []) == 1
    assert draw(logits, params(temperature=0.0, seed=2), 5) == [1] * 5


def test_top_k_never_leaves_the_top_k():
    logits = np.random.default_rng(1).standard_normal(100)
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert set(draw(logits, params(top_k=3, temperature=1.5), 300)) <= top3


def test_top_p_keeps_the_nucleus():
    # probs [0.5, 0.3, 0.15, 0.05]: top_p = 0.75 keeps the first two (0.5 + 0.3 >= 0.75).
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    scores = process_logits(logits, params(top_p=0.75), [])
    assert np.isfinite(scores[:2]).all() and np.isneginf(scores[2:]).all()
    scores = process_logits(logits, params(top_p=0.85), [])
    assert np.isfinite(scores[:3]).all() and np.isneginf(scores[3])
    assert np.isfinite(process_logits(logits, params(top_p=0.01), [])).sum() == 1


def test_penalties_follow_openai_formula():
    logits = np.zeros(5)
    prev = [1, 1, 1, 3]
    s = process_logits(logits, params(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25), prev)
    assert s.tolist() == [0.0, -(3 * 0.5 + 0.25), 0.0, -(0.5 + 0.25), 0.0]
    s2 = process_logits(logits, params(temperature=2.0, presence_penalty=1.0), prev)
    assert s2.tolist() == [0.0, -0.5, 0.0, -0.5, 0.0]  # penalty applied before temperature


def test_decision_scores_and_margin_explain_the_choice():
    logits = np.random.default_rng(2).standard_normal(50)
    p = params(temperature=0.7, seed=3)
    scores = decision_scores(logits, p, RH, 4, [])
    tok = sample_token(logits, p, RH, 4, [])
    assert token_margin(scores, tok) > 0
    assert all(token_margin(scores, t) < 0 for t in range(50) if t != tok)


@pytest.mark.parametrize(
    "bad",
    [{"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 0.0}, {"top_k": -1}, {"presence_penalty": 3},
     {"max_tokens": 0}, {"seed": -1}, {"seed": 2**64}, {"stop": ("a", "b", "c", "d", "e")}, {"stop": ("",)},
     {"unknown": 1}],
)
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**{"seed": 0, **bad})


def test_fingerprint_order_and_ties():
    logits = np.array([0.0, 5.0, 2.0, 5.0, -1.0, 2.0], dtype=np.float32)
    ids, vals = top_k_fingerprint(logits, 4)
    assert ids == [1, 3, 2, 5] and vals == [5.0, 5.0, 2.0, 2.0]
    assert top_k_fingerprint(logits, 10)[0] == [1, 3, 2, 5, 0, 4]


def test_stop_checker_holds_back_partial_matches():
    sc = StopChecker(stop=["STOP", "\n\n"])
    assert sc.feed_text("Hello ST") == ("Hello ", False)
    assert sc.feed_text("ART") == ("START", False)
    assert sc.feed_text(" end\n") == (" end", False)
    assert sc.feed_text("\nafter") == ("", True)
    assert sc.flush() == ""
    sc2 = StopChecker(stop=["xyz"])
    assert sc2.feed_text("abcx") == ("abc", False)
    assert sc2.flush() == "x"
    assert StopChecker(stop_token_ids=[7]).check_token(7)
