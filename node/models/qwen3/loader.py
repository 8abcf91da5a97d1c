"""Qwen3's tensors: Llama's plus a q and a k norm (``head_dim`` wide) in every layer.

Hugging Face names them ``self_attn.q_norm`` / ``self_attn.k_norm``; llama.cpp's ``Qwen3Model``
converter writes them as ``attn_q_norm`` / ``attn_k_norm`` and, like ``Qwen2Model``, keeps q/k rows
in HF's rotate-half order (no permutation to undo).
"""

from __future__ import annotations

from node.models.llama.checkpoint import expected_weight_shapes as llama_weight_shapes
from node.models.llama.gguf_names import BLOCK_NAMES as LLAMA_BLOCK_NAMES

from .config import Qwen3Config

GGUF_BLOCK_NAMES = {**LLAMA_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def expected_weight_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    shapes = llama_weight_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        shapes[f"model.layers.{i}.self_attn.q_norm.weight"] = (cfg.head_dim,)
        shapes[f"model.layers.{i}.self_attn.k_norm.weight"] = (cfg.head_dim,)
    return shapes


__all__ = ["GGUF_BLOCK_NAMES", "expected_weight_shapes"]
