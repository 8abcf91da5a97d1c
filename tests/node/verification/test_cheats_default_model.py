"""The subtle cheats on the real default model: weights rounded to fp16 or int8 or requantized
to Q4_0, a skipped layer, and a cheaper model's decode with the real model's fingerprints are
flagged in every answer (``python -m bench.bench_cheats`` measures rates over many answers).

Marked slow (each cheat builds a 135M-parameter runtime) but part of the default suite."""

from __future__ import annotations

import random

import pytest

from tests.node.verification.cheats import CHEATS, CheatContext, cheap_generator, skip_layers
from tests.node.verification.harness import request_mix
from node.runtime import model_store
from verify.identity import NodeKey
from verify.verifier import verify_answer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ctx(default_model) -> CheatContext:
    model = default_model
    root = model_store.store_root()
    layers = model.config.num_hidden_layers
    cheap = cheap_generator(model, skip_layers(*range(1, layers, 2)), root)  # every other layer
    return CheatContext(model=model, key=NodeKey.generate(), root=root, cheap=cheap, rng=random.Random(1))


@pytest.mark.parametrize("name", ["fp16-weights", "int8-weights", "q4_0-weights", "skipped-layer", "cheap-decode-real-fingerprints"])
def test_subtle_cheats_are_flagged_on_the_default_model(ctx, name):
    requests = request_mix(ctx.model.tokenizer, 4, seed=3, temperatures=(0.0, 0.7), lengths=(32,), extras=False)
    verdicts = [verify_answer(a, ctx.model) for a in CHEATS[name](ctx, requests)]
    assert [v.verdict for v in verdicts] == ["fraud"] * 4, verdicts
