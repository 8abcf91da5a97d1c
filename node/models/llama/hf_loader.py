"""Load a Hugging Face checkpoint folder of any registered architecture into a ``Checkpoint``.

The folder holds ``config.json``, one or several ``*.safetensors`` shards and the tokenizer files.
``config.json`` alone picks the architecture (``node.models.architectures``) before any tensor is
read. Names are kept as in ``transformers`` (the loader is an identity name map; an architecture
may derive a tensor's value, as Gemma 3 does for its norms); values become float32.

The safetensors format is read directly (8-byte little-endian header length, JSON header with
``dtype``/``shape``/``data_offsets`` per tensor, then the raw little-endian data; see
https://github.com/huggingface/safetensors#format) from a read-only memory map rather than through
``safetensors.numpy``: the weights digest needs every tensor's stored bytes anyway, and numpy has
no bfloat16 type, which ``safetensors.numpy`` cannot return. bf16 becomes float32 exactly by
shifting its 16 bits into the high half of a 32-bit word.

A folder written by ``save_quantized`` (``proofmesh compile FOLDER --quantize q8_0``) stores its
matrices as llama.cpp blocks: ``U8`` tensors of shape (rows, bytes per row), named in the
header's ``__metadata__["proofmesh.ggml_types"]`` (JSON: name -> [GGML type, rows, cols]). They
load as ``QuantizedTensor`` and enter the weights digest under their GGML type, so a quantized
folder has its own ``model_id``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import ConfigError, ModelLoadError
from node.models.tokenizer import TextTokenizer

from node.models.quant.blocks import BLOCK, FORMATS, QUANTIZED_TYPES, QuantizedTensor, quantize

from node.models import architectures
from node.models.checkpoint import Checkpoint, WeightsDigest, check_finite, check_weights, keeps_stored_form

log = logging.getLogger(__name__)

# HF ``architectures`` entry -> the ``model_type`` it implies.
SUPPORTED_ARCHITECTURES = {name: entry.model_type for name, entry in architectures.SUPPORTED_HF.items()}
# Stored dtype -> little-endian numpy dtype of the raw data (bf16 read as its bit pattern).
_STORED_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
QUANT_METADATA_KEY = "proofmesh.ggml_types"
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder does not exist: {folder}")
    cfg_dict = _read_config(folder)
    arch = architectures.of_hf_config(cfg_dict, str(folder))
    config = arch.config_from_hf({**cfg_dict, "model_type": arch.model_type})

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder}: no *.safetensors files (other weight formats are not supported)")
    stored: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}  # name -> (dtype, shape, raw bytes)
    for shard in shards:
        for name, entry in _read_safetensors(shard).items():
            if name in stored:
                raise ModelLoadError(f"{folder}: tensor {name!r} appears in more than one shard ({shard.name})")
            stored[name] = entry

    digest = WeightsDigest(len(stored))
    weights: dict[str, np.ndarray | QuantizedTensor] = {}
    for name in sorted(stored):
        dtype, shape, raw = stored[name]
        digest.add(name, dtype, shape, raw)
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            log.info("%s: ignoring stored lm_head.weight, the config ties it to the embedding", folder)
            continue
        if keeps_stored_form(dtype, shape):  # blocks, or a 16-bit matrix kept 16-bit
            weights[name] = QuantizedTensor(dtype, (shape[0], shape[1]), np.array(raw).reshape(shape[0], -1))
        else:
            weights[name] = arch.hf_weight_value(name, _to_float32(dtype, shape, raw))
        check_finite(name, dtype, weights[name], str(folder))

    if not config.tie_word_embeddings and "lm_head.weight" not in weights:
        raise ModelLoadError(
            f"{folder}: missing tensor 'lm_head.weight' while config.json says tie_word_embeddings=false"
        )
    check_weights(arch.expected_weight_shapes(config), weights, str(folder))
    tokenizer = TextTokenizer.from_hf_folder(folder, cfg_dict)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
        )
    stored_types = sorted({dtype.lower() for dtype, _, _ in stored.values()})
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        weights_digest=digest.hexdigest(),
        weight_format="safetensors:" + "+".join(stored_types),
        source=str(folder),
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: missing config.json (not a Hugging Face checkpoint folder?)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return cfg


def _read_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (stored dtype, shape, raw bytes as a uint8 view of a read-only memory map)."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot open {path}: {exc}") from exc
    if data.size < 8:
        raise ModelLoadError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > data.size - 8:
        raise ModelLoadError(f"{path}: not a safetensors file (header length {n} beyond the file)")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: unreadable safetensors header: {exc}") from exc
    base = 8 + n
    out = {}
    try:
        quantized = json.loads((header.get("__metadata__") or {}).get(QUANT_METADATA_KEY, "{}"))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: unreadable {QUANT_METADATA_KEY} metadata: {exc}") from exc
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        if dtype == "U8" and name in quantized:  # llama.cpp blocks: the type and the matrix shape from the metadata
            ggml_type, rows, cols = quantized[name]
            if ggml_type not in QUANTIZED_TYPES or (end - begin) != rows * cols // FORMATS[ggml_type].block_values * FORMATS[ggml_type].block_bytes:
                raise ModelLoadError(f"{path}: quantized tensor {name!r} ({ggml_type}, {rows}x{cols}) does not match its bytes")
            dtype, shape = ggml_type, (int(rows), int(cols))
            dtype_size = None
        elif dtype not in _STORED_DTYPES:
            if name.endswith(_IGNORED_SUFFIXES):
                dtype_size = None
            else:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(_STORED_DTYPES)}"
                )
        else:
            dtype_size = np.dtype(_STORED_DTYPES[dtype]).itemsize
        if dtype_size is not None and (end - begin) != dtype_size * int(np.prod(shape, dtype=np.int64)):
            raise ModelLoadError(f"{path}: tensor {name!r} byte range does not match its shape {list(shape)}")
        if base + end > data.size:
            raise ModelLoadError(f"{path}: tensor {name!r} lies beyond the end of the file (truncated?)")
        out[name] = (dtype, shape, data[base + begin:base + end])
    return out


def _to_float32(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> np.ndarray:
    values = np.frombuffer(raw, dtype=_STORED_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return np.ascontiguousarray((values.astype(np.uint32) << 16).view(np.float32))
    return np.array(values, dtype=np.float32, order="C")  # always a copy: no view into the file


def save_quantized(ckpt: Checkpoint, source: Path, out: Path, ggml_type: str) -> Path:
    """Write ``ckpt`` as a new checkpoint folder whose matrices are ``ggml_type`` blocks (llama.cpp's
    reference quantization; matrices whose width is not a multiple of 32 and 1-D tensors stay
    float32). The tokenizer and config files are copied from ``source``. The folder is written beside
    ``out`` and renamed into place, so it never appears half-written; an existing ``out`` is
    removed just before (a crash between the two leaves no folder, never a broken one)."""
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    quantized: dict[str, list] = {}
    arch = architectures.of_config(ckpt.config)
    for name, w in ckpt.weights.items():
        w = w.dequantize() if isinstance(w, QuantizedTensor) else w
        if w.ndim == 2 and w.shape[1] % BLOCK == 0:
            q = quantize(w, ggml_type)
            arrays[name] = q.blocks
            quantized[name] = [ggml_type, *q.shape]
        else:
            arrays[name] = np.ascontiguousarray(arch.hf_stored_value(name, w), dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        for f in source.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        save_file(arrays, str(tmp / "model.safetensors"), metadata={QUANT_METADATA_KEY: json.dumps(quantized)})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["QUANT_METADATA_KEY", "SUPPORTED_ARCHITECTURES", "load_hf_checkpoint", "save_quantized"]
