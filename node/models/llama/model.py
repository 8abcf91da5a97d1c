"""Llama-family decoder in ``tvm.relax.frontend.nn`` (after MLC-LLM's ``llama_model.py``).

RMSNorm -> attention through TVM's paged KV cache (RoPE is applied inside the cache,
Llama's rotate-half layout) -> residual -> RMSNorm -> SwiGLU MLP -> residual, repeated,
then a final RMSNorm and the LM head (tied to the embedding or not). q/k/v and gate/up are
fused into single projections so each layer runs few, large matmuls; ``fuse_hf_weights``
maps Hugging Face tensor names onto them.

Exported functions (one spec, ``export_spec``):
- ``prefill(input_ids (1, n), logit_positions (m,), cache)``: run n tokens of the sequences
  the runtime opened in the cache with ``begin_forward``; return logits at ``logit_positions``
  (the last token for generation, every position for teacher-forced scoring).
- ``decode(input_ids (b, 1), cache)``: one token for each of b sequences.
- ``create_paged_kv_cache(...)``: the cache object, sized at run time.
Weights are parameters (``param_mode: packed``), so one library serves every checkpoint
of a shape. A weight layout (``native_params``) may keep any projection, the embedding and
the head in their stored form, llama.cpp's blocks or 16-bit floats (``node.models.quant``);
the layout is part of the library's cache key, never of ``model_id``. Where the parts of a
fused projection are stored in different types (a Q4_K_M file keeps q and k in Q5_0 and v in
Q8_0), the projection stays one module of per-part matmuls whose outputs are concatenated
(layout ``"Q5_0+Q5_0+Q8_0"``), so no part is widened to float32.
"""

from __future__ import annotations

from typing import Mapping, Union

import numpy as np
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm import relax as rx
from tvm.target import Target

from node.models.quant.blocks import QuantizedTensor, concat_rows
from node.models.quant.kernels import ROWS
from node.models.quant.modules import QuantEmbedding, QuantLinear

from .config import LlamaConfig

ACCUM_DTYPE = "float32"
ROPE_SCALE = 1  # the KV cache's RoPE position scale (no scaling); the CPU RoPE kernel is built with the same
Weight = Union[np.ndarray, QuantizedTensor]
WeightLayout = Mapping[str, str]  # module name ("model.layers.0.mlp.down_proj") -> stored type, "+"-joined per part
FLOAT32 = "F32"  # a part of a mixed projection computed from float32
# Hugging Face projections fused into one matmul each: (fused name, its parts in row order).
FUSED_PROJECTIONS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)


class Linears:
    """Makes each projection an ``nn.Linear``, or a ``QuantLinear`` where the layout names a block type."""

    def __init__(self, layout: WeightLayout, target: Target):
        self.layout = layout
        self.target = target

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool = False,
                 parts: tuple[int, ...] = ()) -> nn.Module:
        """``parts``: the rows of each projection fused into this one, in order."""
        kind = self.layout.get(name)
        if kind is not None and "+" in kind:
            return PartedLinear(in_features, parts, kind.split("+"), self.target, bias=bias)
        if kind is not None and kind != FLOAT32:
            return QuantLinear(in_features, out_features, kind, self.target, bias=bias)
        return nn.Linear(in_features, out_features, bias=bias)


class PartedLinear(nn.Module):
    """A fused projection whose parts are stored in different types: one matmul per part, the
    outputs concatenated (the same values as one matmul over the concatenated rows)."""

    def __init__(self, in_features: int, rows: tuple[int, ...], kinds: list[str], target: Target, bias: bool = False):
        assert len(rows) == len(kinds), f"{len(kinds)} stored types for {len(rows)} parts"
        self.parts = nn.ModuleList([
            nn.Linear(in_features, n, bias=False) if kind == FLOAT32 else QuantLinear(in_features, n, kind, target)
            for n, kind in zip(rows, kinds)
        ])
        self.bias = nn.Parameter((sum(rows),), "float32") if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = op.concat([part(x) for part in self.parts], dim=-1)
        return out + self.bias if self.bias is not None else out


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int, linear: Linears):
        prefix = f"model.layers.{layer_id}.self_attn"
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sm_scale = self.head_dim**-0.5
        qkv_rows = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        self.qkv_proj = linear(f"{prefix}.qkv_proj", cfg.hidden_size, qkv_rows, bias=cfg.attention_bias,
                               parts=(self.num_q_heads * self.head_dim, kv_rows, kv_rows))
        self.o_proj = linear(f"{prefix}.o_proj", self.num_q_heads * self.head_dim, cfg.hidden_size)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        qkv = self.before_cache(qkv, cache)
        out = cache.attention_with_fused_qkv(layer_id, qkv, self.num_q_heads, sm_scale=self.sm_scale)
        return self.o_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))  # (b, s, hidden)

    def before_cache(self, qkv: Tensor, cache: PagedKVCache) -> Tensor:
        """The fused (b, s, q + 2 kv heads, head_dim) rows as the cache takes them: Llama's as
        projected (the cache applies RoPE); Qwen3 and Gemma 3 norm q and k here first."""
        return qkv


