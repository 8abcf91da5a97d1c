"""A faster CPU kernel for the KV cache's ragged prefill attention (self-attention over the
tokens of the current prefill chunk).

Why: TVM's own CPU kernel (``tvm.relax.frontend.nn.llm._prefill_kernels``) runs one thread, in
scalar code, over every (query, key) pair including the causally masked ones. It dominates a
long prefill (measured: 512-token scoring at 84 tokens/s against 226 at 64 tokens), which is
exactly the verifier's workload. This kernel has the same signature and results, and:

- runs the heads in parallel (one head's queries, keys and values per thread);
- visits only the keys a causal query may see;
- vectorizes the q.k dot product as ``LANES`` partial sums (then folds them) and the
  probability-weighted sum of values along ``d``.

The paged prefill and decode kernels also come in the cache's sliding-window form (Gemma 3's
``mha_sliding`` layers: length info (3, b) with the window's offset in its first page), replacing
TVM's, whose CPU prefill gives NaN.

Supported: ``rotary_mode == 0`` only (RoPE applied before attention: the cache's NORMAL rope
mode, or NONE where the model rotates q and k itself, as Gemma 3 does); each kernel asserts it.
``lse`` is log2-based as in TVM's kernels, so the cache can merge it with paged attention.
"""

from __future__ import annotations

import math

from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _get_kv_chunk_len, _get_seq_offset
from tvm.script import tirx as T

from node.hardware import LANES

# The q.k partial sums below are folded by hand for exactly 8 lanes: a LANES of another width
# must not compile into a kernel that silently drops or repeats lanes.
assert LANES == 8, "_attend folds exactly 8 lanes; change its fold together with LANES"
KV_PAGE_SIZE = 16  # TVM builds its CPU attention kernels for 16-token pages; the runtime uses the same
LOG2E = math.log2(math.e)


