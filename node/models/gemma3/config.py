"""Gemma 3 text config (``Gemma3ForCausalLM``, HF ``model_type`` ``gemma3_text``; GGUF ``gemma3``).

One frozen dataclass, hashed into ``model_id`` (``shape_dict()``) and keying the compile cache.
Every key of transformers' ``Gemma3TextConfig`` that changes the computation is a field here, or is
refused by name in ``from_hf_dict`` / ``__post_init__``:

- implemented: sizes, ``head_dim``, ``rms_norm_eps``, ``rope_theta`` (global layers) and
  ``rope_local_base_freq`` (sliding layers), ``sliding_window`` and ``layer_types`` (which layers
  slide; from ``sliding_window_pattern``, every 6th layer global, when the list is absent),
  ``query_pre_attn_scalar`` (attention scale ``1/sqrt(query_pre_attn_scalar)``),
  ``final_logit_softcapping`` (``cap * tanh(logits / cap)``, or none), ``hidden_activation``
  (``gelu_pytorch_tanh`` only), ``tie_word_embeddings``;
- refused: ``attn_logit_softcapping`` (the KV cache's attention kernels have no cap),
  ``rope_scaling`` other than none (the larger Gemma 3 scale the global RoPE linearly),
  ``attention_bias``, ``use_bidirectional_attention``.

transformers >= 5 writes the two RoPE bases as ``rope_parameters: {full_attention: {rope_theta},
sliding_attention: {rope_theta}}``; older configs write ``rope_theta`` and ``rope_local_base_freq``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from node.errors import ConfigError
from node.models.llama.config import DecoderShape

SLIDING, GLOBAL = "sliding_attention", "full_attention"  # transformers' names for the layer kinds
DEFAULT_SLIDING_PATTERN = 6  # Gemma 3: five sliding layers, then a global one (llama.cpp hard-codes it too)
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class Gemma3Config(DecoderShape):
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" or "full_attention"
    sliding_window: int  # keys a sliding layer sees, the query's own included
    query_pre_attn_scalar: int  # an int in transformers (256 for 270M; 168 = hidden / heads for 27B)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None  # refused unless None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # refused unless False
    max_position_embeddings: int = 32768
    model_type: str = "gemma3"

    def __post_init__(self) -> None:
        if self.model_type != "gemma3":
            raise ConfigError(f"Gemma3Config with model_type={self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_attention_heads must be a multiple of num_key_value_heads "
                f"({self.num_attention_heads} vs {self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, GLOBAL}:
            raise ConfigError(f"layer_types must name {self.num_hidden_layers} layers, each {SLIDING!r} or "
                              f"{GLOBAL!r} (key 'layer_types'): {list(self.layer_types)}")
        if self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, not {self.sliding_window} (key 'sliding_window')")
        if self.attention_bias:
            raise ConfigError("Gemma 3 with attention_bias=true is not supported (key 'attention_bias')")
        if self.attn_logit_softcapping is not None:
            raise ConfigError("attn_logit_softcapping is not supported (key 'attn_logit_softcapping'); "
                              "Gemma 3 does not use it")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_activation {self.hidden_activation!r} (key 'hidden_activation'); "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(kind == SLIDING for kind in self.layer_types)

    @property
    def context_limit(self) -> int:
        """The longest context computed exactly: all of it (the sliding layers window it themselves)."""
        return self.max_position_embeddings

    @property
    def rope_scaling_dict(self) -> None:
        """No RoPE scaling (refused at load): what the shared RoPE kernel swap asks of a config."""
        return None

    def shape_dict(self) -> dict[str, Any]:
        """Everything that fixes the compiled library's shapes and arithmetic."""
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_shape_dict(cls, d: dict[str, Any]) -> "Gemma3Config":
        return cls(**{**d, "layer_types": tuple(d["layer_types"])})

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "Gemma3Config":
        """Build from a Hugging Face ``config.json`` dict of ``Gemma3ForCausalLM``."""

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"config.json is missing required key {key!r}")
            return cfg[key]

        if cfg.get("use_bidirectional_attention"):
            raise ConfigError("Gemma 3 with use_bidirectional_attention=true is not supported "
                              "(key 'use_bidirectional_attention')")
        rope_params = cfg.get("rope_parameters") or {}
        global_rope = rope_params.get(GLOBAL, {}) if isinstance(rope_params.get(GLOBAL), dict) else rope_params
        local_rope = rope_params.get(SLIDING, {}) if isinstance(rope_params.get(SLIDING), dict) else {}
        for where, params in (("rope_scaling", cfg.get("rope_scaling")), ("rope_parameters", global_rope),
                              ("rope_parameters", local_rope)):
            rope_type = (params or {}).get("rope_type", (params or {}).get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"unsupported RoPE scaling {rope_type!r} for Gemma 3 (key {where!r})")
        n_layers = int(need("num_hidden_layers"))
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", DEFAULT_SLIDING_PATTERN)))
            layer_types = [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        heads = int(need("num_attention_heads"))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim", 256)),
            layer_types=tuple(layer_types),
            sliding_window=int(need("sliding_window")),
            query_pre_attn_scalar=int(cfg.get("query_pre_attn_scalar", 256)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", global_rope.get("rope_theta", 1_000_000.0))),
            rope_local_base_freq=float(cfg.get("rope_local_base_freq", local_rope.get("rope_theta", 10_000.0))),
            final_logit_softcapping=_optional_float(cfg.get("final_logit_softcapping")),
            attn_logit_softcapping=_optional_float(cfg.get("attn_logit_softcapping")),
            hidden_activation=str(cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        )


def _optional_float(x: Any) -> float | None:
    return None if x is None else float(x)


__all__ = ["DEFAULT_SLIDING_PATTERN", "GLOBAL", "Gemma3Config", "SLIDING"]
