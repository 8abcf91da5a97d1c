"""Node identity: one Ed25519 key (RFC 8032) signs receipts and verdicts and is the libp2p identity.

The key file is PKCS#8 PEM, created with mode 0600 on first use. The node id is the libp2p peer
id of the public key (identity multihash of the protobuf-encoded key, base58btc), so anyone can
check a signature from the node id alone, and a libp2p stream's remote peer id names the signer.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from verify.errors import IdentityError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p's PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_ED25519_PROTOBUF_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"  # identity hash, 36-byte digest (the protobuf above)


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\x00"))) + out


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        if ch not in _B58:
            raise IdentityError(f"not base58: {ch!r}")
        n = n * 58 + _B58.index(ch)
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * (len(text) - len(text.lstrip("1"))) + body


def peer_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise IdentityError("an Ed25519 public key has 32 bytes")
    return _b58encode(_IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    raw = _b58decode(peer_id)
    prefix = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise IdentityError(f"{peer_id!r} is not the peer id of an Ed25519 key")
    return raw[len(prefix) :]


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def verify_signed_by(node_id: str, public_key: bytes, data: bytes, signature_b64: str) -> bool:
    """True iff ``public_key`` is ``node_id``'s key and ``signature_b64`` (base64) is its
    signature of ``data``: how receipts and verdicts are attributed to a node."""
    if peer_id_from_public_key(public_key) != node_id:
        return False
    try:
        raw = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        return False
    return verify_signature(public_key, data, raw)


class NodeKey:
    """A node's Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> "NodeKey":
        return cls(Ed25519PrivateKey.generate())

    @property
    def seed(self) -> bytes:
        """The raw 32-byte private seed (what libp2p's ``create_identity_from_seed`` takes)."""
        return self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def sign_base64(self, data: bytes) -> str:
        """The signature as base64 text, the form receipts and verdicts carry."""
        return base64.b64encode(self.sign(data)).decode()

    @classmethod
    def load_or_create(cls, path: str | Path) -> "NodeKey":
        """Load the key file, or create it (mode 0600, never overwriting) if it does not exist.
        A key file that group or others may read or write is refused: it is the node's identity."""
        path = Path(path).expanduser()
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise IdentityError(f"{path} is readable or writable by others (mode {mode:o}): anyone who reads it can "
                                    f"sign as this node; run 'chmod 600 {path}'")
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise IdentityError(f"{path} is not a PEM private key: {exc}") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
            return cls(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        node_key = cls.generate()
        pem = node_key._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # fails rather than overwrite
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return node_key
