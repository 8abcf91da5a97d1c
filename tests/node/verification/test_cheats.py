"""The cheat suite on a tiny model: every dishonest node in tests/node/verification/cheats.py is
flagged as fraud, and honest answers from the same machinery pass (so the suite cannot pass by flagging all)."""

from __future__ import annotations

import random
import zlib

import pytest

from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.verification.cheats import CHEATS, EXPECTED, SAMPLING_CHEATS, CheatContext, honest_constrained_answers
from tests.node.verification.harness import Generator, request_mix
from verify.fraud import FraudProof, check_fraud_proof, make_fraud_proof, sign_verdict
from verify.identity import NodeKey
from verify.verifier import verify_answer

LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=4096, prefill_chunk=64)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, store) -> CheatContext:
    root = tmp_path_factory.mktemp("cheats")
    ours = load_model(str(make_tiny_hf_checkpoint(root / "ours", seed=0)), device="cpu", limits=LIMITS, root=store)
    other = load_model(str(make_tiny_hf_checkpoint(root / "other", seed=1)), device="cpu", limits=LIMITS, root=store)
    cheap = Generator(other.runtime, other.tokenizer, ours.model_id, ours.backend, ours.max_context)
    return CheatContext(model=ours, key=NodeKey.generate(), root=store, cheap=cheap, rng=random.Random(0))


def requests_for(ctx: CheatContext, name: str, count: int = 8):
    temperatures = (0.7, 1.0, 1.5) if name in SAMPLING_CHEATS else (0.0, 0.7, 1.0)
    # zlib.crc32, not hash(): str hashes change with every process, and so would the requests
    # (a cheap model that happens to open with the end-of-sequence token matches honest work).
    return request_mix(ctx.model.tokenizer, count, seed=zlib.crc32(name.encode()) % 1000, temperatures=temperatures,
                       lengths=(32,), extras=False)


def test_honest_answers_from_the_same_machinery_pass(ctx):
    answers = Generator.of(ctx.model).answers(requests_for(ctx, "honest", 16), ctx.key, concurrency=8)
    verdicts = [verify_answer(a, ctx.model) for a in answers]
    assert [v.verdict for v in verdicts] == ["pass"] * 16, [v for v in verdicts if v.verdict != "pass"]


def test_honest_constrained_answers_pass(ctx):
    """The control of the grammar cheat: structured answers drawn under their masks pass."""
    answers = honest_constrained_answers(ctx, requests_for(ctx, "honest-constrained", 8))
    assert all(a.evidence.sampling.grammar is not None for a in answers)
    verdicts = [verify_answer(a, ctx.model) for a in answers]
    assert [v.verdict for v in verdicts] == ["pass"] * 8, [v for v in verdicts if v.verdict != "pass"]


# fp16 rounding moves this 64-wide random model's logits by ~1e-3, inside the calibrated tau
# (2e-3); on the real model it is ~1.6e-2, and test_cheats_default_model.py checks it there.
TINY_UNDETECTABLE = {"fp16-weights"}


@pytest.mark.parametrize("name", sorted(set(CHEATS) - TINY_UNDETECTABLE))
def test_every_cheat_is_flagged(ctx, name):
    answers = CHEATS[name](ctx, requests_for(ctx, name))
    verdicts = [verify_answer(a, ctx.model) for a in answers]
    missed = [(a.evidence.output_ids, v) for a, v in zip(answers, verdicts) if v.verdict != EXPECTED.get(name, "fraud")]
    assert not missed, missed


def test_fraud_proofs_are_rechecked_from_scratch(ctx):
    verifier_key = NodeKey.generate()
    cheat = CHEATS["edited-token"](ctx, requests_for(ctx, "edited-token", 1))[0]
    proof = make_fraud_proof(cheat, verify_answer(cheat, ctx.model), verifier_key)
    again = FraudProof.model_validate_json(proof.model_dump_json())  # travels as JSON
    check = check_fraud_proof(again, ctx.model)
    assert check.upheld and check.reasons == ["sampling check failed"]

    # An honest answer framed with a signed "fraud" verdict: the re-check clears the node.
    honest = Generator.of(ctx.model).answers(requests_for(ctx, "honest", 1), ctx.key)[0]
    fake = verify_answer(honest, ctx.model).model_copy(update={"verdict": "fraud", "reasons": ["made up"]})
    framed = FraudProof(answer=honest, verdict=sign_verdict(fake, verifier_key))
    assert not check_fraud_proof(framed, ctx.model).upheld

    # A verdict altered after signing, or a "proof" over an answer the node never signed.
    altered = proof.model_copy(update={"verdict": proof.verdict.model_copy(update={"verdict": proof.verdict.verdict.model_copy(update={"failures": []})})})
    assert "signature" in check_fraud_proof(altered, ctx.model).reasons[0]
    # A truncated answer re-signed as complete: the finish rules convict it, without model doubt.
    truncated = CHEATS["truncated-resigned"](ctx, requests_for(ctx, "truncated-resigned", 1))[0]
    assert check_fraud_proof(make_fraud_proof(truncated, verify_answer(truncated, ctx.model), verifier_key), ctx.model).upheld
    # Framing: a "proof" over an answer the node never signed, and an honest receipt with one
    # output id altered in its evidence, each under a fraud verdict from a fresh key.
    unsigned = CHEATS["forged-receipt"](ctx, requests_for(ctx, "forged-receipt", 1))[0]
    ev = honest.evidence
    altered_evidence = honest.model_copy(update={"evidence": ev.model_copy(update={"output_ids": [*ev.output_ids[:-1], 7]})})
    for answer in (unsigned, altered_evidence):
        assert verify_answer(answer, ctx.model).verdict == "unattributable"
        lie = verify_answer(answer, ctx.model).model_copy(update={"verdict": "fraud"})
        framing = FraudProof(answer=answer, verdict=sign_verdict(lie, NodeKey.generate()))
        check = check_fraud_proof(framing, ctx.model)
        assert not check.upheld and "no evidence against the accused node" in check.reasons[0]
    with pytest.raises(ValueError):
        make_fraud_proof(honest, verify_answer(honest, ctx.model), verifier_key)
