"""Load a llama.cpp GGUF file (``general.architecture == "llama"``) into a ``Checkpoint``.

Read with ``node.models.gguf_file`` (a memory map; format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
The config comes from the ``llama.*`` metadata, the tokenizer from ``tokenizer.ggml.*`` (see
``node.models.tokenizer``). Matrices of every type in ``node.models.quant.blocks.FORMATS`` (the
legacy and K-quant blocks, F16, BF16) stay in their stored form (``QuantizedTensor``, for the
native kernels); every other tensor is read as float32 with ``gguf.quants.dequantize``.

Everything that can refuse a file is decided from its header before any tensor or the
vocabulary is read: the architecture, every ``llama.*`` key (each one is implemented or refused
by name, ``IMPLEMENTED_KEYS``) and every tensor's type (all the unsupported ones named at once).

Two layout facts of llama.cpp's converter (``convert_hf_to_gguf.py``) are undone here:

* GGUF lists dimensions fastest first (``ne``); the data is in numpy (row-major) order for the
  reversed shape, ``[out_features, in_features]`` for a matrix, which is the HF layout.
* The rows of ``attn_q`` (with ``n_head``) and ``attn_k`` (with ``n_head_kv``) are permuted from
  HF's rotate-half RoPE layout to GGML's interleaved one:
  ``w.reshape(n, 2, hd // 2, *rest).swapaxes(1, 2)``. ``unpermute_qk_rows`` is its inverse, as
  ``transformers``' ``_reverse_permute_weights``: ``w.reshape(n, hd // 2, 2, *rest).swapaxes(1, 2)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import ConfigError, ModelLoadError
from node.models.gguf_file import GGUFFile, GGUFTensor
from node.models.tokenizer import TextTokenizer

from node.models.quant.blocks import FORMATS, QuantizedTensor

from .checkpoint import Checkpoint, WeightsDigest, check_finite, check_weights, keeps_stored_form
from .config import LlamaConfig

# Stored types we compute with; the block formats are those of ggml-common.h.
SUPPORTED_GGML_TYPES = ("F32", *FORMATS)
# ``llama.*`` keys the model implements; any other one changes the computation in llama.cpp's
# reading of the file (soft-capping, embedding scales, experts, ALiBi, ...) and is refused.
IMPLEMENTED_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "expert_count", "expert_used_count",
})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
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


def gguf_to_hf_name(name: str) -> str | None:
    """The HF tensor name of a GGUF llama tensor, or None when it has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp converter's permute (HF rotate-half rows -> GGML interleaved rows)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``permute_qk_rows`` (transformers' ``_reverse_permute_weights``)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every GGUF key/value of the file at ``path`` as plain Python values (strings, numbers, lists)."""
    return GGUFFile.open(path).metadata


def check_tensor_types(tensors: dict[str, GGUFTensor], source: str) -> None:
    """Refuse a file holding any tensor type we cannot compute, naming every one (up to 8)."""
    bad = [(name, t.type_name) for name, t in sorted(tensors.items()) if t.type_name not in SUPPORTED_GGML_TYPES]
    if bad:
        listed = ", ".join(f"{name} ({kind})" for name, kind in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ModelLoadError(f"{source}: {len(bad)} tensor(s) have GGML types this node cannot compute: {listed}; "
                             f"supported: {', '.join(SUPPORTED_GGML_TYPES)}")


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], source: str) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source}: unsupported GGUF architecture {arch!r} (key 'general.architecture'); "
                          "supported: 'llama'")
    unknown = sorted(k for k in meta if k.startswith("llama.") and k.removeprefix("llama.") not in IMPLEMENTED_KEYS)
    if unknown:
        raise ConfigError(f"{source}: GGUF key {unknown[0]!r} (= {meta[unknown[0]]!r}) changes the computation and is not "
                          f"supported" + (f" (nor {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""))
    if int(meta.get("llama.expert_count", 0) or 0):
        raise ConfigError(f"{source}: mixture-of-experts models (llama.expert_count={meta['llama.expert_count']}) are not supported")

    def need(key: str) -> Any:
        if key not in meta:
            raise ConfigError(f"{source}: GGUF metadata is missing required key {key!r}")
        return meta[key]

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rot_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ConfigError(f"{source}: partial rotary embedding (llama.rope.dimension_count={rot_dim}, "
                          f"head_dim={head_dim}) is not supported")
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{source}: llama.attention.value_length differs from key_length; not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{source}: GGUF rope scaling ({scaling!r}, rope_freqs) is not supported yet; "
                          "load the Hugging Face checkpoint instead")
    vocab = len(meta.get("tokenizer.ggml.tokens") or []) or int(need("llama.vocab_size"))
    window = meta.get("llama.attention.sliding_window")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32_value(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_value(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=None,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        model_type="llama",
        sliding_window=int(window) if window else None,
    )


def _f32_value(x: Any) -> float:
    """GGUF stores these as float32: take the shortest decimal that is the same float32 (1e-05, not
    9.999999747378752e-06), so the config reads as the model card's and matches the HF config.json."""
    return float(str(np.float32(x)))


def load_gguf_checkpoint(path: str | Path) -> Checkpoint:
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    source = str(path)
    file = GGUFFile.open(path)
    meta, tensors = file.metadata, file.tensors
    config = config_from_metadata(meta, set(tensors), source)
    check_tensor_types(tensors, source)

    digest = WeightsDigest(len(tensors))
    weights: dict[str, np.ndarray] = {}
    stored_types = set()
    for name in sorted(tensors):
        t = tensors[name]
        type_name = t.type_name
        stored_types.add(type_name)
        raw = t.data  # a view of the memory map: the blocks are copied once, where they are kept
        digest.add(name, type_name, t.shape, memoryview(raw))
        hf_name = gguf_to_hf_name(name)
        if hf_name is None:
            raise ModelLoadError(f"{source}: unexpected GGUF tensor {name!r} for the llama architecture")
        # GGUF shape is ne order (fastest first); numpy order is its reverse.
        shape = [int(d) for d in reversed(t.shape)]
        if keeps_stored_form(type_name, shape):  # rows are [out_features]
            w = QuantizedTensor(type_name, (shape[0], shape[1]), np.array(raw).reshape(shape[0], -1))
        else:
            w = np.asarray(dequantize(raw, gguf.GGMLQuantizationType[type_name]), dtype=np.float32).reshape(shape)
        check_finite(name, type_name, w, source)
        if ".attn_q." in name or ".attn_k." in name:
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            w = w.with_rows(unpermute_qk_rows(w.blocks, heads)) if isinstance(w, QuantizedTensor) else unpermute_qk_rows(w, heads)
        weights[hf_name] = w if isinstance(w, QuantizedTensor) else np.ascontiguousarray(w, dtype=np.float32)

    check_weights(config, weights, source)
    tokenizer = TextTokenizer.from_gguf_metadata(meta, source=source)
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelLoadError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        weights_digest=digest.hexdigest(),
        weight_format="gguf:" + "+".join(sorted(stored_types)),
        source=source,
    )


__all__ = [
    "IMPLEMENTED_KEYS",
    "SUPPORTED_GGML_TYPES",
    "check_tensor_types",
    "config_from_metadata",
    "gguf_to_hf_name",
    "load_gguf_checkpoint",
    "permute_qk_rows",
    "unpermute_qk_rows",
]
