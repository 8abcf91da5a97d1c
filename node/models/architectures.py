"""The architecture registry: what each supported architecture is called by each source, and its parts.

One entry per ``model_type`` (the name hashed into ``model_id``), after MLC-LLM's ``MODELS`` dict:
the names a Hugging Face ``config.json`` gives it (``architectures``, ``model_type``) and the
``general.architecture`` a GGUF file gives it; its config class; its tensor names and shapes and
how each source stores them (the loaders' name maps); its TVM module (imported only when a
library is built: loading a checkpoint needs no TVM) and its numpy reference forward.

The loaders ask this module first, from ``config.json`` or the GGUF metadata alone, before any
tensor is read; anything else is refused with one line naming it and the supported list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from node.errors import ConfigError
from node.models.gemma3 import loader as gemma3_loader
from node.models.gemma3.config import Gemma3Config
from node.models.gemma3.reference import NumpyGemma3
from node.models.llama import checkpoint as llama_checkpoint
from node.models.llama import gguf_names as llama_gguf
from node.models.llama.config import LlamaConfig
from node.models.llama.reference import NumpyLlama
from node.models.qwen3 import loader as qwen3_loader
from node.models.qwen3.config import Qwen3Config
from node.models.qwen3.reference import NumpyQwen3


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the name in the config (and so in model_id); the compiled library is named after it
    hf_architectures: tuple[str, ...]  # config.json "architectures" entries
    hf_model_types: tuple[str, ...]  # config.json "model_type" values
    gguf_architectures: tuple[str, ...]  # GGUF "general.architecture" values
    config_class: type
    config_from_hf: Callable[[dict[str, Any]], Any]
    config_from_gguf: Callable[[Mapping[str, Any], set[str], str], Any]
    expected_weight_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    gguf_block_names: Mapping[str, str]  # GGUF per-layer tensor stem -> HF module under model.layers.N
    gguf_qk_permuted: bool  # llama.cpp's LlamaModel permutes q/k rows; the NEOX-RoPE converters do not
    reference: type  # numpy float64 forward: .from_checkpoint(ckpt).logits(ids)
    hf_weight_value: Callable[[str, np.ndarray], np.ndarray] = lambda name, w: w  # HF tensor -> Checkpoint value
    hf_stored_value: Callable[[str, np.ndarray], np.ndarray] = lambda name, w: w  # its inverse, for writing HF folders
    # The window of the sliding-window layers, None without any: the CPU build swaps in our sliding
    # kernels for it, and the runtime keeps prefill chunks within it (the cache's in-chunk attention
    # is causal but not windowed).
    sliding_window: Callable[[Any], int | None] = lambda config: None

    def model_class(self) -> type:
        """The ``tvm.relax.frontend.nn`` module (imported here, so loading needs no TVM)."""
        if self.model_type == "gemma3":
            from node.models.gemma3.model import Gemma3ForCausalLM

            return Gemma3ForCausalLM
        if self.model_type == "qwen3":
            from node.models.qwen3.model import Qwen3ForCausalLM

            return Qwen3ForCausalLM
        from node.models.llama.model import LlamaForCausalLM

        return LlamaForCausalLM

    def config_from_shape_dict(self, shape: dict[str, Any]) -> Any:
        """Inverse of the config's ``shape_dict()`` (JSON turned tuples into lists)."""
        if hasattr(self.config_class, "from_shape_dict"):
            return self.config_class.from_shape_dict(shape)
        shape = dict(shape)
        if shape.get("rope_scaling"):
            shape["rope_scaling"] = tuple(sorted(shape["rope_scaling"].items()))
        return self.config_class(**shape)


