"""Llama-family architecture config (Llama 2/3, Qwen2, Mistral, SmolLM, TinyLlama).

One frozen dataclass: it is hashed into the model manifest (``model_id``) and keys the
compile cache, so it must not change after loading. ``from_hf_dict`` translates the aliases
that different ``transformers`` versions write and raises ``ConfigError`` naming the key.

Every config key that changes what the model computes is either implemented (and then a field
here, so two models that compute differently never share a ``model_id``) or refused by name
before any weight is read: ``REFUSED_WHEN`` lists the keys this architecture cannot compute
with the values it refuses. A sliding window is implemented exactly by serving no more context
than the window (``context_limit``): within it, windowed attention is full attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from node.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class DecoderShape:
    """The sizes every decoder architecture has, first in each config (and so in its manifest)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class LlamaConfig(DecoderShape):
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF ``rope_scaling`` dict (e.g. llama3) or None; stored as sorted items to stay hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 carries a bias on q/k/v projections
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    hidden_act: str = "silu"  # the MLP's gate activation: SwiGLU
    sliding_window: int | None = None  # attention window (Mistral, Qwen2 with use_sliding_window)
    # The model types this class describes; a subclass (Qwen3Config) names its own.
    MODEL_TYPES: ClassVar[tuple[str, ...]] = SUPPORTED_MODEL_TYPES

    def __post_init__(self) -> None:
        if self.model_type not in self.MODEL_TYPES:
            raise ConfigError(
                f"unsupported architecture model_type={self.model_type!r}; "
                f"supported: {', '.join(self.MODEL_TYPES)}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported activation hidden_act={self.hidden_act!r} (key 'hidden_act'); "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_attention_heads must be a multiple of num_key_value_heads "
                f"({self.num_attention_heads} vs {self.num_key_value_heads})"
            )

    @property
    def context_limit(self) -> int:
        """The longest context this model computes exactly: a sliding window bounds it."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

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
        refuse_computation_keys(cfg, "config.json")

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
            hidden_act=str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))),
            sliding_window=_hf_sliding_window(cfg, model_type),
        )


def _hf_sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    """The window the config's attention uses, or None: Mistral applies ``sliding_window``
    whenever it is set; Qwen2 and Qwen3 only with ``use_sliding_window``; ``layer_types`` (newer
    transformers) marks windowed layers ``sliding_attention``."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return None
    if "layer_types" in cfg and "sliding_attention" not in (cfg["layer_types"] or []):
        return None
    return int(window)


def refuse_computation_keys(cfg: dict[str, Any], source: str) -> None:
    """Raise ``ConfigError`` naming the first key whose value this architecture cannot compute."""
    for key, refused in REFUSED_WHEN.items():
        if key in cfg and refused(cfg[key]):
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported for the Llama family (key {key!r})")


def _set(value: Any) -> bool:
    return value not in (None, False, 0, 0.0)


SUPPORTED_ACTIVATIONS = ("silu",)
# Keys that change the computation which the Llama-family model does not implement, with the
# values it refuses (each would otherwise load and give other tokens under a wrong model_id).
REFUSED_WHEN = {
    "mlp_bias": _set,
    "attn_logit_softcapping": _set,
    "final_logit_softcapping": _set,
    "partial_rotary_factor": lambda v: v is not None and float(v) != 1.0,
    "quantization_config": _set,
    "num_experts": _set,
    "num_local_experts": _set,
    "embedding_multiplier": lambda v: v is not None and float(v) != 1.0,
    "logits_scaling": lambda v: v is not None and float(v) != 1.0,
    "residual_multiplier": lambda v: v is not None and float(v) != 1.0,
    "attention_multiplier": _set,
    "use_qk_norm": _set,
    "qk_layernorm": _set,
    "no_rope_layers": _set,
}


__all__ = ["DecoderShape", "REFUSED_WHEN", "SUPPORTED_ACTIVATIONS", "SUPPORTED_MODEL_TYPES", "LlamaConfig", "refuse_computation_keys"]
