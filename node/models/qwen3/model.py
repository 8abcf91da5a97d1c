"""Qwen3 (dense) in ``tvm.relax.frontend.nn``: the Llama module with QK-norm (after MLC-LLM's
``qwen3_model.py``).

The cache's ``attention_with_fused_qkv`` takes the fused (b, s, q + 2 kv heads, head_dim) rows and
applies RoPE itself, so q and k are normed inside that tensor before the call: split along the
heads, RMSNorm each q and k head over ``head_dim``, concat back. Everything else (fused q/k/v and
gate/up, the cache, the exported functions) is Llama's.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from node.models.llama.model import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, Linears

from .config import Qwen3Config


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: Qwen3Config, layer_id: int, linear: Linears):
        super().__init__(cfg, layer_id, linear)
        self.q_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False)
        self.k_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False)

    def before_cache(self, qkv: Tensor, cache: PagedKVCache) -> Tensor:
        nq, nkv = self.num_q_heads, self.num_kv_heads
        q, k, v = op.split(qkv, [nq, nq + nkv], axis=2)  # (b, s, nq | nkv | nkv, head_dim)
        return op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_class = Qwen3Model


__all__ = ["Qwen3ForCausalLM"]
