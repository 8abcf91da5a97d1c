"""Seeded, re-checkable sampling: determinism, the documented noise construction, statistics,
and OpenAI's parameter semantics.

Expected values are computed by hand or by independent code here (never copied from a run).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from verify.sampling import (
    SamplingParams,
    _draw_within_nucleus,
    _uniforms,
    decision_scores,
    gumbel_noise,
    process_logits,
    sample_token,
    token_margin,
)

RH = hashlib.sha256(b"request").digest()
RH2 = hashlib.sha256(b"other request").digest()


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"seed": 1, **kw})


def draw(logits, p, steps, rh=RH):
    return [sample_token(logits, p, rh, t, []) for t in range(steps)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- an independent Philox-4x64-10

_M64 = 2**64 - 1


def _philox4x64_10(counter: list[int], key: list[int]) -> list[int]:
    """Random123's Philox-4x64 with 10 rounds, in plain Python integers."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B97F4A7C15) & _M64, (k[1] + 0xBB67AE8584CAA73B) & _M64]
        p0 = 0xD2E7470EE14C6C93 * c[0]
        p1 = 0xCA5A826395121157 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & _M64, (p0 >> 64) ^ c[3] ^ k[1], p0 & _M64]
    return c


def _reference_noise(seed: int, request_hash: bytes, step: int, vocab: int) -> list[float]:
    """The module docstring's construction, written out without numpy's bit generators."""
    digest = hashlib.sha256(b"proofmesh/gumbel/v1" + seed.to_bytes(8, "big") + request_hash).digest()
    key = [int.from_bytes(digest[0:8], "little"), int.from_bytes(digest[8:16], "little")]
    words: list[int] = []
    block = 1  # numpy increments the counter before the first block
    while len(words) < vocab:
        words += _philox4x64_10([block, 0, 0, step], key)
        block += 1
    out = []
    for x in words[:vocab]:
        u = (2 * (x >> 12) + 1) / 2.0**53
        out.append(-math.log(-math.log(u)))
    return out


# ---------------------------------------------------------------- determinism and the noise


def test_same_seed_same_tokens_different_seed_or_request_different_tokens():
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    a = draw(logits, params(seed=5), 32)
    assert a == draw(logits, params(seed=5), 32)
    assert a == draw(logits.copy(), params(seed=5), 32)
    assert a != draw(logits, params(seed=6), 32)
    assert a != draw(logits, params(seed=5), 32, rh=RH2)


def test_noise_depends_on_seed_request_and_step():
    n = gumbel_noise(9, RH, 3, 64)
    assert n.dtype == np.float64 and n.shape == (64,)
    assert np.all(np.isfinite(n))
    assert np.array_equal(n, gumbel_noise(9, RH, 3, 64))
    for other in (gumbel_noise(9, RH, 4, 64), gumbel_noise(10, RH, 3, 64), gumbel_noise(9, RH2, 3, 64)):
        assert not np.any(other == n)  # a different stream, not a shifted or partly equal one
    # A longer draw starts with the same words: the vocabulary size only truncates.
    assert np.array_equal(gumbel_noise(9, RH, 3, 70)[:64], n)
    assert gumbel_noise(9, RH, 3, 0).shape == (0,)


def test_noise_ignores_and_leaves_alone_the_global_rng():
    np.random.seed(123)
    first = gumbel_noise(2, RH, 0, 32)
    state = np.random.get_state()[1].copy()
    again = gumbel_noise(2, RH, 0, 32)
    assert np.array_equal(np.random.get_state()[1], state)  # not advanced
    np.random.seed(999)
    np.random.random(1000)
    assert np.array_equal(first, again)
    assert np.array_equal(first, gumbel_noise(2, RH, 0, 32))


@pytest.mark.parametrize("seed,step,vocab", [(0, 0, 1), (9, 3, 37), (2**64 - 1, 2**40 + 7, 13)])
def test_noise_matches_an_independent_implementation_of_the_docstring(seed, step, vocab):
    got = gumbel_noise(seed, RH, step, vocab)
    want = _reference_noise(seed, RH, step, vocab)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)  # log may differ by an ulp


