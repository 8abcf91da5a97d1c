"""Quantized weights kept in llama.cpp's block formats (ggml-common.h), for native kernels.

A quantized model is defined by its quantized weights (DESIGN.md, Models): the blocks stored
in the GGUF file are the model, and any backend that dequantizes them and computes in fp32 is
an honest backend of the same ``model_id``. So the native path never changes a block: it only
splits each block into the arrays a kernel reads with vector loads.

The three block types, 32 weights a block, rows independent of each other:

    Q4_0  [d: f16][qs: 16 bytes]           w = (q - 8) * d   q = nibble
    Q4_1  [d: f16][m: f16][qs: 16 bytes]   w = q * d + m     q = nibble
    Q8_0  [d: f16][qs: 32 int8]            w = q * d

In ``qs`` of the 4-bit types, byte ``e`` (0..15) holds weight ``e`` in its low nibble and weight
``e + 16`` in its high nibble. The split arrays of a ``rows x cols`` matrix interleave each tile
of ``TILE_ROWS`` rows block by block, the order a kernel computing those rows together reads
them (one sequential stream per array instead of one per row: measured 1.8x faster on znver3):

    qweight  (rows / 8, cols / 32, 8, 16) uint8 for Q4_x, (..., 8, 32) int8 for Q8_0: the ``qs`` bytes
    scales   (rows / 8, cols / 32, 8) float16: every block's ``d``
    mins     (rows / 8, cols / 32, 8) float16: every block's ``m`` (Q4_1 only)

which is byte for byte the file's content, regrouped (no copy in float32 is ever made).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BLOCK = 32  # weights per block in every supported type
TILE_ROWS = 8  # rows interleaved in the split arrays (the CPU kernel's register tile)
SPLIT_LAYOUT_VERSION = 2  # bump when the split arrays change: compiled libraries are keyed by it


@dataclass(frozen=True)
class BlockFormat:
    name: str  # GGML type name
    block_bytes: int
    has_mins: bool
    bits: int  # 4 or 8

    def param_suffixes(self) -> tuple[str, ...]:
        return ("qweight", "scales", "mins") if self.has_mins else ("qweight", "scales")

    def param_shapes(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of each split array of a ``rows x cols`` matrix (module docstring)."""
        tiles, blocks = rows // TILE_ROWS, cols // BLOCK
        qs_bytes, qdtype = (BLOCK // 2, "uint8") if self.bits == 4 else (BLOCK, "int8")
        per_block = ((tiles, blocks, TILE_ROWS), "float16")
        shapes = {"qweight": ((tiles, blocks, TILE_ROWS, qs_bytes), qdtype), "scales": per_block}
        if self.has_mins:
            shapes["mins"] = per_block
        return shapes


FORMATS = {
    "Q4_0": BlockFormat("Q4_0", 18, has_mins=False, bits=4),
    "Q4_1": BlockFormat("Q4_1", 20, has_mins=True, bits=4),
    "Q8_0": BlockFormat("Q8_0", 34, has_mins=False, bits=8),
}


@dataclass
class QuantizedTensor:
    """A 2-D weight as stored blocks: ``blocks`` is uint8 (rows, cols / 32 * block_bytes)."""

    ggml_type: str
    shape: tuple[int, int]  # (rows, cols), the Hugging Face layout [out_features, in_features]
    blocks: np.ndarray

    def __post_init__(self) -> None:
        fmt = FORMATS[self.ggml_type]
        rows, cols = self.shape
        if cols % BLOCK or self.blocks.shape != (rows, cols // BLOCK * fmt.block_bytes):
            raise ValueError(f"{self.ggml_type} blocks of shape {self.blocks.shape} do not hold a {rows}x{cols} matrix")

    @property
    def format(self) -> BlockFormat:
        return FORMATS[self.ggml_type]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 (rows, cols), by the ``gguf`` package: the reference every kernel must match."""
        import gguf
        from gguf.quants import dequantize

        w = dequantize(self.blocks, gguf.GGMLQuantizationType[self.ggml_type])
        return np.ascontiguousarray(w, dtype=np.float32).reshape(self.shape)

    def with_rows(self, blocks: np.ndarray) -> "QuantizedTensor":
        """The same type with other rows (a row permutation or a concatenation)."""
        return QuantizedTensor(self.ggml_type, (blocks.shape[0], self.shape[1]), np.ascontiguousarray(blocks))

    def split(self) -> dict[str, np.ndarray]:
        """The kernel's arrays (module docstring); rows must come in whole tiles."""
        fmt = self.format
        rows, cols = self.shape
        if rows % TILE_ROWS:
            raise ValueError(f"{rows} rows do not split into tiles of {TILE_ROWS}")
        # (tile, row in tile, block, byte) -> (tile, block, row in tile, byte)
        b = self.blocks.reshape(rows // TILE_ROWS, TILE_ROWS, cols // BLOCK, fmt.block_bytes).transpose(0, 2, 1, 3)
        out = {"scales": np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]}
        start = 2
        if fmt.has_mins:
            out["mins"] = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0]
            start = 4
        qs = np.ascontiguousarray(b[..., start:])
        out["qweight"] = qs.view(np.int8) if fmt.bits == 8 else qs
        return out


def concat_rows(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Stack matrices of one type along rows (fusing q/k/v or gate/up keeps every block)."""
    if len({p.ggml_type for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
        raise ValueError("only matrices of one type and width can be fused")
    return parts[0].with_rows(np.concatenate([p.blocks for p in parts], axis=0))


def quantize(weights: np.ndarray, ggml_type: str) -> QuantizedTensor:
    """Quantize a float matrix into ``ggml_type`` blocks exactly as llama.cpp's reference does
    (the ``gguf`` package's numpy port), so the result could be written to a GGUF file."""
    import gguf
    from gguf.quants import quantize as gguf_quantize

    if ggml_type not in FORMATS:
        raise ValueError(f"cannot quantize to {ggml_type!r}; supported: {', '.join(FORMATS)}")
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"a {ggml_type} matrix needs 2 dimensions and columns in multiples of {BLOCK}, got {w.shape}")
    blocks = gguf_quantize(w, gguf.GGMLQuantizationType[ggml_type])
    return QuantizedTensor(ggml_type, (int(w.shape[0]), int(w.shape[1])), np.ascontiguousarray(blocks))


__all__ = ["BLOCK", "SPLIT_LAYOUT_VERSION", "TILE_ROWS", "BlockFormat", "FORMATS", "QuantizedTensor", "concat_rows", "quantize"]
