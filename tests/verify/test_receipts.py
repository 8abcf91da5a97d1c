"""Identity keys, Merkle fingerprints and signed receipts."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from verify.canonical import output_hash
from verify.errors import IdentityError
from verify.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id
from verify.merkle import fingerprint_leaf, merkle_proof, merkle_root, verify_merkle_proof
from verify.receipts import Receipt, fingerprint_root, make_receipt, verify_receipt

FPS = [([5, 3, 9], [2.5, 1.25, -0.5]), ([7, 1, 2], [3.0, 2.0, 1.0]), ([2, 8, 4], [0.5, 0.25, 0.125])]


def signed(key=None, **over):
    key = key or NodeKey.generate()
    kwargs = dict(model_id="a" * 64, backend="tvm/llvm/znver3/fp32", request_hash="b" * 64, seed=42,
                  prompt_ids=[1, 2, 3], output_ids=[5, 7, 2], fingerprints=FPS, finish_reason="stop",
                  seed_source="client", evidence_hash="c" * 64)
    kwargs.update(over)
    return key, *make_receipt(key, **kwargs)


def test_key_file_is_private_and_reloads(tmp_path):
    path = tmp_path / "keys" / "node.key"
    key = NodeKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = NodeKey.load_or_create(path)
    assert again.node_id == key.node_id and again.public_key == key.public_key
    path.write_text("not a key")
    with pytest.raises(IdentityError):
        NodeKey.load_or_create(path)


def test_node_id_is_the_libp2p_peer_id():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    key = NodeKey.generate()
    pair = create_new_key_pair(key.seed)
    assert ID.from_pubkey(pair.public_key).to_base58() == key.node_id
    assert public_key_from_peer_id(key.node_id) == key.public_key
    with pytest.raises(IdentityError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA-style id


def test_receipt_signs_and_verifies():
    key, receipt, sig = signed()
    assert verify_receipt(receipt, sig, key.public_key)
    assert receipt.node_id == key.node_id == peer_id_from_public_key(key.public_key)
    assert receipt.output_hash == output_hash([5, 7, 2]) and receipt.n_prompt_tokens == 3
    assert receipt.fingerprint_root == fingerprint_root(FPS)


@pytest.mark.parametrize(
    "field,value",
    [("model_id", "c" * 64), ("request_hash", "d" * 64), ("seed", 43), ("n_output_tokens", 2),
     ("output_hash", "e" * 64), ("fingerprint_root", "f" * 64), ("finish_reason", "length"), ("backend", "cuda")],
)
def test_any_altered_field_breaks_the_signature(field, value):
    key, receipt, sig = signed()
    forged = receipt.model_copy(update={field: value})
    assert not verify_receipt(forged, sig, key.public_key)


def test_wrong_key_or_garbage_signature_fails():
    key, receipt, sig = signed()
    other = NodeKey.generate()
    assert not verify_receipt(receipt, sig, other.public_key)
    # another node re-signing the receipt under its own key does not pass either: node_id differs
    resigned = base64.b64encode(other.sign(receipt.signing_bytes())).decode()
    assert not verify_receipt(receipt, resigned, other.public_key)
    assert not verify_receipt(receipt, "!!not base64!!", key.public_key)


def test_receipt_ids_are_unique_and_schema_is_strict():
    key = NodeKey.generate()
    ids = {signed(key)[1].receipt_id for _ in range(50)}
    assert len(ids) == 50
    with pytest.raises(ValueError):
        Receipt(**{**signed(key)[1].model_dump(), "extra": 1})


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_merkle_proofs_prove_each_position(n):
    leaves = [fingerprint_leaf(i, [i, i + 1], [float(i), 0.5]) for i in range(n)]
    root = merkle_root(leaves)
    for i in range(n):
        proof = merkle_proof(leaves, i)
        assert verify_merkle_proof(leaves[i], i, n, proof, root)
        assert not verify_merkle_proof(fingerprint_leaf(i, [i, i + 1], [float(i), 0.75]), i, n, proof, root)
        if n > 1:
            assert not verify_merkle_proof(leaves[i], (i + 1) % n, n, proof, root)
    assert merkle_root(leaves[:-1]) != root if n > 1 else True
