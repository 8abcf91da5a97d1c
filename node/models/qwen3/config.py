"""Qwen3 (dense) config: a Llama-family config whose attention norms q and k per head.

Qwen3 is Qwen2 without the q/k/v bias and with QK-norm (an RMSNorm over ``head_dim`` on every
query and key head, before RoPE; transformers' ``Qwen3Attention``), with ``head_dim`` given by the
config rather than ``hidden_size / heads``. Every other key means what it means for Llama, so the
class adds no field: QK-norm is what ``model_type == "qwen3"`` says, and the model type is hashed
into ``model_id`` with the rest of ``shape_dict()``. A sliding window (``use_sliding_window``) is
served as Llama's is, by capping the context at the window (``LlamaConfig.context_limit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from node.errors import ConfigError
from node.models.llama.config import LlamaConfig


@dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    model_type: str = "qwen3"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_bias:
            raise ConfigError("Qwen3 with attention_bias=true is not supported (key 'attention_bias')")


__all__ = ["Qwen3Config"]
