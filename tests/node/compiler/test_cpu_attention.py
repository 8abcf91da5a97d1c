"""Our CPU attention kernels (ragged and paged prefill, paged decode) give TVM's own kernels' results (output and log2-sum-exp)
on ragged batches, causal and not, including a sequence with no cached keys."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

from node.compiler.cpu_attention import KV_PAGE_SIZE as P
from node.compiler.cpu_attention import paged_decode_attention_cpu, paged_prefill_attention_cpu, ragged_prefill_attention_cpu

H_KV, H_Q, D = 2, 6, 16


def tensors(*arrays):
    return [tvm.runtime.tensor(np.asarray(a), tvm.cpu()) for a in arrays]


def indptr(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def run_ragged(kernel, lengths, causal):
    rng = np.random.default_rng(0)
    n = sum(lengths)
    q, k, v = (rng.standard_normal((n, h, D)).astype(np.float32) for h in (H_Q, H_KV, H_KV))
    out, lse = tensors(np.zeros((n, H_Q, D), np.float32), np.zeros((n, H_Q), np.float32))
    zeros = np.zeros
    kernel(*tensors(q, indptr(lengths), k, v, indptr(lengths), zeros(n, np.int32), zeros(len(lengths), np.int32)), out, lse,
           causal, 0, 1.0, 10000.0, 0.25)
    return out.numpy(), lse.numpy()


def paged_cache(rng, kv_lengths, max_pages=16):
    """Random pages, a shuffled page table for sequences of ``kv_lengths`` keys, page indptr and
    each sequence's last-page length: the cache layout both paged kernels read."""
    pages = rng.standard_normal((max_pages, 2, H_KV, P, D)).astype(np.float32)
    n_pages = [-(-n // P) for n in kv_lengths]
    table = rng.permutation(max_pages)[: sum(n_pages)].astype(np.int32)
    last_page_len = np.array([n - (p - 1) * P if n else 0 for n, p in zip(kv_lengths, n_pages)], np.int32)
    return pages, indptr(n_pages), table, last_page_len


def run_paged(kernel, kv_lengths, q_lengths, causal):
    rng = np.random.default_rng(1)
    pages, page_indptr, table, last_page_len = paged_cache(rng, kv_lengths)
    n_q = sum(q_lengths)
    q = rng.standard_normal((n_q, H_Q, D)).astype(np.float32)
    out, lse = tensors(np.zeros((n_q, H_Q, D), np.float32), np.zeros((n_q, H_Q), np.float32))
    kernel(*tensors(q, indptr(q_lengths), pages, page_indptr, table, last_page_len, np.zeros(len(kv_lengths), np.int32),
                    np.zeros(n_q, np.int32)), out, lse, causal, 0, 1.0, 10000.0, 0.25)
    return out.numpy(), lse.numpy()


@pytest.fixture(scope="module")
def kernels(cpu):
    build = lambda f: tvm.compile(f, target=cpu.target)  # noqa: E731
    return {
        "ragged": (build(_attention_prefill_ragged_cpu(H_KV, H_Q, D, D, "float32", {})),
                   build(ragged_prefill_attention_cpu(H_KV, H_Q, D, D, "float32"))),
        "paged": (build(_attention_prefill_cpu(H_KV, H_Q, D, "float32", False, {})),
                  build(paged_prefill_attention_cpu(H_KV, H_Q, D, "float32"))),
    }


@pytest.mark.parametrize("causal", [1, 0])
def test_ragged_kernel_matches_tvm(kernels, causal):
    theirs, ours = kernels["ragged"]
    for lengths in ([1], [5, 7], [33, 2, 17]):
        for a, b in zip(run_ragged(theirs, lengths, causal), run_ragged(ours, lengths, causal)):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-6)


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_kernel_matches_tvm(kernels, causal):
    theirs, ours = kernels["paged"]
    for kv, q in (([20, 5], [3, 5]), ([0, 33], [4, 2]), ([16], [16]), ([47], [1])):
        for a, b in zip(run_paged(theirs, kv, q, causal), run_paged(ours, kv, q, causal)):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-6)


def run_decode(kernel, kv_lengths):
    rng = np.random.default_rng(2)
    pages, page_indptr, table, last_page_len = paged_cache(rng, kv_lengths)
    b = len(kv_lengths)
    q = rng.standard_normal((b, H_Q, D)).astype(np.float32)
    out, lse = tensors(np.zeros((b, H_Q, D), np.float32), np.zeros((b, H_Q), np.float32))
    kernel(*tensors(q, pages, page_indptr, table, last_page_len, np.zeros(b, np.int32), np.zeros(b, np.int32)), out, lse,
           0, 1.0, 10000.0, 0.25)
    return out.numpy(), lse.numpy()


def test_decode_kernel_matches_tvm(cpu):
    theirs = tvm.compile(_attention_decode_cpu(H_KV, H_Q, D, "float32", False, {}), target=cpu.target)
    ours = tvm.compile(paged_decode_attention_cpu(H_KV, H_Q, D, "float32"), target=cpu.target)
    for kv in ([1], [20, 5], [0, 33, 16], [47, 1, 2, 100]):
        for a, b in zip(run_decode(theirs, kv), run_decode(ours, kv)):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-6)
