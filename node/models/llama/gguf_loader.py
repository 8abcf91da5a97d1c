"""Load a llama.cpp GGUF file of any registered architecture into a ``Checkpoint``.

Read with ``node.models.gguf_file`` (a memory map; format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
``general.architecture`` picks the entry of ``node.models.architectures`` (``llama``, ``qwen2``,
``qwen3``, ``gemma3``; anything else is refused). The config comes from the ``{arch}.*`` metadata,
tensor names from the entry's name map, the tokenizer from ``tokenizer.ggml.*`` (see
``node.models.tokenizer``). Matrices of every type in ``node.models.quant.blocks.FORMATS`` (the
legacy and K-quant blocks, F16, BF16) stay in their stored form (``QuantizedTensor``, for the
native kernels); every other tensor is read as float32 with ``gguf.quants.dequantize``.

Everything that can refuse a file is decided from its header before any tensor or the
vocabulary is read: the architecture, every ``{arch}.*`` key (each one is implemented or refused
by name: ``gguf_names.IMPLEMENTED_KEYS`` for the Llama family) and every tensor's type (all the unsupported ones named at once).

Two layout facts of llama.cpp's converter (``convert_hf_to_gguf.py``) are undone here:

* GGUF lists dimensions fastest first (``ne``); the data is in numpy (row-major) order for the
  reversed shape, ``[out_features, in_features]`` for a matrix, which is the HF layout.
* For ``llama`` only (``LlamaModel``; Qwen2/Qwen3/Gemma 3 keep HF's rows for NEOX RoPE), the rows of
  ``attn_q`` (with ``n_head``) and ``attn_k`` (with ``n_head_kv``) are permuted from
  HF's rotate-half RoPE layout to GGML's interleaved one:
  ``w.reshape(n, 2, hd // 2, *rest).swapaxes(1, 2)``. ``unpermute_qk_rows`` is its inverse, as
  ``transformers``' ``_reverse_permute_weights``: ``w.reshape(n, hd // 2, 2, *rest).swapaxes(1, 2)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from node.errors import ModelLoadError
from node.models import architectures
from node.models.checkpoint import Checkpoint, WeightsDigest, check_finite, check_weights, keeps_stored_form
from node.models.gguf_file import GGUFFile, GGUFTensor
from node.models.tokenizer import TextTokenizer

from node.models.quant.blocks import FORMATS, QuantizedTensor

from .gguf_names import IMPLEMENTED_KEYS, config_from_metadata, gguf_to_hf_name

# Stored types we compute with; the block formats are those of ggml-common.h.
SUPPORTED_GGML_TYPES = ("F32", *FORMATS)


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


def load_gguf_checkpoint(path: str | Path) -> Checkpoint:
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    source = str(path)
    file = GGUFFile.open(path)
    meta, tensors = file.metadata, file.tensors
    arch = architectures.of_gguf(meta, source)  # refused from the header, before any tensor is touched
    config = arch.config_from_gguf(meta, set(tensors), source)
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
        hf_name = gguf_to_hf_name(name, arch.gguf_block_names)
        if hf_name is None:
            raise ModelLoadError(f"{source}: unexpected GGUF tensor {name!r} for the {arch.model_type} architecture")
        # GGUF shape is ne order (fastest first); numpy order is its reverse.
        shape = [int(d) for d in reversed(t.shape)]
        if keeps_stored_form(type_name, shape):  # rows are [out_features]
            w = QuantizedTensor(type_name, (shape[0], shape[1]), np.array(raw).reshape(shape[0], -1))
        else:
            w = np.asarray(dequantize(raw, gguf.GGMLQuantizationType[type_name]), dtype=np.float32).reshape(shape)
        check_finite(name, type_name, w, source)
        if arch.gguf_qk_permuted and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            w = w.with_rows(unpermute_qk_rows(w.blocks, heads)) if isinstance(w, QuantizedTensor) else unpermute_qk_rows(w, heads)
        weights[hf_name] = w if isinstance(w, QuantizedTensor) else np.ascontiguousarray(w, dtype=np.float32)

    check_weights(arch.expected_weight_shapes(config), weights, source)
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
