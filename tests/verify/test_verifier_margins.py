"""The sampling check at the top-k / top-p boundary, on synthetic logits: a token that honest
rounding pushed just outside the verifier's top-k keeps an eps of slack (no false fraud), while
a token clearly outside it is fraud. Real backends cannot be steered onto such a boundary, so
the backend here returns fixed logits; the verifier under test is the real one."""

from __future__ import annotations

import numpy as np

from verify.canonical import request_hash
from verify.evidence import AnswerFile, position_fingerprint, sign_answer
from verify.identity import NodeKey
from verify.sampling import SamplingParams, sample_token
from verify.verifier import Tolerances, verify_answer

MODEL_ID = "cd" * 32
KEY = NodeKey.generate()
PROMPT = [1, 2, 3]


class FixedLogits:
    """A scoring backend whose next-token logits are the same row at every position."""

    model_id = MODEL_ID
    eos_token_ids = ()

    def __init__(self, row: np.ndarray):
        self.row = row.astype(np.float32)
        self.vocab_size = row.size

    def score_blocks(self, token_ids, from_position: int = 0) -> list[np.ndarray]:
        return [np.tile(self.row, (len(token_ids) - from_position, 1))]

    def decode(self, token_ids) -> str:
        return " ".join(map(str, token_ids))


def answer(params: SamplingParams, token: int, fingerprint) -> AnswerFile:
    return sign_answer(KEY, model_id=MODEL_ID, backend="test", prompt_ids=PROMPT, output_ids=[token], params=params,
                       fingerprints=[fingerprint], finish_reason="length")


def boundary_case(delta: float):
    """Node logits where token 2 is third of the top-3 by ``delta``; a seed where it is drawn."""
    node = np.array([5.0, 5.0, 4.0 + delta, 4.0, 0, 0, 0, 0], dtype=np.float64)
    for seed in range(1000):
        params = SamplingParams(temperature=1.0, top_k=3, seed=seed, max_tokens=1)
        rh = bytes.fromhex(request_hash(MODEL_ID, PROMPT, params.to_canonical_dict()))
        if sample_token(node, params, rh, 0, []) == 2:
            return node, params
    raise AssertionError("no seed draws token 2")


def test_a_token_rounded_just_outside_top_k_passes():
    node, params = boundary_case(delta=2e-6)
    verifier_row = node.copy()
    verifier_row[2] -= 4e-6  # the verifier's rounding puts token 3 ahead of token 2
    tol = Tolerances(eps=1e-4, tau=1e-4)
    a = answer(params, 2, position_fingerprint(verifier_row.astype(np.float32), 2))
    verdict = verify_answer(a, FixedLogits(verifier_row), tol)
    assert verdict.verdict == "pass", verdict
    # The case is real: without the slack the verifier's top-3 excludes the token.
    strict = verify_answer(a, FixedLogits(verifier_row), Tolerances(eps=1e-9, tau=1e-4))
    assert strict.verdict == "fraud" and strict.failures[0].value <= -1e8


def test_a_token_clearly_outside_top_k_is_fraud():
    node, params = boundary_case(delta=2e-6)
    verifier_row = node.copy()
    verifier_row[2] -= 0.5  # far more than honest hardware differs
    a = answer(params, 2, position_fingerprint(verifier_row.astype(np.float32), 2))
    verdict = verify_answer(a, FixedLogits(verifier_row), Tolerances(eps=1e-4, tau=1.0))
    assert verdict.verdict == "fraud" and verdict.reasons == ["sampling check failed"]
    assert verdict.failures[0].value < -1e-4
