"""Warm starts: a loaded checkpoint, prepared once, reloaded in a fraction of the time.

Parsing the default GGUF (its 49k-entry vocabulary is read field by field) and dequantizing
its blocks takes ~5 s on 2 cores; reading the prepared tensors back through safetensors
takes well under a second. Weights are kept in the form they are served in: blocks and 16-bit
matrices as their stored bytes (``QuantizedTensor``), never a widened copy. The entry is keyed by the source's path, size and
modification time, so an edited or replaced model file is prepared afresh; the weights
digest and format are carried over from the real load, so ``model_id`` is unchanged.

    <store>/prepared/<key>/weights.safetensors   HF-named float32 tensors and uint8 blocks
    <store>/prepared/<key>/meta.json             config, digest, format, tokenizer, block types
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from node.models import architectures
from node.models.checkpoint import Checkpoint
from node.models.quant.blocks import QuantizedTensor
from node.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

PREPARED_VERSION = 3  # 2: quantized weights stored as blocks; 3: K-quants too, and 16-bit matrices kept 16-bit


def source_key(path: Path) -> str:
    """Identity of a model source on disk: every file's name, size and mtime."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(f"v{PREPARED_VERSION}:{path}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def _entry(root: Path, path: Path) -> Path:
    return Path(root) / "prepared" / source_key(path)


def load_prepared(root: Path, path: Path) -> Checkpoint | None:
    entry = _entry(root, path)
    meta_path, weights_path = entry / "meta.json", entry / "weights.safetensors"
    if not (meta_path.exists() and weights_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    shape = dict(meta["config"])
    tok = meta["tokenizer"]
    tokenizer = TextTokenizer(
        Tokenizer.from_str(tok["json"]),
        bos_token_id=tok["bos_token_id"],
        eos_token_ids=tok["eos_token_ids"],
        add_bos=tok["add_bos"],
        chat_template=tok["chat_template"],
        source=tok["source"],
    )
    weights: dict[str, np.ndarray | QuantizedTensor] = load_file(str(weights_path))
    for name, (ggml_type, rows, cols) in meta["quantized"].items():
        weights[name] = QuantizedTensor(ggml_type, (rows, cols), weights[name])
    return Checkpoint(
        config=architectures.of_model_type(shape["model_type"]).config_from_shape_dict(shape),
        weights=weights,
        tokenizer=tokenizer,
        weights_digest=meta["weights_digest"],
        weight_format=meta["weight_format"],
        source=meta["source"],
    )


def save_prepared(root: Path, path: Path, ckpt: Checkpoint) -> None:
    entry = _entry(root, path)
    if entry.exists():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tok = ckpt.tokenizer
    meta = {
        "config": ckpt.config.shape_dict(),
        "weights_digest": ckpt.weights_digest,
        "weight_format": ckpt.weight_format,
        "source": ckpt.source,
        "quantized": {n: [w.ggml_type, *w.shape] for n, w in ckpt.weights.items() if isinstance(w, QuantizedTensor)},
        "tokenizer": {
            "json": tok.tokenizer.to_str(),
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": list(tok.eos_token_ids),
            "add_bos": tok.add_bos,
            "chat_template": tok.chat_template,
            "source": tok.source,
        },
    }
    # Build in a temporary folder and rename it into place: a killed save leaves no entry.
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        arrays = {n: w.blocks if isinstance(w, QuantizedTensor) else w for n, w in ckpt.weights.items()}
        save_file(arrays, str(tmp / "weights.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, entry)
    except OSError as exc:  # a full disk costs the next start time, not this one
        log.warning("could not cache the prepared model: %s", exc)
        shutil.rmtree(tmp, ignore_errors=True)
