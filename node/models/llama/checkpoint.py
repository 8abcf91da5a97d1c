"""The tensors a Llama-family checkpoint holds, by Hugging Face name and shape.

``Checkpoint``, ``WeightsDigest``, ``keeps_stored_form`` and ``check_finite`` are shared by every
architecture and live in ``node.models.checkpoint``; they are named here too for the modules that
always found them here.
"""

from __future__ import annotations

import numpy as np

from node.models.checkpoint import Checkpoint, WeightsDigest, check_finite, keeps_stored_form
from node.models.checkpoint import check_weights as check_expected_weights
from node.models.quant.blocks import QuantizedTensor

from .config import LlamaConfig


def expected_weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by HF name, with the shape the config implies."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (q, h)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv, h)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, q)
        if cfg.attention_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (q,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (kv,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (kv,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, cfg.intermediate_size)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_weights(cfg: LlamaConfig, weights: dict[str, np.ndarray | QuantizedTensor], source: str) -> None:
    """Raise ``ModelLoadError`` naming the first missing, misshapen or unexpected tensor."""
    check_expected_weights(expected_weight_shapes(cfg), weights, source)


__all__ = [
    "Checkpoint",
    "WeightsDigest",
    "check_finite",
    "check_weights",
    "expected_weight_shapes",
    "keeps_stored_form",
]