def test_uniforms_are_exact_and_strictly_inside_the_unit_interval():
    raw = np.array([0, 1, 2**12 - 1, 2**12, 2**63, 2**64 - 1], dtype=np.uint64)
    u = _uniforms(raw)
    assert np.all(u > 0) and np.all(u < 1)
    assert u[0] == 2.0**-53 and u[-1] == 1 - 2.0**-53
    assert u[0] == u[1] == u[2] and u[3] == 3 * 2.0**-53  # the low 12 bits are dropped
    assert u[4] == 0.5 + 2.0**-53
    assert np.all(np.isfinite(-np.log(-np.log(u))))


def test_noise_is_standard_gumbel():
    # 200k draws: mean = Euler's gamma (sd of the estimate 1.28/sqrt(2e5) = 0.0029),
    # variance = pi^2/6 = 1.645 (sd of the estimate ~ 0.012). Bounds at ~5 sd.
    g = np.concatenate([gumbel_noise(4, RH, t, 1000) for t in range(200)])
    assert abs(g.mean() - 0.5772156649) < 0.015
    assert abs(g.var() - math.pi**2 / 6) < 0.06


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_gumbel_max_frequencies_match_softmax(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    n = 20000
    counts = np.bincount(draw(logits, params(temperature=temperature, seed=77), n), minlength=6)
    probs = softmax(logits / temperature)
    expected = probs * n
    # Pearson chi-square with 5 degrees of freedom: a correct sampler exceeds 20.5 with p = 0.001.
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5
    # Each frequency has sd <= sqrt(0.25 / n) = 0.0035; 0.02 is > 5 sd.
    assert np.max(np.abs(counts / n - probs)) < 0.02


def test_truncated_sampling_renormalises_over_the_kept_tokens():
    logits = np.array([0.3, 2.0, -0.2, 1.5, 1.0, -3.0])
    n = 10000
    counts = np.bincount(draw(logits, params(top_k=3, seed=11), n), minlength=6)
    kept = [1, 3, 4]
    assert counts.sum() == counts[kept].sum()
    expected = softmax(logits[kept]) * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


# ---------------------------------------------------------------- greedy, top-k, top-p, penalties


def test_greedy_is_argmax_with_lowest_id_on_ties_and_ignores_the_seed():
    logits = np.array([0.1, 3.0, 3.0, -1.0])
    assert sample_token(logits, params(temperature=0.0), RH, 0, []) == 1
    assert draw(logits, params(temperature=0.0, seed=2), 5) == [1] * 5
    assert draw(logits, params(temperature=0.0, seed=3), 5, rh=RH2) == [1] * 5
    rand = np.random.default_rng(5).standard_normal(300)
    assert sample_token(rand, params(temperature=0.0), RH, 7, []) == int(np.argmax(rand))
    # Greedy applies penalties first: token 1 loses 2 * 1.0, token 2 wins.
    assert sample_token(logits, params(temperature=0.0, frequency_penalty=1.0), RH, 0, [1, 1]) == 2
    assert np.array_equal(decision_scores(rand, params(temperature=0.0), RH, 0, []), rand)


def test_top_k_never_leaves_the_top_k():
    logits = np.random.default_rng(1).standard_normal(100)
    top3 = set(np.argsort(-logits)[:3].tolist())
    tokens = draw(logits, params(top_k=3, temperature=2.0), 300)
    assert set(tokens) <= top3 and len(set(tokens)) > 1
    scores = process_logits(logits, params(top_k=3), [])
    assert set(np.flatnonzero(np.isfinite(scores)).tolist()) == top3
    assert np.isfinite(process_logits(logits, params(top_k=100), [])).all()
    assert np.isfinite(process_logits(logits, params(top_k=1000), [])).all()


def test_top_k_ties_keep_the_lower_ids():
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    kept = np.flatnonzero(np.isfinite(process_logits(logits, params(top_k=2), [])))
    assert kept.tolist() == [1, 2]
    kept = np.flatnonzero(np.isfinite(process_logits(logits, params(top_k=5), [])))
    assert kept.tolist() == [0, 1, 2, 3, 5]


def test_top_p_keeps_the_nucleus():
    # probs [0.5, 0.3, 0.15, 0.05]: 0.5 < 0.75 <= 0.5 + 0.3, so top_p = 0.75 keeps two tokens.
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    kept = lambda p: np.flatnonzero(np.isfinite(process_logits(logits, params(top_p=p), []))).tolist()
    assert kept(0.75) == [1, 3]
    assert kept(0.85) == [0, 1, 3]  # 0.8 < 0.85 <= 0.95
    assert kept(0.96) == [0, 1, 2, 3]
    assert kept(0.01) == [1]  # at least the best token
    assert kept(1.0) == [0, 1, 2, 3]
    # Kept scores are unchanged (T = 1): truncation only masks.
    s = process_logits(logits, params(top_p=0.75), [])
    assert s[1] == logits[1] and s[3] == logits[3]


def test_top_p_reaching_the_mass_exactly_and_ties():
    # Four equal weights (exp(0) = 1 exactly): running sums 1, 2, 3, 4 against 0.5 * 4 = 2.
    # "Reaches" means >=, so exactly two tokens are kept, the lower ids.
    kept = np.flatnonzero(np.isfinite(process_logits(np.zeros(4), params(top_p=0.5), [])))
    assert kept.tolist() == [0, 1]


def test_top_p_applies_after_top_k_on_the_renormalised_mass():
    # probs [0.4, 0.3, 0.2, 0.1]. top_p = 0.5 alone keeps two (0.4 < 0.5 <= 0.7); after top_k = 2
    # the mass is renormalised to [4/7, 3/7] and 4/7 >= 0.5 keeps one.
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert np.isfinite(process_logits(logits, params(top_p=0.5), [])).sum() == 2
    assert np.flatnonzero(np.isfinite(process_logits(logits, params(top_p=0.5, top_k=2), []))).tolist() == [0]


def test_top_p_sees_the_temperature():
    # T = 2 flattens [ln .7, ln .2, ln .1] to weights sqrt(.7), sqrt(.2), sqrt(.1) = .837, .447, .316
    # (sum 1.600): the best token holds 0.523 of the mass, so top_p = 0.6 needs two tokens,
    # while at T = 1 the best one (0.7) is enough.
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    assert np.isfinite(process_logits(logits, params(top_p=0.6, temperature=1.0), [])).sum() == 1
    assert np.isfinite(process_logits(logits, params(top_p=0.6, temperature=2.0), [])).sum() == 2


def test_penalties_follow_openai_formula():
    logits = np.array([0.5, 1.0, -0.25, 2.0, 0.0])
    prev = [1, 1, 1, 3]
    s = process_logits(logits, params(frequency_penalty=0.5, presence_penalty=0.25), prev)
    # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence, with c = [0, 3, 0, 1, 0]
    assert s.tolist() == [0.5, 1.0 - 3 * 0.5 - 0.25, -0.25, 2.0 - 0.5 - 0.25, 0.0]
    # Penalties come before the temperature.
    s2 = process_logits(logits, params(temperature=2.0, presence_penalty=1.0), prev)
    assert s2.tolist() == [0.25, 0.0, -0.125, 0.5, 0.0]
    # Negative penalties encourage repetition.
    s3 = process_logits(logits, params(frequency_penalty=-1.0), prev)
    assert s3.tolist() == [0.5, 4.0, -0.25, 3.0, 0.0]
    # No history, no penalty.
    assert np.array_equal(process_logits(logits, params(frequency_penalty=2.0, presence_penalty=2.0), []), logits)
    with pytest.raises(ValueError):
        process_logits(logits, params(presence_penalty=1.0), [5])


def test_process_logits_does_not_modify_its_input_and_rejects_nan():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    before = logits.copy()
    out = process_logits(logits, params(temperature=0.5, top_k=1, frequency_penalty=1.0), [2])
    assert out.dtype == np.float64
    assert np.array_equal(logits, before)
    with pytest.raises(ValueError):
        process_logits(np.array([0.0, np.nan]), params(), [])
    with pytest.raises(ValueError):
        process_logits(np.array([0.0, np.inf]), params(), [])
    with pytest.raises(ValueError):
        process_logits(np.array([-np.inf, -np.inf]), params(), [])
    # A masked (-inf) logit is allowed and never sampled.
    masked = np.array([5.0, -np.inf, 5.0])
    assert 1 not in draw(masked, params(temperature=2.0, top_p=0.9), 50)


# ---------------------------------------------------------------- decision scores and margins


def test_decision_scores_and_margin_explain_the_choice():
    logits = np.random.default_rng(2).standard_normal(50)
    p = params(temperature=0.7, seed=3, top_k=10)
    scores = decision_scores(logits, p, RH, 4, [7])
    expected = process_logits(logits, p, [7]) + gumbel_noise(3, RH, 4, 50)
    assert np.array_equal(scores, expected)
    assert np.isneginf(scores).sum() == 40
    tok = sample_token(logits, p, RH, 4, [7])
    assert tok == int(np.argmax(scores))
    assert token_margin(scores, tok) > 0
    assert all(token_margin(scores, t) < 0 for t in range(50) if t != tok)
    masked = int(np.flatnonzero(np.isneginf(scores))[0])
    assert token_margin(scores, masked) == -np.inf


def test_token_margin_by_hand():
    s = np.array([1.0, 3.0, 2.0, -np.inf])
    assert token_margin(s, 1) == 1.0
    assert token_margin(s, 0) == -2.0
    assert token_margin(s, 2) == -1.0
    assert token_margin(np.array([2.0, 2.0]), 1) == 0.0
    assert token_margin(np.array([4.0]), 0) == math.inf
    with pytest.raises(ValueError):
        token_margin(s, 4)
    with pytest.raises(ValueError):
        token_margin(s, -1)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "bad",
    [{"temperature": -0.1}, {"temperature": 2.5}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.01},
     {"top_k": -1}, {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"max_tokens": 0}, {"seed": -1},
     {"seed": 2**64}, {"seed": 1.5}, {"stop": ("a", "b", "c", "d", "e")}, {"stop": ("",)},
     {"stop_token_ids": (-1,)}, {"unknown": 1}],
)
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**{"seed": 0, **bad})


