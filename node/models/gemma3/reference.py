"""Gemma 3's numpy forward (transformers' ``Gemma3ForCausalLM``, text only), written from the
architecture on top of the Llama reference's blocks; independent of TVM, float64 by default.

Per layer: ``x += post_attention_norm(attn(input_norm(x)))``, ``x += post_ffw_norm(mlp(pre_ffw_norm(x)))``;
QK-norm per head before RoPE; RoPE base ``rope_local_base_freq`` on sliding layers and ``rope_theta``
on global ones; a sliding layer's query at position t sees keys ``t - sliding_window < j <= t``
(transformers' ``sliding_window_causal``: ``kv_idx > q_idx - sliding_window``); scores scaled by
``query_pre_attn_scalar ** -0.5``; GeGLU with tanh-approximated GELU; the embedding times
``sqrt(hidden_size)``; logits soft-capped when configured. Norm weights are used as the
``Checkpoint`` holds them, ``1 + w`` (``node.models.gemma3.loader``).
"""

from __future__ import annotations

import math

import numpy as np

from node.models.llama.reference import NumpyLlama

from .config import Gemma3Config


class NumpyGemma3(NumpyLlama):
    def __init__(self, config: Gemma3Config, weights: dict[str, np.ndarray], dtype: type = np.float64) -> None:
        super().__init__(config, weights, dtype)
        d = config.head_dim
        self.local_inv_freq = 1.0 / (config.rope_local_base_freq ** (np.arange(0, d, 2, dtype=np.float64) / d))

    def _activation(self, gate: np.ndarray) -> np.ndarray:
        return 0.5 * gate * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))

    def _norm_qk(self, q: np.ndarray, k: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        p = f"model.layers.{i}.self_attn"
        return self._rms_norm(q, self.w[f"{p}.q_norm.weight"]), self._rms_norm(k, self.w[f"{p}.k_norm.weight"])

    def _inv_freq(self, i: int) -> np.ndarray:
        return self.local_inv_freq if self.cfg.sliding_layers[i] else self.inv_freq

    def _attention_scale(self) -> float:
        return self.cfg.query_pre_attn_scalar**-0.5

    def _hidden_keys(self, T: int, i: int) -> np.ndarray:
        hidden = super()._hidden_keys(T, i)
        if self.cfg.sliding_layers[i]:
            t, j = np.arange(T)[:, None], np.arange(T)[None, :]
            hidden |= j <= t - self.cfg.sliding_window
        return hidden

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return super()._embed(ids) * self.dtype.type(math.sqrt(self.cfg.hidden_size))

    def _layer(self, x: np.ndarray, i: int, positions: np.ndarray) -> np.ndarray:
        p, w = f"model.layers.{i}", self.w
        attn = self._attention(self._rms_norm(x, w[f"{p}.input_layernorm.weight"]), i, positions)
        x = x + self._rms_norm(attn, w[f"{p}.post_attention_layernorm.weight"])
        mlp = self._mlp(self._rms_norm(x, w[f"{p}.pre_feedforward_layernorm.weight"]), i)
        return x + self._rms_norm(mlp, w[f"{p}.post_feedforward_layernorm.weight"])

    def _head(self, hidden: np.ndarray) -> np.ndarray:
        logits = super()._head(hidden)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else cap * np.tanh(logits / cap)


__all__ = ["NumpyGemma3"]
