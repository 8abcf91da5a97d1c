"""Merkle tree over per-position fingerprints (RFC 6962, section 2.1), so one position of an
answer can later be proven against the ``fingerprint_root`` a receipt signs.

    MTH({})    = SHA-256()
    MTH({d})   = SHA-256(0x00 || d)
    MTH(D[n])  = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])),  k the largest power of 2 < n

The 0x00/0x01 prefixes keep a leaf from passing for an inner node (second-preimage attacks).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from verify.canonical import canonical_json


def fingerprint_leaf(position: int, token_ids: Sequence[int], logits: Sequence[float]) -> bytes:
    """The leaf bytes of one output position: its top-k ids and logits, canonically encoded."""
    return canonical_json({"p": int(position), "ids": [int(i) for i in token_ids], "logits": [float(x) for x in logits]})


def _leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return _leaf_hash(leaves[0])
    k = _split(len(leaves))
    return _node_hash(_root(leaves[:k]), _root(leaves[k:]))


def merkle_root(leaves: Sequence[bytes]) -> str:
    return _root(leaves).hex()


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[str]:
    """The audit path of leaf ``index`` (RFC 6962 PATH), bottom-up, as hex digests."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} outside a tree of {len(leaves)}")
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return merkle_proof(leaves[:k], index) + [_root(leaves[k:]).hex()]
    return merkle_proof(leaves[k:], index - k) + [_root(leaves[:k]).hex()]


def verify_merkle_proof(leaf: bytes, index: int, size: int, proof: Sequence[str], root: str) -> bool:
    """Whether ``leaf`` sits at ``index`` of a ``size``-leaf tree with this ``root``."""
    if not 0 <= index < size:
        return False

    def climb(index: int, size: int, path: list[bytes]) -> bytes | None:
        if size == 1:
            return _leaf_hash(leaf) if not path else None
        if not path:
            return None
        k = _split(size)
        sibling = path[-1]
        if index < k:
            inner = climb(index, k, path[:-1])
            return None if inner is None else _node_hash(inner, sibling)
        inner = climb(index - k, size - k, path[:-1])
        return None if inner is None else _node_hash(sibling, inner)

    try:
        path = [bytes.fromhex(p) for p in proof]
    except ValueError:
        return False
    computed = climb(index, size, path)
    return computed is not None and computed.hex() == root