def test_seed_is_required_and_params_are_frozen():
    with pytest.raises(ValidationError):
        SamplingParams()
    p = params()
    with pytest.raises(ValidationError):
        p.temperature = 0.5  # type: ignore[misc]
    edge = SamplingParams(seed=2**64 - 1, temperature=2, top_p=1, stop=("a", "b", "c", "d"), stop_token_ids=[0, 2])
    assert edge.stop_token_ids == (0, 2)


def test_canonical_dict_is_plain_json_with_every_field():
    p = SamplingParams(seed=7, temperature=1, stop=["x", "yz"], stop_token_ids=[3])
    d = p.to_canonical_dict()
    # grammar is hashed only when set: unconstrained requests hash as they did before grammars
    assert set(d) == set(SamplingParams.model_fields) - {"grammar"}
    assert set(p.model_copy(update={"grammar": "g"}).to_canonical_dict()) == set(SamplingParams.model_fields)
    assert d["stop"] == ["x", "yz"] and d["stop_token_ids"] == [3]
    assert type(d["temperature"]) is float and type(d["seed"]) is int
    assert json.loads(json.dumps(d)) == d
    assert SamplingParams(**d) == p
    assert d != params(seed=8).to_canonical_dict()


def test_skipping_the_noise_of_tokens_that_cannot_win_never_changes_the_draw():
    """decision_scores computes Gumbel noise only for tokens within the noise's range of the
    best score; the draw must equal the one with the full noise vector, and every token's lead
    must keep its sign (margins of winners may shrink, never the verdict)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        vocab = int(rng.integers(2, 3000))
        spread = float(rng.choice([0.5, 5.0, 30.0]))
        logits = (rng.standard_normal(vocab) * spread).astype(np.float32)
        params = SamplingParams(temperature=float(rng.choice([0.05, 0.3, 1.0, 2.0])), seed=trial, top_p=float(rng.choice([1.0, 0.9])))
        full = process_logits(logits, params, []) + gumbel_noise(params.seed, RH, trial, vocab)
        fast = decision_scores(logits, params, RH, trial, [])
        assert int(np.argmax(fast)) == int(np.argmax(full))
        winner = int(np.argmax(full))
        loser = int(rng.integers(vocab))
        if loser != winner and np.isfinite(full[loser]):
            exact = decision_scores(logits, params, RH, trial, [], exact_ids=(loser,))
            assert token_margin(exact, loser) == token_margin(full, loser) < 0
        assert token_margin(fast, winner) > 0 or token_margin(full, winner) == 0


def _reference_top_p(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Step 4 exactly as the module docstring states it: rank every kept id (stable sort), sum the
    weights left to right, keep the smallest prefix reaching p * total."""
    scores = process_logits(logits, params.model_copy(update={"top_p": 1.0}), [])
    candidates = np.flatnonzero(scores > -np.inf)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    cumulative = np.cumsum(np.exp(scores[order] - scores[order][0]))
    n_keep = min(int(np.searchsorted(cumulative, params.top_p * cumulative[-1], side="left")) + 1, order.size)
    scores[order[n_keep:]] = -np.inf
    return scores


