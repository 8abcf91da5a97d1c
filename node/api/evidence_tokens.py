"""Who may read an answer file: the client that received the answer, and the node's operator.

An answer file holds the prompt and the answer as token ids, and the model's tokenizer is
public, so whoever reads it reads the client's conversation in clear. Receipt ids are not
secrets (status pages, sidecar audit lists, logs and fraud proofs name them), so knowing one
must not be enough (issue 21, attack 11). Every answer therefore comes with a capability: its
*evidence token*, in the response's ``proofmesh`` object (and on the stream chunk that carries
the receipt), and ``GET /v1/receipts/{receipt_id}?token=TOKEN`` serves the file only with it.

    token  = hex(HMAC-SHA256(secret, utf8(receipt_id)))          64 hex digits
    secret = HKDF-SHA256(ikm = the node's 32-byte Ed25519 seed, salt = none,
                         info = EVIDENCE_TOKEN_INFO, length = 32)  (RFC 5869)

Derived, not stored: nothing new to keep or back up, and tokens survive restarts as long as the
key does. The identity key is never itself the HMAC key: HKDF with its own label gives a key
used for this and nothing else, so a token reveals nothing about the signing key and no other
use of the seed can collide with it. Comparisons run in constant time.

Without a valid token the node answers as for an unknown receipt (404), so a refusal does not
tell which receipt ids exist. The operator (``--operator-key``, ``node.api.errors.IS_OPERATOR``)
reads any answer file without one; so can whoever holds the key file, by computing the token.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from verify.identity import NodeKey

TOKEN_PARAM = "token"  # GET /v1/receipts/{receipt_id}?token=...
EVIDENCE_TOKEN_INFO = b"proofmesh/evidence-token/v1"  # HKDF label: this key serves evidence tokens only


class EvidenceTokens:
    """Issues and checks the evidence tokens of one node's answers."""

    def __init__(self, key: NodeKey):
        self._secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=EVIDENCE_TOKEN_INFO).derive(key.seed)

    def token(self, receipt_id: str) -> str:
        return hmac.new(self._secret, receipt_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def admits(self, receipt_id: str, token: str | None) -> bool:
        """Whether ``token`` is ``receipt_id``'s (constant time; a missing token never is)."""
        return token is not None and hmac.compare_digest(self.token(receipt_id).encode(), token.encode("utf-8", "surrogatepass"))


def _query(token: str | None) -> str:
    return f"?{urlencode({TOKEN_PARAM: token})}" if token else ""


def receipt_path(receipt_id: str, token: str | None) -> str:
    """The path (with query) that fetches an answer file from the node that signed it. Without a
    token it is the bare path, which only the operator may read."""
    return f"/v1/receipts/{quote(receipt_id, safe='')}{_query(token)}"


def peer_receipt_path(peer_id: str, receipt_id: str, token: str | None) -> str:
    """The path (with query) that fetches an answer file through a gateway from the peer that
    signed it (``node/api/peering.py``): the gateway passes the token on to the signer."""
    return f"/v1/peers/{quote(peer_id, safe='')}/receipts/{quote(receipt_id, safe='')}{_query(token)}"


__all__ = ["EVIDENCE_TOKEN_INFO", "TOKEN_PARAM", "EvidenceTokens", "peer_receipt_path", "receipt_path"]
