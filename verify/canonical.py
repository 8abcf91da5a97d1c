"""Canonical encoding and hashes shared by model ids, requests, outputs and receipts.

Canonical JSON: UTF-8, keys sorted, no whitespace, no NaN/Infinity. Floats are written with
Python's shortest round-trip repr (``json.dumps`` does this), so every implementation that
follows IEEE-754 shortest-repr formatting produces the same bytes; integers are exact.
Hashes are SHA-256, written as lowercase hex.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def _check_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("canonical JSON cannot encode NaN or infinity")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical JSON keys must be strings, got {type(k).__name__}")
            _check_finite(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_finite(v)


def canonical_json(value: Any) -> bytes:
    """The one byte string that encodes ``value`` (dicts, lists, str, int, float, bool, None)."""
    _check_finite(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))




def request_hash(model_id: str, prompt_ids: list[int], sampling: dict[str, Any]) -> str:
    """Commitment to a request: the model, the prompt ids after templating, every sampling
    parameter (seed included). A receipt bound to one request cannot be replayed for another."""
    return canonical_hash({"model_id": model_id, "prompt_ids": list(prompt_ids), "sampling": sampling})


def output_hash(output_ids: list[int]) -> str:
    """Commitment to the answer's token ids."""
    return canonical_hash({"output_ids": list(output_ids)})


__all__ = ["canonical_json", "canonical_hash", "sha256_hex", "request_hash", "output_hash"]
