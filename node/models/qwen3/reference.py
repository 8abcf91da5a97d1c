"""Qwen3's numpy forward: the Llama reference with QK-norm (an RMSNorm over ``head_dim`` of each
query and key head, with the layer's ``q_norm`` / ``k_norm`` weights, before RoPE; transformers'
``Qwen3Attention``). Independent of TVM; float64 by default."""

from __future__ import annotations

import numpy as np

from node.models.llama.reference import NumpyLlama


class NumpyQwen3(NumpyLlama):
    def _norm_qk(self, q: np.ndarray, k: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        p = f"model.layers.{i}.self_attn"
        return self._rms_norm(q, self.w[f"{p}.q_norm.weight"]), self._rms_norm(k, self.w[f"{p}.k_norm.weight"])


__all__ = ["NumpyQwen3"]
