"""What the benchmarks need of llama-cpp-python (the ``bench`` extra), the baseline they run beside
TVM: kept apart from the node's modules, so a baseline's process imports neither TVM nor the node
(its OpenMP and TVM's thread pool must not share a process, and its resident memory stays its own)."""

from __future__ import annotations

import numpy as np


def last_logits(llm) -> np.ndarray:
    """The last evaluated position's logits of a llama-cpp-python ``Llama`` (its ``scores`` array
    stays zero in 0.3.x unless every position's logits are kept, so an argmax over it is token 0)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


__all__ = ["last_logits"]
