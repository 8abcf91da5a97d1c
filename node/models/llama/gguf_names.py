"""What llama.cpp's converter writes for the Llama family: tensor names and config metadata.

``convert_hf_to_gguf.py`` writes Llama, Mistral (as ``llama``), Qwen2 and Qwen3 with the same
``{arch}.*`` metadata keys (``gguf.constants.Keys``) and the same tensor names
(``gguf.constants.MODEL_TENSORS``); Qwen3 adds ``attn_q_norm``/``attn_k_norm``. Only ``LlamaModel``
permutes the q/k rows for GGML's interleaved RoPE; ``Qwen2Model`` and ``Qwen3Model`` keep HF's
rotate-half rows (llama.cpp runs them with NEOX RoPE), which ``node.models.architectures`` records.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from node.errors import ConfigError

from .config import LlamaConfig

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# ``{arch}.*`` keys the Llama-family model implements; any other one changes the computation in
# llama.cpp's reading of the file (soft-capping, embedding scales, experts, ALiBi, ...) and is refused.
IMPLEMENTED_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "expert_count", "expert_used_count",
})


def gguf_to_hf_name(name: str, block_names: Mapping[str, str] = BLOCK_NAMES,
                    global_names: Mapping[str, str] = GLOBAL_NAMES) -> str | None:
    """The HF tensor name of a GGUF tensor under an architecture's name map, or None when it has none."""
    if name in global_names:
        return global_names[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in block_names:
        return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    return None


def f32_value(x: Any) -> float:
    """GGUF stores these as float32: take the shortest decimal that is the same float32 (1e-05, not
    9.999999747378752e-06), so the config reads as the model card's and matches the HF config.json."""
    return float(str(np.float32(x)))


class GGUFMetadata:
    """The ``{arch}.*`` keys of one file, read with errors that name the key."""

    def __init__(self, meta: Mapping[str, Any], source: str) -> None:
        self.meta, self.source = meta, source
        self.arch = meta.get("general.architecture")

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self.key(name) in self.meta

    def need(self, name: str) -> Any:
        if self.key(name) not in self.meta:
            raise ConfigError(f"{self.source}: GGUF metadata is missing required key {self.key(name)!r}")
        return self.meta[self.key(name)]

    def get(self, name: str, default: Any) -> Any:
        return self.meta.get(self.key(name), default)

    def vocab_size(self) -> int:
        """The vocabulary's size: ``header_metadata`` counts the tokens without reading them."""
        tokens = self.meta.get("tokenizer.ggml.token_count") or len(self.meta.get("tokenizer.ggml.tokens") or [])
        return tokens or int(self.need("vocab_size"))

    def refuse_unknown_keys(self, implemented: frozenset[str]) -> None:
        """Raise ``ConfigError`` naming the first ``{arch}.*`` key the model does not implement."""
        prefix = f"{self.arch}."
        unknown = sorted(k for k in self.meta if k.startswith(prefix) and k.removeprefix(prefix) not in implemented)
        if unknown:
            raise ConfigError(f"{self.source}: GGUF key {unknown[0]!r} (= {self.meta[unknown[0]]!r}) changes the "
                              "computation and is not supported"
                              + (f" (nor {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""))


def config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str], source: str,
                         config_class: type[LlamaConfig] = LlamaConfig, model_type: str = "llama") -> LlamaConfig:
    """A Llama-family config from the ``{general.architecture}.*`` keys."""
    m = GGUFMetadata(meta, source)
    m.refuse_unknown_keys(IMPLEMENTED_KEYS)
    if int(m.get("expert_count", 0) or 0):
        raise ConfigError(f"{source}: mixture-of-experts models ({m.key('expert_count')}={m.get('expert_count', 0)}) "
                          "are not supported")
    hidden = int(m.need("embedding_length"))
    heads = int(m.need("attention.head_count"))
    kv_heads = int(m.get("attention.head_count_kv", heads))
    head_dim = int(m.get("attention.key_length", hidden // heads))
    rot_dim = int(m.get("rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ConfigError(f"{source}: partial rotary embedding ({m.key('rope.dimension_count')}={rot_dim}, "
                          f"head_dim={head_dim}) is not supported")
    if int(m.get("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{source}: {m.key('attention.value_length')} differs from key_length; not supported")
    scaling = m.get("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{source}: GGUF rope scaling ({scaling!r}, rope_freqs) is not supported yet; "
                          "load the Hugging Face checkpoint instead")
    return config_class(
        vocab_size=m.vocab_size(),
        hidden_size=hidden,
        intermediate_size=int(m.need("feed_forward_length")),
        num_hidden_layers=int(m.need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=f32_value(m.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=f32_value(m.get("rope.freq_base", 10000.0)),
        rope_scaling=None,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(m.get("context_length", 2048)),
        model_type=model_type,
        sliding_window=int(window) if (window := m.get("attention.sliding_window", None)) else None,
    )


__all__ = ["BLOCK_NAMES", "GGUFMetadata", "IMPLEMENTED_KEYS", "GLOBAL_NAMES", "config_from_metadata", "f32_value", "gguf_to_hf_name"]
