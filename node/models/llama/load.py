"""Loading a checkpoint from disk, whichever its format: the one module that knows both loaders
(a Hugging Face folder, ``hf_loader``; a GGUF file, ``gguf_loader``), so that each loader depends
only on the checkpoint types in ``checkpoint`` and nothing imports back."""

from __future__ import annotations

from pathlib import Path

from node.errors import ModelLoadError

from .checkpoint import Checkpoint
from .gguf_loader import load_gguf_checkpoint
from .hf_loader import load_hf_checkpoint


def load_checkpoint(path: str | Path, *, keep_quantized: bool = False) -> Checkpoint:
    """Load a Hugging Face checkpoint folder or a ``.gguf`` file; quantized GGUF weights stay
    in their blocks with ``keep_quantized``, else come out as float32."""
    ckpt = _load(Path(path))
    return ckpt if keep_quantized else ckpt.dequantized()


def _load(path: Path) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {p}")
    if p.is_dir():
        return load_hf_checkpoint(p)
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        return load_gguf_checkpoint(p)
    raise ModelLoadError(f"{p} is neither a Hugging Face checkpoint folder nor a GGUF file")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["load_checkpoint"]
