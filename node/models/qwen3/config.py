"""Qwen3 (dense) config: a Llama-family config whose attention norms q and k per head.

Qwen3 is Qwen2 without the q/k/v bias and with QK-norm (an RMSNorm over ``head_dim`` on every
query and key head, before RoPE; transformers' ``Qwen3Attention``), with ``head_dim`` given by the
config rather than ``hidden_size / heads``. Every other key means what it means for Llama, so the
class adds no field: QK-norm is what ``model_type == "qwen3"`` says, and the model type is hashed
into ``model_id`` with the rest of ``shape_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "Qwen3Config":
        # Released Qwen3 checkpoints write sliding_window beside use_sliding_window=false; the
        # window is in force only when that flag is set, and then it is not implemented here.
        if cfg.get("use_sliding_window"):
            raise ConfigError("Qwen3 with use_sliding_window=true is not supported (key 'use_sliding_window')")
        return super().from_hf_dict(cfg)


__all__ = ["Qwen3Config"]
