"""The compiled model against the independent numpy reference, on tiny random checkpoints.

prefill logits, decode after prefill, chunked prefill, batched decode of sequences of
different lengths, Qwen2-style qkv bias, tied embeddings, and GGUF block quantizations.
"""

from __future__ import annotations

import numpy as np
import pytest

from node.models.llama.load import load_checkpoint
from node.models.llama.reference import NumpyLlama
from node.errors import ContextLengthError
from node.runtime.model_runtime import CacheLimits
from tests.conftest import make_runtime
from tests.models_fixtures import make_tiny_gguf, make_tiny_hf_checkpoint

FP32_RTOL = 1e-4  # the bar for fp32 against the float64 reference


def max_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest |got - ref| relative to the scale of the reference logits at that position."""
    scale = np.max(np.abs(ref), axis=-1, keepdims=True)
    return float(np.max(np.abs(got - ref) / scale))


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, n)]


def check_against_reference(ckpt, runtime, record_property, label: str) -> None:
    ids = random_ids(40, ckpt.config.vocab_size, seed=1)
    ref = NumpyLlama.from_checkpoint(ckpt).logits(ids)
    got = runtime.score(ids)
    err = max_rel_error(got, ref)
    record_property(f"max_rel_error_{label}", err)
    print(f"{label}: max relative error vs numpy float64 = {err:.2e}")
    assert got.shape == ref.shape
    assert err < FP32_RTOL


def test_prefill_matches_numpy_reference(tiny_ckpt, tiny_runtime, record_property):
    check_against_reference(tiny_ckpt, tiny_runtime, record_property, "untied")


@pytest.mark.parametrize("variant", ["tied_qkv_bias", "bf16_gqa_8_to_1"])
def test_variants_match_reference(variant, tmp_path, store, cpu, record_property):
    if variant == "tied_qkv_bias":
        folder = make_tiny_hf_checkpoint(tmp_path, tie=True, qkv_bias=True, n_layers=3, rope_theta=500000.0)
    else:
        folder = make_tiny_hf_checkpoint(tmp_path, dtype="bfloat16", heads=8, kv_heads=1, hidden=128, intermediate=256)
    ckpt = load_checkpoint(folder)
    check_against_reference(ckpt, make_runtime(ckpt, store, cpu), record_property, variant)


def test_decode_after_prefill_equals_longer_prefill(tiny_ckpt, tiny_runtime):
    rt = tiny_runtime
    ids = random_ids(24, tiny_ckpt.config.vocab_size, seed=2)
    full = rt.score(ids)
    rt.add_sequence(7)
    try:
        last = rt.prefill(7, ids[:16])[-1]
        np.testing.assert_allclose(last, full[15], rtol=0, atol=1e-5)
        for t in range(16, 24):
            row = rt.decode([7], [ids[t]])[0]
            np.testing.assert_allclose(row, full[t], rtol=0, atol=1e-5)
        assert rt.sequence_length(7) == 24
    finally:
        rt.remove_sequence(7)


def test_chunked_prefill_equals_single_pass(tiny_ckpt, tiny_runtime):
    """Prompts longer than the prefill chunk (64 here) are fed in pieces with the same result."""
    ids = random_ids(150, tiny_ckpt.config.vocab_size, seed=3)
    ref = NumpyLlama.from_checkpoint(tiny_ckpt).logits(ids)
    got = tiny_runtime.score(ids)
    assert max_rel_error(got, ref) < FP32_RTOL


def test_batched_decode_of_unequal_lengths_matches_alone(tiny_ckpt, tiny_runtime):
    rt = tiny_runtime
    vocab = tiny_ckpt.config.vocab_size
    prompts = {10: random_ids(5, vocab, 10), 11: random_ids(17, vocab, 11), 12: random_ids(33, vocab, 12)}

    def greedy_alone(seq, prompt, steps=6):
        rt.add_sequence(seq)
        tok, out = int(np.argmax(rt.prefill(seq, prompt)[-1])), []
        for _ in range(steps):
            out.append(tok)
            tok = int(np.argmax(rt.decode([seq], [tok])[0]))
        rt.remove_sequence(seq)
        return out

    alone = {s: greedy_alone(s, p) for s, p in prompts.items()}
    toks = {}
    for s, p in prompts.items():
        rt.add_sequence(s)
        toks[s] = int(np.argmax(rt.prefill(s, p)[-1]))
    together = {s: [] for s in prompts}
    for _ in range(6):
        seqs = list(prompts)
        for s in seqs:
            together[s].append(toks[s])
        rows = rt.decode(seqs, [toks[s] for s in seqs])
        toks = {s: int(np.argmax(r)) for s, r in zip(seqs, rows)}
    for s in prompts:
        rt.remove_sequence(s)
    assert together == alone


@pytest.mark.parametrize("quant_types", [("F32",), ("Q8_0", "Q4_0", "Q4_1", "F16")])
def test_gguf_model_matches_reference(quant_types, tmp_path, store, cpu, record_property):
    """A GGUF written with gguf's writer, loaded back, compiled, against the reference of the
    weights it was written from (after the same quantization round trip)."""
    tiny = make_tiny_gguf(tmp_path / "tiny.gguf", quant_types=quant_types, hidden=64, intermediate=128)
    ckpt = load_checkpoint(tiny.path)
    for name, w in tiny.weights.items():
        np.testing.assert_array_equal(ckpt.weights[name], w)
    ids = random_ids(30, ckpt.config.vocab_size, seed=4)
    ref = NumpyLlama(ckpt.config, tiny.weights).logits(ids)
    got = make_runtime(ckpt, store, cpu).score(ids)
    err = max_rel_error(got, ref)
    record_property("max_rel_error_gguf_" + "_".join(quant_types), err)
    assert err < FP32_RTOL


def test_full_cache_is_refused_not_crashed(tiny_ckpt, store, cpu):
    from node.errors import RuntimeFault

    rt = make_runtime(tiny_ckpt, store, cpu, CacheLimits(max_batch_size=2, max_total_tokens=64, prefill_chunk=64))
    rt.add_sequence(1)
    rt.add_sequence(2)
    with pytest.raises(RuntimeFault):
        rt.add_sequence(3)
    with pytest.raises(RuntimeFault):
        rt.decode([1], [10**6])  # token id out of range


def test_score_from_a_position_equals_the_tail_of_a_full_score(tiny_ckpt, tiny_runtime):
    ids = random_ids(150, tiny_ckpt.config.vocab_size, seed=4)  # > prefill_chunk: spans chunks
    full = tiny_runtime.score(ids)
    for start in (0, 63, 64, 100, 149):
        np.testing.assert_allclose(tiny_runtime.score(ids, start), full[start:], rtol=0, atol=1e-5)


def test_score_refuses_more_tokens_than_the_cache_has_free(tiny_ckpt, tiny_runtime):
    too_long = random_ids(tiny_runtime.kv_capacity + 1, tiny_ckpt.config.vocab_size, seed=5)
    with pytest.raises(ContextLengthError, match="KV slots"):
        tiny_runtime.score(too_long)
    assert tiny_runtime.live_sequences == 0