def test_the_fast_nucleus_is_bit_for_bit_the_docstrings():
    """The served top-p sorts only the scores near the best; the verifier's reference ranks
    them all. Same kept set, same floats, on logits of every shape: wide and narrow, with ties,
    quantized to few values, with masked tokens, after top-k."""
    rng = np.random.default_rng(7)
    for trial in range(400):
        vocab = int(rng.choice([5, 300, 4096, 49152]))
        spread = float(rng.choice([0.01, 1.0, 5.0, 30.0]))
        logits = rng.normal(0, spread, vocab)
        if trial % 3 == 0:
            logits = np.round(logits * 4) / 4  # many exact ties
        if trial % 5 == 0:
            logits[rng.integers(0, vocab, vocab // 3)] = -np.inf
        logits = logits.astype(np.float32)
        p = params(temperature=float(rng.choice([0.05, 0.5, 1.0, 2.0])), top_p=float(rng.choice([0.05, 0.5, 0.9, 0.99, 0.999999])),
                   top_k=int(rng.choice([0, 0, 3, 50])))
        np.testing.assert_array_equal(process_logits(logits, p, []), _reference_top_p(logits, p), err_msg=f"trial {trial}")


def test_the_greedy_shortcut_is_the_full_draw():
    """sample_token skips the float64 copy for plain greedy: same token as argmax of
    decision_scores, same errors, on rows with ties, -inf, NaN and +inf."""
    rng = np.random.default_rng(11)
    for trial in range(200):
        row = np.round(rng.normal(0, 3, int(rng.choice([2, 50, 49152]))) * 2) / 2
        row[rng.integers(0, row.size, 2)] = -np.inf
        row = row.astype(np.float32)
        if not np.isfinite(row).any():
            continue  # the error case, below
        p = params(temperature=0.0, top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.3])))
        assert sample_token(row, p, b"h", trial, [1]) == int(np.argmax(decision_scores(row, p, b"h", trial, [1])))
    for bad in ([np.nan, 1.0], [np.inf, 1.0], [-np.inf, -np.inf]):
        with pytest.raises(ValueError):
            sample_token(np.array(bad, dtype=np.float32), params(temperature=0.0), b"h", 0, [])