def _llama_family(model_type: str, hf_arch: str, gguf_archs: tuple[str, ...], permuted: bool) -> Architecture:
    return Architecture(
        model_type=model_type,
        hf_architectures=(hf_arch,),
        hf_model_types=(model_type,),
        gguf_architectures=gguf_archs,
        config_class=LlamaConfig,
        config_from_hf=LlamaConfig.from_hf_dict,
        config_from_gguf=lambda meta, names, source: llama_gguf.config_from_metadata(
            meta, names, source, LlamaConfig, model_type),
        expected_weight_shapes=llama_checkpoint.expected_weight_shapes,
        gguf_block_names=llama_gguf.BLOCK_NAMES,
        gguf_qk_permuted=permuted,
        reference=NumpyLlama,
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        # llama.cpp writes Mistral as "llama"; a "mistral" GGUF would come from the same LlamaModel converter.
        _llama_family("llama", "LlamaForCausalLM", ("llama",), permuted=True),
        _llama_family("mistral", "MistralForCausalLM", ("mistral",), permuted=True),
        _llama_family("qwen2", "Qwen2ForCausalLM", ("qwen2",), permuted=False),
        Architecture(
            model_type="qwen3",
            hf_architectures=("Qwen3ForCausalLM",),
            hf_model_types=("qwen3",),
            gguf_architectures=("qwen3",),
            config_class=Qwen3Config,
            config_from_hf=Qwen3Config.from_hf_dict,
            config_from_gguf=lambda meta, names, source: llama_gguf.config_from_metadata(
                meta, names, source, Qwen3Config, "qwen3"),
            expected_weight_shapes=qwen3_loader.expected_weight_shapes,
            gguf_block_names=qwen3_loader.GGUF_BLOCK_NAMES,
            gguf_qk_permuted=False,
            reference=NumpyQwen3,
        ),
        Architecture(
            model_type="gemma3",
            hf_architectures=("Gemma3ForCausalLM",),
            hf_model_types=("gemma3_text",),
            gguf_architectures=("gemma3",),
            config_class=Gemma3Config,
            config_from_hf=Gemma3Config.from_hf_dict,
            config_from_gguf=gemma3_loader.config_from_gguf,
            expected_weight_shapes=gemma3_loader.expected_weight_shapes,
            gguf_block_names=gemma3_loader.GGUF_BLOCK_NAMES,
            gguf_qk_permuted=False,
            reference=NumpyGemma3,
            hf_weight_value=gemma3_loader.hf_weight_value,
            hf_stored_value=gemma3_loader.hf_stored_value,
            sliding_window=lambda config: config.sliding_window,
        ),
    )
}
SUPPORTED_GGUF = {g: a for a in ARCHITECTURES.values() for g in a.gguf_architectures}
SUPPORTED_HF = {h: a for a in ARCHITECTURES.values() for h in a.hf_architectures}
_HF_MODEL_TYPES = {t: a for a in ARCHITECTURES.values() for t in a.hf_model_types}


def of_model_type(model_type: str) -> Architecture:
    """The entry of a config's ``model_type`` (what a config, a manifest or a library names)."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"unsupported architecture model_type={model_type!r}; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def of_config(config: Any) -> Architecture:
    return of_model_type(config.model_type)


def of_gguf(meta: Mapping[str, Any], source: str) -> Architecture:
    """The entry of a GGUF file's ``general.architecture``, or ``ConfigError`` naming it."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF:
        raise ConfigError(f"{source}: unsupported GGUF architecture {arch!r} (key 'general.architecture'); "
                          f"supported: {', '.join(repr(a) for a in SUPPORTED_GGUF)}")
    return SUPPORTED_GGUF[arch]


def of_hf_config(cfg: Mapping[str, Any], source: str) -> Architecture:
    """The entry of a ``config.json``: its first known ``architectures`` entry, which its
    ``model_type`` (when given) must agree with; or its ``model_type`` alone."""
    archs = cfg.get("architectures") or []
    if archs:
        known = [a for a in archs if a in SUPPORTED_HF]
        if not known:
            raise ConfigError(f"{source}: unsupported architecture {archs[0]!r} (key 'architectures'); "
                              f"supported: {', '.join(SUPPORTED_HF)}")
        entry = SUPPORTED_HF[known[0]]
        if "model_type" in cfg and cfg["model_type"] not in entry.hf_model_types:
            raise ConfigError(f"{source}: architectures={known[0]!r} but model_type={cfg['model_type']!r} "
                              "(key 'model_type')")
        return entry
    if "model_type" not in cfg:
        raise ConfigError(f"{source}: config.json names neither 'architectures' nor 'model_type'")
    if cfg["model_type"] not in _HF_MODEL_TYPES:
        raise ConfigError(f"{source}: unsupported model_type {cfg['model_type']!r} (key 'model_type'); "
                          f"supported: {', '.join(_HF_MODEL_TYPES)}")
    return _HF_MODEL_TYPES[cfg["model_type"]]


__all__ = ["ARCHITECTURES", "Architecture", "SUPPORTED_GGUF", "SUPPORTED_HF", "of_config", "of_gguf",
           "of_hf_config", "of_model_type"]
