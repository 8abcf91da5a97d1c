"""The cheat suite on a tiny model: every dishonest node in bench/cheats.py is flagged as fraud,
and honest answers from the same machinery pass (so the suite cannot pass by flagging all)."""

from __future__ import annotations

import random

import pytest

from bench.cheats import CHEATS, SAMPLING_CHEATS, CheatContext
from bench.harness import Generator, request_mix
from node.loaded_model import load_model
from node.runtime import CacheLimits
from tests.models_fixtures import make_tiny_hf_checkpoint
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
    return request_mix(ctx.model.tokenizer, count, seed=hash(name) % 1000, temperatures=temperatures, lengths=(32,), extras=False)


def test_honest_answers_from_the_same_machinery_pass(ctx):
    answers = Generator.of(ctx.model).answers(requests_for(ctx, "honest", 16), ctx.key, concurrency=8)
    verdicts = [verify_answer(a, ctx.model) for a in answers]
    assert [v.verdict for v in verdicts] == ["pass"] * 16, [v for v in verdicts if v.verdict != "pass"]


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_every_cheat_is_flagged(ctx, name):
    answers = CHEATS[name](ctx, requests_for(ctx, name))
    verdicts = [verify_answer(a, ctx.model) for a in answers]
    missed = [(a.evidence.output_ids, v) for a, v in zip(answers, verdicts) if v.verdict != "fraud"]
    assert not missed, missed