def test_the_served_top_p_draw_is_the_reference_draw():
    """sample_token decides top-p without ranking the vocabulary (``_draw_within_nucleus``): the
    token must be argmax(decision_scores) on rows of every shape, with penalties, grammar masks,
    top-k and ties, and a decision on the nucleus's edge must go to the reference."""
    rng = np.random.default_rng(23)
    decided = handed_over = 0
    for trial in range(300):
        vocab = int(rng.choice([3, 300, 4096, 49152]))
        logits = rng.normal(0, float(rng.choice([0.01, 1.0, 5.0, 30.0])), vocab)
        if trial % 3 == 0:
            logits = np.round(logits * 4) / 4  # many exact ties
        logits = logits.astype(np.float32)
        mask = rng.random(vocab) < 0.7 if trial % 4 == 0 else None
        if mask is not None:
            mask[int(np.argmax(logits))] = True
        p = params(seed=trial, temperature=float(rng.choice([0.05, 0.5, 1.0, 2.0])),
                   top_p=float(rng.choice([0.05, 0.5, 0.9, 0.99, 0.999999])), top_k=int(rng.choice([0, 0, 3, 50])),
                   frequency_penalty=float(rng.choice([0.0, 0.5])))
        previous = [int(i) for i in rng.integers(0, vocab, 5)]
        expected = int(np.argmax(decision_scores(logits, p, RH, trial, previous, allowed=mask)))
        assert sample_token(logits, p, RH, trial, previous, mask) == expected, f"trial {trial}"
    # Four equal weights with p = 1/2: the line p * 4 = 2 falls exactly on the sum before the
    # third token, so only the left-to-right sums may decide it (ties rank by id: 0 and 1 are in).
    edge = np.zeros(4, dtype=np.float32)
    for step in range(400):
        p = params(seed=step, temperature=1.0, top_p=0.5)
        token = _draw_within_nucleus(process_logits(edge, p.model_copy(update={"top_p": 1.0}), []), p, RH, step)
        decided += token is not None
        handed_over += token is None
        assert token in (None, 0, 1)
        assert sample_token(edge, p, RH, step, []) == int(np.argmax(decision_scores(edge, p, RH, step, []))) in (0, 1)
    assert decided and handed_over  # both ways were taken
