"""A faster CPU kernel for the KV cache's RoPE (TVM's ``llama_rope_with_position_map``, the
function the cache calls ``tir_split_rotary``, exported as ``fused_rope``): split the fused qkv
rows into q, k and v and rotate q and k.

Why: TVM's version is one serial loop over every (token, head, dim) element, and each element
computes its own ``pow``, ``cos`` and ``sin``: 12 heads x 64 dims of scalar libm calls per token
and layer, where 32 angles are all there are. Measured on znver4, it was about 0.2 ms of every
layer of a 16-sequence decode step, more than the attention itself.

This kernel computes each token's angles once (``cos`` / ``sin`` of dims ``i`` and ``i + half``
share one angle) and applies them to every head, tokens in parallel. Each output is the same
expression of the same inputs as in TVM's kernel (the angle from TVM's own
``switch_rope_freq_func``, then ``cos * x + sin * (-x[i + half])`` or ``cos * x + sin *
x[i - half]``), so the results are bit for bit TVM's: the swap moves no logit, and no
calibration with it (tested against TVM's kernel).

Only the default frequency scheme is swapped; other ``rope_type``s keep TVM's kernel (with
Llama-3's scaled angle, LLVM fused the multiply-adds differently in the two loop nests at some
head dims: a last-bit difference).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T

from node.models.llama.model import ROPE_SCALE

SWAPPED_ROPE_TYPES = (None, "default")


def fused_rope_cpu(theta: float, scale: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str,
                   rope_scaling: dict[str, Any], rotary_dim: int | None = None):
    """Same signature and results as TVM's ``llama_rope_with_position_map(...)``'s ``fused_rope``."""
    fused_heads = num_q_heads + num_kv_heads * 2
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    scale = tirx.const(scale, "float32")
    freq_of = switch_rope_freq_func(rope_scaling)

    def angle(pos, i, part):
        """``cos`` (part 0) or ``sin`` (part 1) of dim ``i``'s angle at ``pos``, as TVM writes it."""
        cos_freq, sin_freq, var_map = freq_of(pos * scale, i, rotary_dim, theta, "float32")
        expr = (cos_freq, sin_freq)[part]
        for var, value in var_map.items():
            expr = tirx.Let(var, value, expr)
        return expr

    def rotated(x, s, h, i, c, sn, upper):
        """Dim ``i`` (lower half) or ``i + half`` (upper) of head ``h``, rotated: TVM's ``cos + sin``."""
        if upper:
            return (c * x[s, h, i + half].astype("float32") + sn * x[s, h, i].astype("float32")).astype(dtype)
        return (c * x[s, h, i].astype("float32") + sn * (-x[s, h, i + half]).astype("float32")).astype(dtype)

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle,
                   apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused_heads, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        for s in T.parallel(seq_len):
            if apply_rope > 0:
                for i in T.serial(half):
                    c: T.float32 = angle(position_map[s], i, 0)
                    sn: T.float32 = angle(position_map[s], i, 1)
                    for h in T.serial(num_q_heads):
                        q[s, h, i] = rotated(qkv, s, h, i, c, sn, False)
                        q[s, h, i + half] = rotated(qkv, s, h, i, c, sn, True)
                    for h in T.serial(num_kv_heads):
                        k[s, h, i] = rotated(qkv, s, num_q_heads + h, i, c, sn, False)
                        k[s, h, i + half] = rotated(qkv, s, num_q_heads + h, i, c, sn, True)
                for h, d in T.grid(num_q_heads, head_dim - rotary_dim):
                    q[s, h, rotary_dim + d] = qkv[s, h, rotary_dim + d]
                for h, d in T.grid(num_kv_heads, head_dim - rotary_dim):
                    k[s, h, rotary_dim + d] = qkv[s, num_q_heads + h, rotary_dim + d]
            else:
                for h, d in T.grid(num_q_heads, head_dim):
                    q[s, h, d] = qkv[s, h, d]
                for h, d in T.grid(num_kv_heads, head_dim):
                    k[s, h, d] = qkv[s, num_q_heads + h, d]
            for h in T.serial(num_kv_heads):
                for d in T.vectorized(head_dim):
                    v[s, h, d] = qkv[s, num_q_heads + num_kv_heads + h, d]

    return fused_rope


def use_fast_cpu_rope(mod, cfg) -> Any:
    """Swap TVM's RoPE kernel (exported as ``fused_rope``) for ours in an exported module."""
    scaling = cfg.rope_scaling_dict or {}
    if "fused_rope" not in {gv.name_hint for gv in mod.get_global_vars()} or scaling.get("rope_type") not in SWAPPED_ROPE_TYPES:
        return mod
    # the arguments the model's KV cache gives TVM's kernel (LlamaForCausalLM.create_paged_kv_cache)
    kernel = fused_rope_cpu(cfg.rope_theta, ROPE_SCALE, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                            "float32", scaling, cfg.head_dim)
    mod["fused_rope"] = kernel.with_attr("global_symbol", "fused_rope")
    return mod
