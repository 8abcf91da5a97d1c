"""A plain numpy forward of the Llama family: the independent reference the TVM model is checked against.

Written from the architecture, not from ``model.py``: RMSNorm, rotary embeddings in the rotate-half
layout (HF ``LlamaRotaryEmbedding``; llama3 frequency scaling when configured), grouped-query
causal attention with optional q/k/v bias (Qwen2), SwiGLU MLP, tied or untied LM head. No cache:
``logits`` runs the whole sequence every time, which is what a verifier's teacher-forced pass does.
float64 by default so it is a reference for fp32 backends; ``dtype=np.float32`` for speed.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from .config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies (head_dim // 2,), with llama3 scaling when the config asks for it."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = cfg.rope_scaling_dict
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {scaling}")
    # transformers' _compute_llama3_parameters
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


class NumpyLlama:
    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], dtype: type = np.float64) -> None:
        self.cfg = config
        self.dtype = np.dtype(dtype)
        self.w = {k: np.asarray(v, dtype=self.dtype) for k, v in weights.items()}
        self.lm_head = self.w["model.embed_tokens.weight"] if config.tie_word_embeddings else self.w["lm_head.weight"]
        self.inv_freq = rope_inv_freq(config)  # (hd/2,), float64

    @classmethod
    def from_checkpoint(cls, ckpt, dtype: type = np.float64) -> "NumpyLlama":
        return cls(ckpt.config, ckpt.weights, dtype=dtype)

    # ------------------------------------------------------------------ building blocks

    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
        return x / np.sqrt(var + self.cfg.rms_norm_eps) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        """x: (n_heads, T, hd); rotate-half layout: pairs are (i, i + hd/2)."""
        freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (T, hd/2)
        emb = np.concatenate([freqs, freqs], axis=-1)  # (T, hd)
        cos, sin = np.cos(emb).astype(self.dtype), np.sin(emb).astype(self.dtype)
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half(x)
        return x * cos + rotated * sin

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T  # (T, out)
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _attention(self, x: np.ndarray, i: int, positions: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        T, nh, nkv, hd = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = f"model.layers.{i}.self_attn"
        q = self._linear(x, f"{p}.q_proj").reshape(T, nh, hd).transpose(1, 0, 2)  # (nh, T, hd)
        k = self._linear(x, f"{p}.k_proj").reshape(T, nkv, hd).transpose(1, 0, 2)  # (nkv, T, hd)
        v = self._linear(x, f"{p}.v_proj").reshape(T, nkv, hd).transpose(1, 0, 2)  # (nkv, T, hd)
        q, k = self._norm_qk(q, k, i)
        inv_freq = self._inv_freq(i)
        q, k = self._rope(q, positions, inv_freq), self._rope(k, positions, inv_freq)
        group = nh // nkv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # (nh, T, hd): head h uses kv h // group
        scores = q @ k.transpose(0, 2, 1) * self._attention_scale()  # (nh, T, T)
        hidden = self._hidden_keys(T, i)  # (T, T): key j is invisible to query t
        scores = np.where(hidden[None], -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(1, 0, 2).reshape(T, nh * hd)  # (T, nh*hd)
        return self._linear(out, f"{p}.o_proj")  # (T, C)

    def _mlp(self, x: np.ndarray, i: int) -> np.ndarray:
        p = f"model.layers.{i}.mlp"
        gate = self._linear(x, f"{p}.gate_proj")  # (T, I)
        up = self._linear(x, f"{p}.up_proj")  # (T, I)
        return self._linear(self._activation(gate) * up, f"{p}.down_proj")  # (T, C)

    # ------------------------------------------------------------------ what other architectures vary

    def _activation(self, gate: np.ndarray) -> np.ndarray:
        return gate / (1 + np.exp(-gate))  # SiLU

    def _norm_qk(self, q: np.ndarray, k: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """q (nh, T, hd), k (nkv, T, hd) before RoPE: Llama leaves them as projected."""
        return q, k

    def _inv_freq(self, i: int) -> np.ndarray:
        return self.inv_freq

    def _attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.head_dim)

    def _hidden_keys(self, T: int, i: int) -> np.ndarray:
        """Causal: query t sees keys 0..t."""
        return np.triu(np.ones((T, T), dtype=bool), k=1)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.w["model.embed_tokens.weight"][ids]  # (T, C)

    def _layer(self, x: np.ndarray, i: int, positions: np.ndarray) -> np.ndarray:
        p = f"model.layers.{i}"
        x = x + self._attention(self._rms_norm(x, self.w[f"{p}.input_layernorm.weight"]), i, positions)
        return x + self._mlp(self._rms_norm(x, self.w[f"{p}.post_attention_layernorm.weight"]), i)

    def _head(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.lm_head.T

    # ------------------------------------------------------------------ forward

    def hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        """Final normed hidden states (T, C) of a causal pass over ``token_ids`` from position 0."""
        ids = np.asarray(token_ids, dtype=np.int64)
        assert ids.ndim == 1 and ids.size > 0, "token_ids must be a non-empty 1-D sequence"
        assert ids.min() >= 0 and ids.max() < self.cfg.vocab_size, "token id outside the vocabulary"
        positions = np.arange(ids.size)
        x = self._embed(ids)  # (T, C)
        for i in range(self.cfg.num_hidden_layers):
            x = self._layer(x, i, positions)
        return self._rms_norm(x, self.w["model.norm.weight"])  # (T, C)

    def logits(self, token_ids: Sequence[int], from_position: int = 0) -> np.ndarray:
        """Logits at positions ``from_position..`` of a causal pass over ``token_ids``, (T - from, vocab):
        a large vocabulary's head is paid only for the rows asked for."""
        return self._head(self.hidden_states(token_ids)[from_position:])

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Iterable[int] = ()) -> list[int]:
        """Greedy continuation (argmax, lowest id on ties); stops after an EOS id, which is included."""
        eos = set(int(e) for e in eos_ids)
        ids, out = list(prompt_ids), []
        for _ in range(max_new_tokens):
            last = self._head(self.hidden_states(ids)[-1:])[0]  # (vocab,)
            tok = int(np.argmax(last))
            out.append(tok)
            ids.append(tok)
            if tok in eos:
                break
        return out


__all__ = ["NumpyLlama", "rope_inv_freq"]
