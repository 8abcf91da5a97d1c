"""A loaded checkpoint of any architecture: config, float32 weights in Hugging Face layout, tokenizer, digest.

Both source formats (a Hugging Face folder, a GGUF file) load into the same ``Checkpoint`` so the
model, the reference forward and the manifest never care where weights came from. Weight names and
layouts are those of ``transformers`` (``[out_features, in_features]``); an architecture may say
that a tensor holds a value derived from the HF one (Gemma 3's norm weights hold ``1 + w``, as
llama.cpp stores them: ``node.models.gemma3``).

``weights_digest`` identifies the weights *as stored in the source file* (DESIGN.md, Models:
``model_id``): sha256 over every tensor in name order, each as four length-prefixed fields —
name (UTF-8), stored type name (safetensors dtype such as ``BF16``, or GGML type such as ``Q4_1``),
shape as stored (safetensors: row-major; GGUF: ``ne`` order, fastest dimension first) written as
decimal numbers joined by ``,``, and the raw bytes. Every length prefix is 8 bytes big-endian; the
stream starts with a version tag and the tensor count. Quantized GGUF tensors are hashed as their
quantized blocks, so another quantization is another digest.

This module sits above the architecture folders: they and the loaders read it, it reads none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from node.errors import ModelLoadError
from node.models.quant.blocks import FORMATS, QuantizedTensor
from node.models.tokenizer import TextTokenizer

DIGEST_VERSION = b"proofmesh-weights-v1"


@dataclass
class Checkpoint:
    config: Any  # the architecture's frozen config dataclass (node.models.architectures)
    weights: dict[str, np.ndarray | QuantizedTensor]  # HF names -> float32 (C-contiguous) or blocks, HF layout
    tokenizer: TextTokenizer
    weights_digest: str  # hex sha256, see module docstring
    weight_format: str  # "safetensors:bf16", "gguf:F32+Q4_1+Q8_0": the stored types, sorted
    source: str  # the path it was loaded from

    def dequantized(self) -> "Checkpoint":
        """The same checkpoint with every quantized weight as float32 (the fp32 path)."""
        weights = {n: w.dequantize() if isinstance(w, QuantizedTensor) else w for n, w in self.weights.items()}
        return dataclasses.replace(self, weights=weights)

    def __repr__(self) -> str:
        return (
            f"Checkpoint(source={self.source!r}, format={self.weight_format}, "
            f"tensors={len(self.weights)}, digest={self.weights_digest[:16]}...)"
        )


def check_weights(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, Any], source: str) -> None:
    """Raise ``ModelLoadError`` naming the first missing, misshapen or unexpected tensor, given every
    tensor the architecture needs with the shape its config implies."""
    for name, shape in expected.items():
        if name not in weights:
            raise ModelLoadError(f"{source}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(weights[name].shape) != tuple(shape):
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {list(weights[name].shape)}, "
                f"expected {list(shape)} from the config"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ModelLoadError(f"{source}: unexpected tensors for this config: {', '.join(extra[:5])}"
                             + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))


def keeps_stored_form(type_name: str, shape: tuple[int, ...] | list[int]) -> bool:
    """Whether a tensor stays in its stored form (``QuantizedTensor``): a matrix of a block or
    16-bit type whose rows hold whole blocks. Anything else is read as float32."""
    fmt = FORMATS.get(type_name)
    return fmt is not None and len(shape) == 2 and shape[1] % fmt.block_values == 0


def check_finite(name: str, type_name: str, w: np.ndarray | QuantizedTensor, source: str) -> None:
    """Refuse a weight with NaN or infinite values (or block scales): served, it would answer NaN."""
    bad = w.non_finite() if isinstance(w, QuantizedTensor) else int(np.count_nonzero(~np.isfinite(w)))
    if bad:
        what = "scales" if isinstance(w, QuantizedTensor) and w.format.kind != "float" else "values"
        raise ModelLoadError(f"{source}: tensor {name!r} ({type_name}) has {bad} non-finite {what}; the file is damaged")


class WeightsDigest:
    """Incremental form of the digest in the module docstring; feed tensors in name order."""

    def __init__(self, n_tensors: int) -> None:
        self._h = hashlib.sha256()
        self._field(DIGEST_VERSION)
        self._field(str(n_tensors).encode("ascii"))
        self._last: str | None = None

    def _field(self, data: bytes | memoryview) -> None:
        self._h.update(len(data).to_bytes(8, "big"))
        self._h.update(data)

    def add(self, name: str, type_name: str, shape: Iterable[int], raw: bytes | memoryview | np.ndarray) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensors must be added in strictly increasing name order ({self._last!r}, {name!r})")
        self._last = name
        if isinstance(raw, np.ndarray):
            raw = memoryview(np.ascontiguousarray(raw)).cast("B")
        self._field(name.encode("utf-8"))
        self._field(type_name.encode("ascii"))
        self._field(",".join(str(int(d)) for d in shape).encode("ascii"))
        self._field(raw)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


__all__ = ["Checkpoint", "WeightsDigest", "check_finite", "check_weights", "keeps_stored_form"]
