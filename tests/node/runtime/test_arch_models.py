"""Qwen3 and Gemma 3 compiled for the CPU against their float64 numpy references, on tiny random
checkpoints from both sources (one library per architecture, shared by the module's tests).

Gemma 3's tiny config has a 24-token sliding window and 16-token prefill chunks, so 60-token
sequences cross the window in prefill, in decode and in batches of sequences at different offsets;
one test checks that the window is what makes the reference agree (ignoring it moves the logits
far beyond the tolerance).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from node.compiler.build import compile_model
from node.compiler.targets import cuda_target_for_arch
from node.errors import ConfigError
from node.models import architectures
from node.models.llama.load import load_checkpoint
from node.models.llama.model import fuse_hf_weights
from node.runtime.model_runtime import CacheLimits, ModelRuntime
from tests.models_fixtures import (
    TINY_GEMMA3_WINDOW,
    make_tiny_arch_gguf,
    make_tiny_arch_hf_checkpoint,
    tiny_gemma3_config,
    tiny_qwen3_config,
)

ABS_TOL = 1e-4  # fp32 against the float64 reference (measured: ~1e-5)
LIMITS = CacheLimits(max_batch_size=4, max_total_tokens=512, prefill_chunk=16)
N_TOKENS = 60


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, n)]


class Arch:
    """One architecture's tiny checkpoints (HF folder and Q8_0 GGUF), library and references."""

    def __init__(self, cfg, tmp, store, cpu):
        folder, _ = make_tiny_arch_hf_checkpoint(tmp / "hf", cfg)
        self.ckpts = {"hf": load_checkpoint(folder),
                      "gguf": load_checkpoint(make_tiny_arch_gguf(tmp / "m.gguf", cfg, quant_types=("Q8_0", "F32")).path)}
        self.cfg, self.cpu = cfg, cpu
        self.library = compile_model(cfg, cpu.target, store)

    def runtime(self, source: str, limits: CacheLimits = LIMITS) -> ModelRuntime:
        ckpt = self.ckpts[source]
        return ModelRuntime(self.cfg, self.library, fuse_hf_weights(self.cfg, ckpt.weights), self.cpu, limits)

    def reference(self, source: str, config=None):
        ckpt = self.ckpts[source]
        return architectures.of_config(self.cfg).reference(config or self.cfg, ckpt.weights)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, store, cpu) -> Arch:
    return Arch(tiny_qwen3_config(), tmp_path_factory.mktemp("qwen3"), store, cpu)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, store, cpu) -> Arch:
    return Arch(tiny_gemma3_config(), tmp_path_factory.mktemp("gemma3"), store, cpu)


@pytest.fixture(params=["qwen3", "gemma3"])
def arch(request) -> Arch:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_prefill_in_chunks_matches_reference(arch, source, record_property):
    ids = random_ids(N_TOKENS, arch.cfg.vocab_size, seed=1)
    ref = arch.reference(source).logits(ids)
    got = arch.runtime(source).score(ids)
    err = float(np.abs(got - ref).max())
    record_property(f"max_abs_diff_{arch.cfg.model_type}_{source}", err)
    assert got.shape == ref.shape and err < ABS_TOL


def test_decode_and_batched_decode_match_reference(arch):
    """Two sequences prefilled to 30 and 10 tokens, then decoded together to 60 and 40: each decode
    row against the reference's row at that position (sliding offsets differ within the batch)."""
    rt = arch.runtime("hf")
    ids = {0: random_ids(N_TOKENS, arch.cfg.vocab_size, seed=2), 1: random_ids(40, arch.cfg.vocab_size, seed=3)}
    ref = {s: arch.reference("hf").logits(ids[s]) for s in ids}
    start = {0: 30, 1: 10}
    for s in ids:
        rt.add_sequence(s)
        np.testing.assert_allclose(rt.prefill(s, ids[s][: start[s]])[-1], ref[s][start[s] - 1], atol=ABS_TOL, rtol=0)
    try:
        for step in range(30):
            rows = rt.decode([0, 1], [ids[0][start[0] + step], ids[1][start[1] + step]])
            for b, s in enumerate(ids):
                np.testing.assert_allclose(rows[b], ref[s][start[s] + step], atol=ABS_TOL, rtol=0,
                                           err_msg=f"sequence {s} position {start[s] + step}")
    finally:
        for s in ids:
            rt.remove_sequence(s)


def test_gemma3_sliding_window_is_what_the_model_computes(gemma3):
    """Without the window the reference differs from TVM past the window's end only, and by far more
    than the tolerance: a cache that ignored ``mha_sliding`` would fail the tests above."""
    arch = gemma3
    ids = random_ids(N_TOKENS, arch.cfg.vocab_size, seed=1)
    got = arch.runtime("hf").score(ids)
    unwindowed = arch.reference("hf", dataclasses.replace(arch.cfg, sliding_window=10**6)).logits(ids)
    diff = np.abs(got - unwindowed).max(axis=1)
    w = TINY_GEMMA3_WINDOW
    assert diff[:w].max() < ABS_TOL
    assert diff[w:].min() > 100 * ABS_TOL


def test_gemma3_refuses_prefill_chunks_longer_than_the_window(gemma3):
    with pytest.raises(ConfigError, match="sliding window"):
        gemma3.runtime("hf", dataclasses.replace(LIMITS, prefill_chunk=TINY_GEMMA3_WINDOW + 1))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM needs nvcc to build CUDA kernels")
def test_gemma3_cuda_library_compiles_without_a_gpu(tmp_path):
    """The GPU path builds (its own RoPE op, TVM's GPU sliding-window kernels); it runs where a GPU is lent."""
    assert compile_model(tiny_gemma3_config(), cuda_target_for_arch("sm_90"), tmp_path).path.exists()
