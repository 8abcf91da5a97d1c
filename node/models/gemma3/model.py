"""Gemma 3 text decoder in ``tvm.relax.frontend.nn`` (transformers' ``Gemma3ForCausalLM``), built
on the Llama module's pieces (fused q/k/v and gate/up, the paged KV cache, the export spec).

What differs from Llama, step by step:

- the embedding is scaled by ``sqrt(hidden_size)`` (a float32 constant: the activation dtype, as
  transformers casts ``embed_scale`` to it);
- every norm multiplies by its weight as the ``Checkpoint`` holds it, which is Gemma's ``1 + w``
  (``node.models.gemma3.loader``), so the plain RMSNorm computes ``Gemma3RMSNorm``;
- q and k are RMS-normed per head (as Qwen3) and then rotated here, not in the cache, because
  sliding layers use RoPE base ``rope_local_base_freq`` and global ones ``rope_theta`` while the
  cache's RoPE kernel has one base for all layers (and TVM's C++ fixes 10000 for sliding layers
  in its inline mode, which its ragged prefill kernel ignores). The cache runs with
  ``RopeMode.NONE``; positions come from ``cache.get_query_positions``;
- attention scale ``query_pre_attn_scalar ** -0.5``;
- sliding layers are ``"mha_sliding"`` in the cache's per-layer ``attn_kind``, which makes the
  cache read only the last ``sliding_window`` keys for them (``layer_sliding_window_size``). The
  in-chunk part of a prefill (TVM's ragged kernel) is causal but not windowed, so a prefill chunk
  must not be longer than the window: ``ModelRuntime`` refuses limits that break this;
- post-attention and post-MLP norms before each residual add; a pre-MLP norm;
- GeGLU MLP (tanh-approximated GELU);
- logits soft-capped ``cap * tanh(logits / cap)`` when ``final_logit_softcapping`` is set.
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from node.models.llama.model import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel, Linears
from node.models.qwen3.model import Qwen3Attention

from .config import Gemma3Config


def rotate_fused_qkv(qkv: te.Tensor, positions: te.Tensor, theta: float, rotated_heads: int) -> te.Tensor:
    """HF's rotate-half RoPE on the first ``rotated_heads`` heads (q, then k) of fused rows
    (tokens, heads, head_dim); v passes through. The angle is taken in float64 (position times
    ``theta ** (-2i / head_dim)``), its cosine and sine rounded to float32."""
    head_dim = int(qkv.shape[-1])
    half = head_dim // 2

    def element(s, h, d):
        i = tirx.floormod(d, half)
        inv_freq = tirx.const(1.0, "float64") / tirx.power(
            tirx.const(theta, "float64"), tirx.Cast("float64", 2 * i) / tirx.const(head_dim, "float64"))
        angle = tirx.Cast("float64", positions[s]) * inv_freq
        cos, sin = tirx.Cast("float32", tirx.cos(angle)), tirx.Cast("float32", tirx.sin(angle))
        partner = qkv[s, h, tirx.floormod(d + half, head_dim)]  # rotate_half: (-x2, x1)
        rotated = qkv[s, h, d] * cos + tirx.if_then_else(d < half, -partner, partner) * sin
        return tirx.if_then_else(h < rotated_heads, rotated, qkv[s, h, d])

    return te.compute(qkv.shape, element, name="rope")


class Gemma3Attention(Qwen3Attention):
    def __init__(self, cfg: Gemma3Config, layer_id: int, linear: Linears):
        super().__init__(cfg, layer_id, linear)
        self.sm_scale = cfg.query_pre_attn_scalar**-0.5
        self.rope_theta = cfg.rope_local_base_freq if cfg.sliding_layers[layer_id] else cfg.rope_theta

    def before_cache(self, qkv: Tensor, cache: PagedKVCache) -> Tensor:
        qkv = super().before_cache(qkv, cache)  # QK-norm
        b, s, heads, hd = qkv.shape
        flat = op.reshape(qkv, (b * s, heads, hd))
        positions = cache.get_query_positions(b * s)  # (b * s,) each token's position in its sequence
        rotated = op.tensor_expr_op(
            lambda x, p: rotate_fused_qkv(x, p, self.rope_theta, self.num_q_heads + self.num_kv_heads),
            "rope", [flat, positions])
        return op.reshape(rotated, (b, s, heads, hd))


class Gemma3MLP(LlamaMLP):
    activation = staticmethod(lambda x: op.gelu(x, approximate="tanh"))  # gelu_pytorch_tanh


class Gemma3DecoderLayer(LlamaDecoderLayer):
    attention_class = Gemma3Attention
    mlp_class = Gemma3MLP

    def __init__(self, cfg: Gemma3Config, layer_id: int, linear: Linears):
        super().__init__(cfg, layer_id, linear)
        self.pre_feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.post_feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, cache: PagedKVCache) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache, self.layer_id))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(LlamaModel):
    layer_class = Gemma3DecoderLayer

    def __init__(self, cfg: Gemma3Config, linear: Linears):
        super().__init__(cfg, linear)
        self.embed_scale = float(math.sqrt(cfg.hidden_size))

    def forward(self, input_ids: Tensor, cache: PagedKVCache) -> Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale  # (b, s, hidden)
        for layer in self.layers:
            x = layer(x, cache)
        return self.norm(x)


class Gemma3ForCausalLM(LlamaForCausalLM):
    model_class = Gemma3Model

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = super()._logits(hidden)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else op.tanh(logits / cap) * cap

    def attention_kinds(self) -> dict:
        cfg = self.cfg
        return {
            "attn_kind": ["mha_sliding" if sliding else "mha" for sliding in cfg.sliding_layers],
            "layer_sliding_window_size": cfg.sliding_window,
            "rope_mode": RopeMode.NONE,  # rotated in Gemma3Attention.before_cache
            "rope_theta": cfg.rope_theta,  # unused with RopeMode.NONE
        }


__all__ = ["Gemma3ForCausalLM", "rotate_fused_qkv"]
