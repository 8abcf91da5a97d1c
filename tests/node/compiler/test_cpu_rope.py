"""Our CPU RoPE kernel (``node.compiler.cpu_rope``) gives TVM's own ``fused_rope`` results bit for
bit (so swapping it in moves no logit), with RoPE applied and not, for the default frequency
scheme (the only one swapped), head dims 32 and 64, partial rotary dims, one token and many, far
positions included."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from node.compiler.cpu_rope import fused_rope_cpu

H_Q, H_KV = 4, 2


def run(kernel, qkv, positions, apply_rope):
    n, D = qkv.shape[0], qkv.shape[2]
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.full((n, h, D), np.nan, np.float32), dev) for h in (H_Q, H_KV, H_KV)]
    kernel(tvm.runtime.tensor(qkv, dev), tvm.runtime.tensor(positions, dev), *outs, apply_rope)
    return [o.numpy().view(np.uint32) for o in outs]


@pytest.mark.parametrize("theta, D, rotary_dim", [(100000.0, 64, 64), (10000.0, 32, 32), (10000.0, 32, 16)])
def test_rope_kernel_is_tvms_bit_for_bit(cpu, theta, D, rotary_dim):
    build = lambda f: tvm.compile(f.with_attr("global_symbol", "main"), target=cpu.target)["main"]  # noqa: E731
    ours = build(fused_rope_cpu(theta, 1.0, D, H_Q, H_KV, "float32", {}, rotary_dim))
    tvms = build(llama_rope_with_position_map(theta, 1.0, D, H_Q, H_KV, "float32", {}, rotary_dim))
    rng = np.random.default_rng(5)
    for n in (1, 7, 300):
        qkv = (rng.standard_normal((n, H_Q + 2 * H_KV, D)) * 4).astype(np.float32)
        positions = rng.integers(0, 100_000, n).astype(np.int32)
        for apply_rope in (1, 0):
            for a, b in zip(run(ours, qkv, positions, apply_rope), run(tvms, qkv, positions, apply_rope)):
                np.testing.assert_array_equal(a, b)