class LlamaMLP(nn.Module):
    activation = staticmethod(op.silu)  # SwiGLU; Gemma 3's GeGLU names its own

    def __init__(self, cfg: LlamaConfig, prefix: str, linear: Linears):
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = linear(f"{prefix}.gate_up_proj", cfg.hidden_size, 2 * cfg.intermediate_size,
                                   parts=(cfg.intermediate_size, cfg.intermediate_size))
        self.down_proj = linear(f"{prefix}.down_proj", cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)  # each (b, s, intermediate)
        return self.down_proj(self.activation(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention  # what an architecture built on this layer swaps
    mlp_class = LlamaMLP

    def __init__(self, cfg: LlamaConfig, layer_id: int, linear: Linears):
        self.layer_id = layer_id
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.self_attn = self.attention_class(cfg, layer_id, linear)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.mlp = self.mlp_class(cfg, f"model.layers.{layer_id}.mlp", linear)

    def forward(self, x: Tensor, cache: PagedKVCache) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, self.layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    layer_class = LlamaDecoderLayer

    def __init__(self, cfg: LlamaConfig, linear: Linears):
        embed_type = linear.layout.get("model.embed_tokens")
        self.embed_tokens = (QuantEmbedding(cfg.vocab_size, cfg.hidden_size, embed_type, linear.target) if embed_type
                             else nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList([self.layer_class(cfg, i, linear) for i in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, input_ids: Tensor, cache: PagedKVCache) -> Tensor:
        x = self.embed_tokens(input_ids)  # (b, s, hidden)
        for layer in self.layers:
            x = layer(x, cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    model_class = LlamaModel

    def __init__(self, cfg: LlamaConfig, target: Target, layout: WeightLayout | None = None):
        self.cfg = cfg
        self.target = target
        linear = Linears(layout or {}, target)
        self.model = self.model_class(cfg, linear)
        if not cfg.tie_word_embeddings:
            self.lm_head = linear("lm_head", cfg.hidden_size, cfg.vocab_size)

    def _logits(self, hidden: Tensor) -> Tensor:
        if self.cfg.tie_word_embeddings and isinstance(self.model.embed_tokens, QuantEmbedding):
            return self.model.embed_tokens.lm_head(hidden)
        if self.cfg.tie_word_embeddings:
            weight = op.permute_dims(self.model.embed_tokens.weight)  # (hidden, vocab)
            return op.matmul(hidden, weight, out_dtype=ACCUM_DTYPE)
        return self.lm_head(hidden)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, cache: PagedKVCache):
        hidden = self.model(input_ids, cache)  # (1, n, hidden)
        hidden = op.take(hidden, logit_positions, axis=1)  # (1, m, hidden)
        return self._logits(hidden), cache  # (1, m, vocab)

    def decode(self, input_ids: Tensor, cache: PagedKVCache):
        hidden = self.model(input_ids, cache)  # (b, 1, hidden)
        return self._logits(hidden), cache  # (b, 1, vocab)

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        cfg = self.cfg
        return TIRPagedKVCache(
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_scale=ROPE_SCALE,
            rope_scaling=cfg.rope_scaling_dict or {},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype="float32",
            target=self.target,
            **self.attention_kinds(),
        )

    def attention_kinds(self) -> dict:
        """The cache arguments an architecture varies: Llama's layers all attend to every key,
        with RoPE applied by the cache (Gemma 3 slides some layers and applies its own RoPE)."""
        return {"attn_kind": "mha", "rope_mode": RopeMode.NORMAL, "rope_theta": self.cfg.rope_theta}

    def export_spec(self) -> dict:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        return {
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "cache": cache,
                "$": packed,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "cache": cache,
                "$": packed,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }


def fuse_hf_weights(cfg: LlamaConfig, weights: Mapping[str, Weight]) -> dict[str, Weight | list[Weight]]:
    """Map Hugging Face tensor names onto this module's weights, fusing q/k/v and gate/up by rows.
    Parts of one stored type stay in it (rows are independent blocks); parts of several types
    stay a list of parts (``PartedLinear``); float32 parts are concatenated."""
    part_names = {f".{part}." for _, parts in FUSED_PROJECTIONS for part in parts}
    out = {name: t for name, t in weights.items() if not any(p in name for p in part_names)}
    for i in range(cfg.num_hidden_layers):
        for fused, parts in FUSED_PROJECTIONS:
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{part}.{kind}" for part in parts]
                if names[0] in weights:
                    out[f"model.layers.{i}.{fused}.{kind}"] = _concat_rows([weights[n] for n in names])
    return out


def _concat_rows(parts: list[Weight]) -> Weight | list[Weight]:
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({p.ggml_type for p in parts}) == 1:
        return concat_rows(parts)
    if any(isinstance(p, QuantizedTensor) for p in parts):
        return list(parts)
    return np.concatenate(parts, axis=0)


def native_params(fused: Mapping[str, Weight | list[Weight]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The compiled model's parameters and weight layout: every weight the kernels take in its
    stored form (rows in whole tiles) as its split arrays, everything else as float32."""
    params: dict[str, np.ndarray] = {}
    layout: dict[str, str] = {}
    for name, t in fused.items():
        module = name.removesuffix(".weight")
        if isinstance(t, list):
            kinds = []
            for i, part in enumerate(t):
                kind, arrays = _native_arrays(part)
                kinds.append(kind)
                params.update({f"{module}.parts.{i}.{suffix}": array for suffix, array in arrays.items()})
            layout[module] = "+".join(kinds)
            continue
        kind, arrays = _native_arrays(t)
        if kind != FLOAT32:
            layout[module] = kind
            params.update({f"{module}.{suffix}": array for suffix, array in arrays.items()})
        else:
            params[name] = arrays["weight"]
    return params, layout


def _native_arrays(t: Weight) -> tuple[str, dict[str, np.ndarray]]:
    """(stored type, its split arrays) for a weight the kernels take, else ("F32", {"weight": float32})."""
    if isinstance(t, QuantizedTensor) and t.shape[0] % ROWS == 0:
        return t.ggml_type, t.split()
    return FLOAT32, {"weight": t.dequantize() if isinstance(t, QuantizedTensor) else t}
