"""Fingerprints (``verify.evidence.top_k_fingerprint``): the committed top-k of a row of logits,
ordered and tied as the protocol defines, at float32 precision, the same whichever window finds it.

Expected values are computed by hand or by independent code here (never copied from a run).
"""

from __future__ import annotations

import numpy as np
import pytest

from verify.evidence import FINGERPRINT_K, top_k_fingerprint


def test_fingerprint_order_and_ties():
    logits = np.array([0.0, 5.0, 2.0, 5.0, -1.0, 2.0], dtype=np.float32)
    ids, vals = top_k_fingerprint(logits, 4)
    assert ids == [1, 3, 2, 5] and vals == [5.0, 5.0, 2.0, 2.0]
    assert top_k_fingerprint(logits, 3) == ([1, 3, 2], [5.0, 5.0, 2.0])  # the tie at the cut: lower id
    assert top_k_fingerprint(logits, 10)[0] == [1, 3, 2, 5, 0, 4]
    assert top_k_fingerprint(logits, 0) == ([], [])


def test_fingerprint_matches_a_full_sort_and_is_float32():
    rng = np.random.default_rng(3)
    logits = np.round(rng.standard_normal(5000) * 4) / 4  # many exact ties
    ids, vals = top_k_fingerprint(logits)
    ref = sorted(range(logits.size), key=lambda i: (-np.float32(logits[i]), i))[:FINGERPRINT_K]
    assert ids == ref
    assert vals == [float(np.float32(logits[i])) for i in ref]
    x = np.array([0.1, 0.2])  # float64 input: values committed at float32 precision
    assert top_k_fingerprint(x, 2)[1] == [float(np.float32(0.2)), float(np.float32(0.1))]
    with pytest.raises(ValueError):
        top_k_fingerprint(np.array([np.nan, 1.0]))


@pytest.mark.parametrize("spread", [0.01, 1.0, 8.0, 100.0])  # all in the first window ... only the full row
def test_fingerprint_windows_never_change_the_answer(spread):
    rng = np.random.default_rng(int(spread * 100))
    for trial in range(50):
        logits = (rng.standard_normal(int(rng.choice([9, 300, 49152]))) * spread).astype(np.float32)
        if trial % 2:
            logits = np.round(logits)  # exact ties, also at the cut
        logits[rng.integers(0, logits.size, 3)] = -np.inf
        order = np.lexsort((np.arange(logits.size), -logits))[:FINGERPRINT_K]  # (-logit, id)
        assert top_k_fingerprint(logits) == ([int(i) for i in order], [float(logits[i]) for i in order])
