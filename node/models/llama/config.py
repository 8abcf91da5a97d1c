"""Llama-family architecture config (Llama 2/3, Qwen2, Mistral, SmolLM, TinyLlama).

One frozen dataclass: it is hashed into the model manifest (``model_id``) and keys the
compile cache, so it must not change after loading. ``from_hf_dict`` translates the aliases
that different ``transformers`` versions write and raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from node.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF ``rope_scaling`` dict (e.g. llama3) or None; stored as sorted items to stay hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 carries a bias on q/k/v projections
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    # The model types this class describes; a subclass (Qwen3Config) names its own.
    MODEL_TYPES: ClassVar[tuple[str, ...]] = SUPPORTED_MODEL_TYPES

    def __post_init__(self) -> None:
        if self.model_type not in self.MODEL_TYPES:
            raise ConfigError(
                f"unsupported architecture model_type={self.model_type!r}; "
                f"supported: {', '.join(self.MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_attention_heads must be a multiple of num_key_value_heads "
                f"({self.num_attention_heads} vs {self.num_key_value_heads})"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def shape_dict(self) -> dict[str, Any]:
        """Everything that fixes the compiled library's shapes and arithmetic."""
        d = asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict."""
        model_type = cfg.get("model_type", "llama")

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"config.json is missing required key {key!r}")
            return cfg[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        # transformers >= 5 nests theta and type in ``rope_parameters``.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ConfigError(f"unsupported rope_scaling type {rope_type!r} (key 'rope_scaling')")
            rope_scaling = None if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            model_type=model_type,
        )


__all__ = ["LlamaConfig", "SUPPORTED_MODEL_TYPES"]
