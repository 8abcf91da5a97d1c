"""A GGUF file's metadata and tensor directory, read from a memory map in one pass.

Why not ``gguf.GGUFReader``: it builds a numpy view object for every element of every array,
so opening gemma-3-270m (262,144 tokens, their scores and types) took 31 s and 717 MB before a
single key could be looked at, and a file we refuse paid all of it. Here string arrays become
one Python list, numeric arrays one ``frombuffer``, and tensors stay views of the map: the same
file opens in well under a second, and everything a refusal needs (architecture, keys, tensor
types) is known before any tensor is touched. The ``gguf`` package still dequantizes.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian, version 2
or 3: magic ``GGUF``, u32 version, u64 tensor count, u64 key/value count; each key a string
(u64 length + UTF-8), a u32 value type and the value (arrays: u32 element type, u64 count,
elements); then per tensor its name, u32 dimension count, u64 dimensions (fastest first), u32
GGML type and u64 offset into the data section, which starts at the next multiple of
``general.alignment`` (32 by default). Every length and offset is checked against the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import ModelLoadError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types: (struct format, numpy dtype) of the scalar ones
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
            6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # GGML type name ("Q4_K"), or "type N" for one this gguf package does not know
    shape: tuple[int, ...]  # as stored: ne order, fastest dimension first
    data: np.ndarray  # uint8 view of the memory map

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]  # key -> str, int, float, bool or a list of them
    tensors: dict[str, GGUFTensor]

    @classmethod
    def open(cls, path: str | Path) -> "GGUFFile":
        import gguf

        path = Path(path)
        try:
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
        reader = _Cursor(memoryview(mapped), str(path))
        if reader.take(4) != MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic)")
        version = reader.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = reader.scalar("<Q"), reader.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = reader.string()
            dims = tuple(reader.scalar("<Q") for _ in range(reader.scalar("<I")))
            infos.append((name, dims, reader.scalar("<I"), reader.scalar("<Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        start = -(-reader.at // alignment) * alignment
        tensors = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                type_name = qtype.name
            except (ValueError, KeyError):
                type_name, block, type_size = f"type {type_id}", 1, 0
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            n_bytes = count // block * type_size
            begin = start + offset
            if name in tensors or begin + n_bytes > len(mapped) or count % block:
                raise ModelLoadError(f"{path}: tensor {name!r} is duplicated, misshapen or beyond the end of the file")
            tensors[name] = GGUFTensor(name, type_name, dims, mapped[begin:begin + n_bytes])
        return cls(metadata, tensors)


class _Cursor:
    """Reads little-endian fields from ``buf``, each checked against its end."""

    def __init__(self, buf: memoryview, source: str):
        self.buf, self.at, self.source = buf, 0, source

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.buf):
            raise ModelLoadError(f"{self.source}: GGUF header is truncated or corrupt (at byte {self.at})")
        out = self.buf[self.at:self.at + n]
        self.at += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return str(raw, "utf-8", errors="replace")  # llama.cpp vocabularies may hold broken UTF-8

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element, count = self.scalar("<I"), self.scalar("<Q")
            if element == _STRING:
                return [self.string() for _ in range(count)]
            if element not in _SCALARS:
                raise ModelLoadError(f"{self.source}: GGUF array of value type {element} is not supported")
            dtype = np.dtype(_SCALARS[element][1])
            values = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
            return values.astype(bool).tolist() if element == _BOOL else values.tolist()
        if kind not in _SCALARS:
            raise ModelLoadError(f"{self.source}: GGUF value type {kind} is not supported")
        value = self.scalar(_SCALARS[kind][0])
        return bool(value) if kind == _BOOL else value


__all__ = ["GGUFFile", "GGUFTensor"]
