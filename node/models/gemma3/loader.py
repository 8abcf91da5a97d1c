"""Gemma 3's tensors and how each source stores them (after MLC-LLM's ``gemma3_loader.py``).

Names are transformers' ``Gemma3ForCausalLM`` ones. Every norm (``input_layernorm``,
``post_attention_layernorm``, ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``, the
per-head ``self_attn.q_norm`` / ``k_norm`` and the final ``model.norm``) computes
``x / rms(x) * (1 + w)`` (``Gemma3RMSNorm``). llama.cpp's converter (``Gemma3Model.norm_shift``)
stores ``1 + w`` in the GGUF file; a ``Checkpoint`` holds that same multiplier from both sources,
so the HF loader adds the 1 (``hf_weight_value``) and the model and the reference multiply by the
weight as it is. In float32, ``1 + w`` is what transformers computes too (``1.0 + weight.float()``).

GGUF metadata (``gemma3.*``) gives sizes, eps, the global RoPE base and the sliding window; the rest
is what llama.cpp's ``llama-model.cpp`` fixes for ``LLM_ARCH_GEMMA3``: every 6th layer global, local
RoPE base 10000, attention scale ``1/sqrt(key_length)`` except for the 62-layer 27B, whose
``query_pre_attn_scalar`` is ``hidden / heads``. The q/k rows are not permuted (NEOX RoPE).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from node.errors import ConfigError
from node.models.llama.gguf_names import GGUFMetadata, f32_value
from node.models.qwen3.loader import GGUF_BLOCK_NAMES as QWEN3_BLOCK_NAMES
from node.models.qwen3.loader import expected_weight_shapes as qwen3_weight_shapes

from .config import DEFAULT_SLIDING_PATTERN, GLOBAL, SLIDING, Gemma3Config

# Qwen3's names (Llama's and the q/k norms) except the norms around the MLP: llama.cpp calls the
# norm before it ``ffn_norm`` (Llama's ``post_attention_layernorm``), and Gemma's
# ``post_attention_layernorm`` (after attention, before the residual add) ``post_attention_norm``.
GGUF_BLOCK_NAMES = {
    **QWEN3_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# ``gemma3.*`` keys implemented; any other one (a sliding-window pattern, attention soft-capping,
# ...) changes the computation in llama.cpp's reading and is refused by name.
IMPLEMENTED_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length",
    "attention.sliding_window", "rope.freq_base", "rope.scaling.type", "final_logit_softcapping", "vocab_size",
})
LLAMA_CPP_SWA_ROPE_BASE = 10_000.0  # llama-model.cpp: rope_freq_base_train_swa for gemma3
LLAMA_CPP_27B_LAYERS = 62  # llama-model.cpp: the one size whose attention scale is hidden / heads


def expected_weight_shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Qwen3's tensors (Llama's and the q/k norms) and the two norms around the MLP."""
    shapes = qwen3_weight_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = (cfg.hidden_size,)
    return shapes


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")  # the converter's own test (Gemma3Model.norm_shift)


def hf_weight_value(name: str, w: np.ndarray) -> np.ndarray:
    """The value a Checkpoint holds for HF tensor ``name``: norms as their multiplier ``1 + w``."""
    return np.ascontiguousarray(w + np.float32(1.0), dtype=np.float32) if is_norm(name) else w


def hf_stored_value(name: str, w: np.ndarray) -> np.ndarray:
    """Inverse of ``hf_weight_value`` (exact for multipliers >= 0.5, where ``m - 1`` is representable)."""
    return np.ascontiguousarray(w - np.float32(1.0), dtype=np.float32) if is_norm(name) else w


def config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> Gemma3Config:
    m = GGUFMetadata(meta, source)
    m.refuse_unknown_keys(IMPLEMENTED_KEYS)  # a sliding_window_pattern too: llama.cpp fixes it at 6
    scaling = m.get("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{source}: GGUF rope scaling ({scaling!r}, rope_freqs) is not supported for Gemma 3")
    hidden = int(m.need("embedding_length"))
    heads = int(m.need("attention.head_count"))
    head_dim = int(m.get("attention.key_length", 256))
    if int(m.get("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{source}: {m.key('attention.value_length')} differs from key_length; not supported")
    n_layers = int(m.need("block_count"))
    softcap = m.get("final_logit_softcapping", None)
    return Gemma3Config(
        vocab_size=m.vocab_size(),
        hidden_size=hidden,
        intermediate_size=int(m.need("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(m.get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        layer_types=tuple(GLOBAL if (i + 1) % DEFAULT_SLIDING_PATTERN == 0 else SLIDING for i in range(n_layers)),
        sliding_window=int(m.need("attention.sliding_window")),
        query_pre_attn_scalar=hidden // heads if n_layers == LLAMA_CPP_27B_LAYERS else head_dim,
        rms_norm_eps=f32_value(m.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=f32_value(m.get("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=LLAMA_CPP_SWA_ROPE_BASE,
        final_logit_softcapping=None if softcap is None else f32_value(softcap),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(m.get("context_length", 32768)),
    )


__all__ = ["GGUF_BLOCK_NAMES", "config_from_gguf", "expected_weight_shapes", "hf_stored_value", "hf_weight_value"]
