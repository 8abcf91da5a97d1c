"""Weights kept in their stored form for native kernels: llama.cpp's block formats
(ggml-common.h) and 16-bit floats.

A quantized model is defined by its quantized weights (DESIGN.md, Models): the blocks stored
in the GGUF file are the model, and any backend that dequantizes them and computes in fp32 is
an honest backend of the same ``model_id``. So the native path never changes a value: it only
regroups each block's bits into the arrays a kernel reads with vector loads, one sequential
stream per array. Each array of a ``rows x cols`` matrix interleaves a tile of ``TILE_ROWS``
rows block by block (tile, block, row in tile, ...), the order a kernel computing those rows
together reads them (measured 1.8x faster than row by row on znver3). Three kinds of format:

``legacy``: Q4_0, Q4_1, Q8_0, 32 weights a block, split as they are stored::

    Q4_0  [d: f16][qs: 16 bytes]           w = (q - 8) * d   q = nibble
    Q4_1  [d: f16][m: f16][qs: 16 bytes]   w = q * d + m     q = nibble
    Q8_0  [d: f16][qs: 32 int8]            w = q * d

  In ``qs`` of the 4-bit types, byte ``e`` (0..15) holds weight ``e`` in its low nibble and weight
  ``e + 16`` in its high nibble. Arrays: ``qweight`` (tiles, blocks, 8, 16 or 32), ``scales``
  and (Q4_1) ``mins`` (tiles, blocks, 8) float16.

``planes``: Q5_0, Q5_1 (32 weights a block) and the K-quants Q2_K..Q6_K (256-weight super-blocks
of 16 or 32-weight sub-blocks with packed 4/6/8-bit scales and mins). Every one is, per
sub-block of 32 weights and half ``h`` (weights ``16h .. 16h + 15``)::

    w = scale[h] * q + offset[h]     q unsigned, 2..6 bits
    scale[h] = d * sc[h]             (sc = 1 for Q5_x)
    offset[h] = -z * scale[h] - dmin * mn[h]    (K-quants with mins)   or  + m   (Q5_1)

  with ``d``/``dmin`` the (super-)block's f16 and ``sc``/``mn`` its small integers, exactly the
  products the ``gguf`` package forms (exact in fp32: an f16 times an integer of <= 8 bits).
  The bits of ``q`` are stored as planes per 32-weight block:

  - ``qlow``: the low 4 bits in the Q4 byte order above (16 bytes), or the low 2 bits (8 bytes,
    byte ``l`` holding weights ``l, 8+l, 16+l, 24+l`` at bits 0, 2, 4, 6);
  - ``qhigh`` (tiles, blocks, 8 x planes) uint32: plane ``p`` has bit ``e`` = bit ``low + p`` of
    weight ``e``'s q (one plane for 5-bit and Q3_K, two for Q6_K);
  - ``d`` (tiles, super-blocks, 8) f16; ``sc``, ``mn`` (tiles, blocks, 8 x halves) int8, halves
    = 2 where sub-blocks are 16 weights; ``dmin`` (tiles, super-blocks, 8) or ``m`` (Q5_1) f16.

  That is the stored information regrouped, within 4 % of the stored size for every type but
  Q2_K (3.1 bits a weight against 2.625: its 4-bit scale and min take a byte each).

``float``: F16 and BF16 matrices kept 16-bit, ``qweight`` (tiles, cols / 32, 8, 32) float16
(BF16: its bit patterns as uint16), widened in registers to exactly the float32 that widening
at load gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BLOCK = 32  # weights per (sub-)block the kernels step by
TILE_ROWS = 8  # rows interleaved in the split arrays (the CPU kernel's register tile)
SPLIT_LAYOUT_VERSION = 2  # bump when the split arrays change: compiled libraries are keyed by it
SUPER_BLOCK = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    """One stored type: how many bytes hold how many weights, and how the kernels read them."""

    name: str  # GGML type name
    block_bytes: int
    kind: str  # "legacy", "planes" or "float" (module docstring)
    bits: int  # bits of a stored quant (legacy: 4 or 8; planes: 2..6; float: 16)
    block_values: int = BLOCK  # weights per stored block
    has_mins: bool = False  # legacy Q4_1
    low_bits: int = 4  # planes: bits in qlow
    high_planes: int = 0  # planes: bit planes in qhigh
    halves: int = 1  # planes: scales per 32 weights (2: 16-weight sub-blocks)
    has_sc: bool = False  # planes: a per-sub-block integer scale (K-quants)
    offset: str = ""  # planes: "dmin" (- dmin * mn), "m" (+ m) or "" (only -z * scale)
    zero: int = 0  # planes: z, subtracted from q
    f16_fields: tuple[int, ...] = (0,)  # byte offsets of the block's f16 scales and mins

    @property
    def blocks_per_super(self) -> int:
        """32-weight blocks sharing one ``d`` (and ``dmin``)."""
        return self.block_values // BLOCK

    def param_suffixes(self) -> tuple[str, ...]:
        return tuple(self.param_shapes(TILE_ROWS, self.block_values))

    def param_shapes(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of each split array of a ``rows x cols`` matrix (module docstring)."""
        tiles, blocks = rows // TILE_ROWS, cols // BLOCK
        lead = (tiles, blocks, TILE_ROWS)
        if self.kind == "float":
            return {"qweight": ((*lead, BLOCK), "float16" if self.name == "F16" else "uint16")}
        if self.kind == "legacy":
            qs_bytes, qdtype = (BLOCK // 2, "uint8") if self.bits == 4 else (BLOCK, "int8")
            shapes = {"qweight": ((*lead, qs_bytes), qdtype), "scales": (lead, "float16")}
            if self.has_mins:
                shapes["mins"] = (lead, "float16")
            return shapes
        per_super = ((tiles, blocks // self.blocks_per_super, TILE_ROWS), "float16")
        shapes = {"qlow": ((*lead, BLOCK * self.low_bits // 8), "uint8")}
        if self.high_planes:
            shapes["qhigh"] = ((tiles, blocks, TILE_ROWS * self.high_planes), "uint32")
        shapes["d"] = per_super
        if self.has_sc:
            shapes["sc"] = ((tiles, blocks, TILE_ROWS * self.halves), "int8")
        if self.offset == "dmin":
            shapes["dmin"] = per_super
            shapes["mn"] = ((tiles, blocks, TILE_ROWS * self.halves), "int8")
        elif self.offset == "m":
            shapes["m"] = per_super
        return shapes


def _legacy(name: str, block_bytes: int, bits: int, has_mins: bool = False) -> BlockFormat:
    return BlockFormat(name, block_bytes, "legacy", bits, has_mins=has_mins, f16_fields=(0, 2) if has_mins else (0,))


def _planes(name: str, block_bytes: int, bits: int, block_values: int, **layout) -> BlockFormat:
    return BlockFormat(name, block_bytes, "planes", bits, block_values=block_values, **layout)


FORMATS = {
    "Q4_0": _legacy("Q4_0", 18, 4),
    "Q4_1": _legacy("Q4_1", 20, 4, has_mins=True),
    "Q8_0": _legacy("Q8_0", 34, 8),
    "Q5_0": _planes("Q5_0", 22, 5, BLOCK, high_planes=1, zero=16),
    "Q5_1": _planes("Q5_1", 24, 5, BLOCK, high_planes=1, offset="m", f16_fields=(0, 2)),
    "Q2_K": _planes("Q2_K", 84, 2, SUPER_BLOCK, low_bits=2, halves=2, has_sc=True, offset="dmin", f16_fields=(80, 82)),
    "Q3_K": _planes("Q3_K", 110, 3, SUPER_BLOCK, low_bits=2, high_planes=1, halves=2, has_sc=True, zero=4, f16_fields=(108,)),
    "Q4_K": _planes("Q4_K", 144, 4, SUPER_BLOCK, has_sc=True, offset="dmin", f16_fields=(0, 2)),
    "Q5_K": _planes("Q5_K", 176, 5, SUPER_BLOCK, high_planes=1, has_sc=True, offset="dmin", f16_fields=(0, 2)),
    "Q6_K": _planes("Q6_K", 210, 6, SUPER_BLOCK, high_planes=2, halves=2, has_sc=True, zero=32, f16_fields=(208,)),
    "F16": BlockFormat("F16", 64, "float", 16),
    "BF16": BlockFormat("BF16", 64, "float", 16),
}
QUANTIZED_TYPES = tuple(name for name, f in FORMATS.items() if f.kind != "float")


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian f16 fields (n, 2) uint8 -> (n,) float16."""
    return np.ascontiguousarray(raw).view(np.float16)[:, 0]


def _bits(raw: np.ndarray, count: int) -> np.ndarray:
    """(n, count / 8) uint8 -> (n, count) 0/1: bit ``i % 8`` of byte ``i // 8`` (little-endian)."""
    return np.unpackbits(raw, axis=1, count=count, bitorder="little")


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 2-bit quants: (n, 64) bytes -> (n, 256); weight ``128a + 32s + i`` is
    bits ``2s`` of byte ``32a + i``."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, 256)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> (n, 8) each."""
    from gguf.quants import Q4_K

    sc, mn = Q4_K.get_scale_min(scales)
    return sc.astype(np.int8), mn.astype(np.int8)


def decode_planes(ggml_type: str, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """(n, block_bytes) stored blocks -> q (n, values) uint8 unsigned, d (n,) f16 and, as the
    format has them, sc / mn (n, sub-blocks) int8 and dmin / m (n,) f16: the layouts of
    ggml-common.h, read as the ``gguf`` package's dequantize reads them."""
    n = blocks.shape[0]
    if ggml_type in ("Q5_0", "Q5_1"):
        offset = 4 if ggml_type == "Q5_1" else 2
        out = {"d": _f16(blocks[:, 0:2])}
        if ggml_type == "Q5_1":
            out["m"] = _f16(blocks[:, 2:4])
        qh = _bits(blocks[:, offset:offset + 4], 32)
        qs = blocks[:, offset + 4:]
        low = np.concatenate([qs & 15, qs >> 4], axis=1)  # weight e: byte e % 16, nibble e // 16
        return {**out, "q": low | (qh << 4)}
    if ggml_type == "Q2_K":
        scales = blocks[:, 0:16]
        return {"q": _crumbs(blocks[:, 16:80]), "sc": (scales & 15).astype(np.int8), "mn": (scales >> 4).astype(np.int8),
                "d": _f16(blocks[:, 80:82]), "dmin": _f16(blocks[:, 82:84])}
    if ggml_type == "Q3_K":
        high = _bits(blocks[:, 0:32], 256).reshape(n, 32, 8).transpose(0, 2, 1).reshape(n, 256)  # weight 32b + i: bit b of byte i
        packed = blocks[:, 96:108]
        low = (packed[:, 0:8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16) & 15
        top = (packed[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16) & 3
        sc = (low | (top << 4)).astype(np.int8) - np.int8(32)
        return {"q": _crumbs(blocks[:, 32:96]) | (high << 2), "sc": sc, "d": _f16(blocks[:, 108:110])}
    if ggml_type in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(blocks[:, 4:16])
        qs = blocks[:, 16:144] if ggml_type == "Q4_K" else blocks[:, 48:176]
        q = ((qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, 256)
        if ggml_type == "Q5_K":
            q = q | (_bits(blocks[:, 16:48], 256).reshape(n, 32, 8).transpose(0, 2, 1).reshape(n, 256) << 4)
        return {"q": q, "sc": sc, "mn": mn, "d": _f16(blocks[:, 0:2]), "dmin": _f16(blocks[:, 2:4])}
    if ggml_type == "Q6_K":
        ql = ((blocks[:, 0:128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, 256)
        qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, 256)
        return {"q": ql | (qh << 4), "sc": blocks[:, 192:208].view(np.int8), "d": _f16(blocks[:, 208:210])}
    raise ValueError(f"{ggml_type} is not a planes format")


def planes_dequantize(ggml_type: str, blocks: np.ndarray) -> np.ndarray:
    """float32 (n, values) from ``decode_planes`` by the formula of the module docstring: the
    values the kernels compute with (tests hold it equal to ``gguf``'s dequantize)."""
    fmt = FORMATS[ggml_type]
    parts = decode_planes(ggml_type, blocks)
    n, values = parts["q"].shape
    subs = values // (BLOCK // fmt.halves)
    d = parts["d"].astype(np.float32)[:, None]
    scale = d * parts["sc"].astype(np.float32) if fmt.has_sc else np.broadcast_to(d, (n, subs))
    offset = -np.float32(fmt.zero) * scale
    if fmt.offset == "dmin":
        offset = offset - parts["dmin"].astype(np.float32)[:, None] * parts["mn"].astype(np.float32)
    elif fmt.offset == "m":
        offset = offset + parts["m"].astype(np.float32)[:, None]
    q = parts["q"].astype(np.float32).reshape(n, subs, -1)
    return (scale[..., None] * q + offset[..., None]).reshape(n, values)


@dataclass
class QuantizedTensor:
    """A 2-D weight in its stored form: ``blocks`` is uint8 (rows, cols / values per block * block_bytes)."""

    ggml_type: str
    shape: tuple[int, int]  # (rows, cols), the Hugging Face layout [out_features, in_features]
    blocks: np.ndarray

    def __post_init__(self) -> None:
        fmt = FORMATS[self.ggml_type]
        rows, cols = self.shape
        if cols % fmt.block_values or self.blocks.shape != (rows, cols // fmt.block_values * fmt.block_bytes):
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

    def non_finite(self) -> int:
        """How many stored scales (or, for 16-bit floats, values) are NaN or infinite: a block with
        one dequantizes to NaN, so the loader refuses the file instead of serving NaN."""
        fmt = self.format
        blocks = self.blocks.reshape(-1, fmt.block_bytes)
        if fmt.kind == "float":
            values = blocks.view(np.uint16)
            exponent = (values >> 10) & 0x1F if fmt.name == "F16" else (values >> 7) & 0xFF
            return int(np.count_nonzero(exponent == (0x1F if fmt.name == "F16" else 0xFF)))
        return sum(int(np.count_nonzero(~np.isfinite(_f16(blocks[:, at:at + 2])))) for at in fmt.f16_fields)

    def with_rows(self, blocks: np.ndarray) -> "QuantizedTensor":
        """The same type with other rows (a row permutation or a concatenation)."""
        return QuantizedTensor(self.ggml_type, (blocks.shape[0], self.shape[1]), np.ascontiguousarray(blocks))

    def split(self) -> dict[str, np.ndarray]:
        """The kernel's arrays (module docstring); rows must come in whole tiles."""
        fmt = self.format
        rows, cols = self.shape
        if rows % TILE_ROWS:
            raise ValueError(f"{rows} rows do not split into tiles of {TILE_ROWS}")
        if fmt.kind == "legacy":
            return self._split_legacy()
        if fmt.kind == "float":
            values = self.blocks.view(np.float16 if fmt.name == "F16" else np.uint16).reshape(rows, cols // BLOCK, BLOCK)
            return {"qweight": _tiled(values)}
        return self._split_planes()

    def _split_legacy(self) -> dict[str, np.ndarray]:
        fmt = self.format
        rows, cols = self.shape
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

    def _split_planes(self) -> dict[str, np.ndarray]:
        fmt = self.format
        rows, cols = self.shape
        parts = decode_planes(self.ggml_type, self.blocks.reshape(-1, fmt.block_bytes))
        q = parts["q"].reshape(rows, cols // BLOCK, BLOCK)
        if fmt.low_bits == 4:  # byte e: weight e in the low nibble, e + 16 in the high one
            low = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
        else:  # byte l: weights l, 8 + l, 16 + l, 24 + l at bits 0, 2, 4, 6
            crumbs = (q & 3).reshape(rows, cols // BLOCK, 4, 8)
            low = crumbs[:, :, 0] | (crumbs[:, :, 1] << 2) | (crumbs[:, :, 2] << 4) | (crumbs[:, :, 3] << 6)
        out = {"qlow": _tiled(low.astype(np.uint8))}
        if fmt.high_planes:
            planes = [np.packbits((q >> (fmt.low_bits + p)) & 1, axis=-1, bitorder="little").view("<u4")
                      for p in range(fmt.high_planes)]
            out["qhigh"] = _tiled(np.concatenate(planes, axis=-1).astype(np.uint32)).reshape(rows // TILE_ROWS, cols // BLOCK, -1)
        supers = cols // fmt.block_values
        for name in ("d", "dmin", "m"):
            if name in parts:
                out[name] = _tiled(parts[name].reshape(rows, supers))
        for name in ("sc", "mn"):
            if name in parts:
                out[name] = _tiled(parts[name].reshape(rows, cols // BLOCK, fmt.halves)).reshape(rows // TILE_ROWS, cols // BLOCK, -1)
        return out


def _tiled(a: np.ndarray) -> np.ndarray:
    """(rows, blocks, ...) -> (rows / TILE_ROWS, blocks, TILE_ROWS, ...), contiguous."""
    rows, blocks = a.shape[:2]
    t = a.reshape(rows // TILE_ROWS, TILE_ROWS, blocks, *a.shape[2:]).swapaxes(1, 2)
    return np.ascontiguousarray(t)


def concat_rows(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Stack matrices of one type along rows (fusing q/k/v or gate/up keeps every block)."""
    if len({p.ggml_type for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
        raise ValueError("only matrices of one type and width can be fused")
    return parts[0].with_rows(np.concatenate([p.blocks for p in parts], axis=0))


QUANTIZABLE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # what the gguf package's numpy port quantizes


def quantize(weights: np.ndarray, ggml_type: str) -> QuantizedTensor:
    """Quantize a float matrix into ``ggml_type`` blocks exactly as llama.cpp's reference does
    (the ``gguf`` package's numpy port), so the result could be written to a GGUF file."""
    import gguf
    from gguf.quants import quantize as gguf_quantize

    if ggml_type not in QUANTIZABLE_TYPES:
        raise ValueError(f"cannot quantize to {ggml_type!r}; supported: {', '.join(QUANTIZABLE_TYPES)}")
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"a {ggml_type} matrix needs 2 dimensions and columns in multiples of {BLOCK}, got {w.shape}")
    blocks = gguf_quantize(w, gguf.GGMLQuantizationType[ggml_type])
    return QuantizedTensor(ggml_type, (int(w.shape[0]), int(w.shape[1])), np.ascontiguousarray(blocks))


__all__ = ["BLOCK", "FORMATS", "QUANTIZABLE_TYPES", "QUANTIZED_TYPES", "SPLIT_LAYOUT_VERSION", "SUPER_BLOCK", "TILE_ROWS",
           "BlockFormat", "QuantizedTensor", "concat_rows", "decode_planes", "planes_dequantize", "quantize"]