@T.macro(hygienic=False)
def _attend(q, row, head, n_keys, key_at, value_at, output, lse, sm_scale, head_dim, dtype, scores, lanes, acc, stats):
    """One query row of one head against ``n_keys`` keys: two passes for the max and the sum of
    exp2 (scores in log2 units, as TVM's kernels keep them), then the weighted sum of values.
    ``key_at(k, i)`` / ``value_at(k, i)`` read element ``i`` of key / value ``k`` wherever the
    kernel keeps them. No visible key gives output 0 and lse -5e4, as TVM's kernels do."""
    stats[0] = T.float32(-5.0e4)
    stats[1] = T.float32(0)
    for i in T.vectorized(head_dim):
        acc[i] = T.float32(0)
    for k_idx in T.serial(n_keys):
        for lane in T.vectorized(LANES):
            lanes[lane] = T.float32(0)
        for d_out in T.serial(head_dim // LANES):
            for lane in T.vectorized(LANES):
                lanes[lane] = lanes[lane] + T.Cast("float32", q[row, head, d_out * LANES + lane]) * T.Cast(
                    "float32", key_at(k_idx, d_out * LANES + lane)
                )
        scores[k_idx] = ((lanes[0] + lanes[1] + lanes[2] + lanes[3]) + (lanes[4] + lanes[5] + lanes[6] + lanes[7])) * (
            sm_scale * T.float32(LOG2E)
        )
        stats[0] = T.max(stats[0], scores[k_idx])
    for k_idx in T.serial(n_keys):
        scores[k_idx] = T.exp2(scores[k_idx] - stats[0])
        stats[1] = stats[1] + scores[k_idx]
    for k_idx in T.serial(n_keys):
        for i in T.vectorized(head_dim):
            acc[i] = acc[i] + scores[k_idx] * T.Cast("float32", value_at(k_idx, i))
    for i in T.vectorized(head_dim):
        output[row, head, i] = T.Cast(dtype, T.if_then_else(stats[1] > 0, acc[i] / stats[1], T.float32(0)))
    lse[row, head] = T.if_then_else(stats[1] > 0, stats[0] + T.log2(stats[1]), T.float32(-5.0e4))


def ragged_prefill_attention_cpu(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str):
    group_size = h_q // h_kv
    assert d_qk == d_v and d_qk % LANES == 0, "one head dim, split into vector lanes"

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,  # [total_len, h_q, d_qk]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_k: T.handle,  # [total_len, h_kv, d_qk]
        var_v: T.handle,  # [total_len, h_kv, d_v]
        var_kv_indptr: T.handle,  # [batch_size + 1]
        var_q_rope_position: T.handle,  # [total_q_len]
        var_k_rope_pos_offset: T.handle,  # [b]
        var_output: T.handle,  # [total_len, h_q, d_v]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()

        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        T.Assert(rotary_mode == 0, "ProofMesh's CPU prefill attention expects RoPE applied before attention")
        for b in T.serial(batch_size):
            for h in T.parallel(h_q):
                with T.sblock("attn"):
                    scores = T.sblock_alloc_buffer([kv_len], "float32")
                    lanes = T.sblock_alloc_buffer([LANES], "float32")
                    acc = T.sblock_alloc_buffer([d_v], "float32")
                    stats = T.sblock_alloc_buffer([2], "float32")  # running max, sum of exp2
                    for q_idx in T.serial(q_indptr[b + 1] - q_indptr[b]):
                        # Causal: a query sees the keys before the chunk and the chunk up to itself.
                        _attend(
                            q, q_indptr[b] + q_idx, h,
                            T.if_then_else(causal > 0, kv_indptr[b + 1] - kv_indptr[b] - (q_indptr[b + 1] - q_indptr[b]) + q_idx + 1,
                                           kv_indptr[b + 1] - kv_indptr[b]),
                            lambda k_idx, i: k[kv_indptr[b] + k_idx, h // group_size, i],
                            lambda k_idx, i: v[kv_indptr[b] + k_idx, h // group_size, i],
                            output, lse, sm_scale, d_v, dtype, scores, lanes, acc, stats,
                        )

    return batch_prefill_ragged_kv


def _kv_len(page_indptr, b, page_size: int, length_info, sliding: bool):
    """Keys sequence ``b`` holds in the pages handed to the kernel (TVM's ``_get_kv_chunk_len``; for a
    sliding layer the cache hands over only the pages of the last ``window`` keys, from an offset)."""
    n_pages = page_indptr[b + 1] - page_indptr[b]
    return T.if_then_else(n_pages > 0, _get_kv_chunk_len(n_pages, page_size, b, length_info, sliding), 0)


def _first_visible_key(causal, kv_len, qo_len, q_idx, window: int):
    """The first of the ``kv_len`` cached keys query ``q_idx`` of the chunk may see. TVM's masks
    (``_causal_or_sliding_cross_mask``): in a sliding layer, a query ``q_idx`` rows into its chunk sees
    ``window - q_idx - 1`` cached keys (the rest of its window is in the chunk); else all."""
    if window:
        return T.if_then_else(causal > 0, T.max(kv_len - T.max(window - q_idx - 1, 0), 0), 0)
    return 0


def _n_visible_keys(causal, kv_len, qo_len, q_idx, window: int):
    if window:
        return kv_len - _first_visible_key(causal, kv_len, qo_len, q_idx, window)
    return T.max(T.if_then_else(causal > 0, T.min(kv_len, kv_len - qo_len + q_idx + 1), kv_len), 0)


def _page_slot(pages, page_values, page_indptr, b, pos, kv, head, i, page_size: int, length_info, sliding: bool):
    """Element ``i`` of the key (kv 0) or value (kv 1) at visible position ``pos`` of sequence ``b``."""
    offset = _get_seq_offset(pos, b, length_info, sliding)  # past the window's start in its first page
    return pages[page_values[page_indptr[b] + offset // page_size], kv, head, offset % page_size, i]


def paged_prefill_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = KV_PAGE_SIZE,
                                sliding_window_size: int = 0):
    """Queries of the current chunk against the keys and values in the cache's pages (TVM's
    ``batch_prefill_paged_kv_cpu``, and with ``sliding_window_size`` its ``..._sliding_window``
    form, whose length info is (3, b): last page length, window offset, sink length). Same signature
    and results, except that TVM's sliding CPU kernel gives NaN (it rescales by ``scale_O[d_idx]`` of
    a one-element buffer and reads ``new_m`` unset for masked keys). TVM's version walks every slot of
    the whole cache for every query and head; this one walks the keys the query sees."""
    group_size = h_q // h_kv
    sliding = sliding_window_size > 0
    assert d % LANES == 0, "head dim must split into vector lanes"

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [b]: KV slots used in each sequence's last page; sliding: [3, b]
        var_k_rope_pos_offset: T.handle,  # [b]
        var_q_rope_position: T.handle,  # [total_len]
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _declare_length_info(var_length_info, batch_size, sliding, length_info_elem_offset)

        T.Assert(rotary_mode == 0, "ProofMesh's CPU prefill attention expects RoPE applied before attention")
        for b in T.serial(batch_size):
            for h in T.parallel(h_q):
                with T.sblock("attn"):
                    scores = T.sblock_alloc_buffer([max_num_pages * page_size], "float32")
                    lanes = T.sblock_alloc_buffer([LANES], "float32")
                    acc = T.sblock_alloc_buffer([d], "float32")
                    stats = T.sblock_alloc_buffer([2], "float32")  # running max, sum of exp2
                    for q_idx in T.serial(q_indptr[b + 1] - q_indptr[b]):
                        _attend(
                            q, q_indptr[b] + q_idx, h,
                            _n_visible_keys(causal, _kv_len(page_indptr, b, page_size, length_info, sliding),
                                            q_indptr[b + 1] - q_indptr[b], q_idx, sliding_window_size),
                            lambda k_idx, i: _page_slot(pages, page_values, page_indptr, b, _first_visible_key(
                                causal, _kv_len(page_indptr, b, page_size, length_info, sliding), q_indptr[b + 1] - q_indptr[b],
                                q_idx, sliding_window_size) + k_idx, 0, h // group_size, i, page_size, length_info, sliding),
                            lambda k_idx, i: _page_slot(pages, page_values, page_indptr, b, _first_visible_key(
                                causal, _kv_len(page_indptr, b, page_size, length_info, sliding), q_indptr[b + 1] - q_indptr[b],
                                q_idx, sliding_window_size) + k_idx, 1, h // group_size, i, page_size, length_info, sliding),
                            output, lse, sm_scale, d, dtype, scores, lanes, acc, stats,
                        )

    return batch_prefill_paged_kv_cpu


def paged_decode_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = KV_PAGE_SIZE,
                               sliding_window_size: int = 0):
    """One new query per sequence against its cached keys (TVM's ``batch_decode_paged_kv_cpu``, and
    with ``sliding_window_size`` its ``..._sliding_window`` form, which reads the window's pages from
    their offset: same signature and results; the cache appends before decoding, so the window's
    keys end with the query's own). TVM's version is serial over every
    sequence and head, scalar, and rescales the output at every key; this one runs
    (sequence, head) pairs in parallel, vectorized, with one pass for the max and one for the sum."""
    group_size = h_q // h_kv
    sliding = sliding_window_size > 0
    assert d % LANES == 0, "head dim must split into vector lanes"

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        Q_handle: T.handle,  # [B, h_q, d]
        pages_handle: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        page_table_indptr_handle: T.handle,  # [B + 1]
        page_table_values_handle: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [B]: KV slots used in each sequence's last page; sliding: [3, B]
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,  # [B, h_q, d]
        lse_handle: T.handle,  # [B, h_q]
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = _declare_length_info(var_length_info, B, sliding, length_info_elem_offset)

        T.Assert(rotary_mode == 0, "ProofMesh's CPU decode attention expects RoPE applied before attention")
        for bh in T.parallel(B * h_q):
            with T.sblock("attn"):
                scores = T.sblock_alloc_buffer([max_num_pages * page_size], "float32")
                lanes = T.sblock_alloc_buffer([LANES], "float32")
                acc = T.sblock_alloc_buffer([d], "float32")
                stats = T.sblock_alloc_buffer([2], "float32")  # max, sum of exp2
                _attend(
                    Q, bh // h_q, bh % h_q,
                    _kv_len(page_indptr, bh // h_q, page_size, length_info, sliding),
                    lambda k_idx, i: _page_slot(pages, page_values, page_indptr, bh // h_q, k_idx, 0, bh % h_q // group_size,
                                                i, page_size, length_info, sliding),
                    lambda k_idx, i: _page_slot(pages, page_values, page_indptr, bh // h_q, k_idx, 1, bh % h_q // group_size,
                                                i, page_size, length_info, sliding),
                    output, lse, sm_scale, d, dtype, scores, lanes, acc, stats,
                )

    return batch_decode_paged_kv_cpu


# TVM's kernels by the names they have in an exported module, and ours to put in their place.
KERNELS = {
    "batch_prefill_ragged_kv": lambda h_kv, h_q, d, dtype, page_size: ragged_prefill_attention_cpu(h_kv, h_q, d, d, dtype),
    "batch_prefill_paged_kv_cpu": paged_prefill_attention_cpu,
    "batch_decode_paged_kv_cpu": paged_decode_attention_cpu,
}
# Their forms for sliding-window layers (Gemma 3), built for the window the model compiles in.
SLIDING_KERNELS = {
    "batch_prefill_paged_kv_cpu_sliding_window": paged_prefill_attention_cpu,
    "batch_decode_paged_kv_cpu_sliding_window": paged_decode_attention_cpu,
}


def use_fast_cpu_attention(mod, num_key_value_heads: int, num_attention_heads: int, head_dim: int,
                           page_size: int = KV_PAGE_SIZE, dtype: str = "float32", sliding_window_size: int = 0):
    """Swap TVM's CPU attention kernels for ours in an exported module (same signatures); with a
    ``sliding_window_size`` (a model with sliding layers), the sliding-window kernels too."""
    present = {gv.name_hint for gv in mod.get_global_vars()}
    for name, make in KERNELS.items():
        if name in present:
            kernel = make(num_key_value_heads, num_attention_heads, head_dim, dtype, page_size)
            mod[name] = kernel.with_attr("global_symbol", name)
    for name, make in SLIDING_KERNELS.items():
        if sliding_window_size and name in present:
            kernel = make(num_key_value_heads, num_attention_heads, head_dim, dtype, page_size, sliding_window_size)
            mod[name] = kernel.with_attr("global_symbol", name)
    return mod
