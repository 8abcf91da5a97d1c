"""Issue 21, attack 11: another client's conversation read from its answer file. Real servers on
127.0.0.1: a node on a tiny model (open, with an operator key) and a sidecar in front of it
(with an API key and its own operator key) that audits every answer, real SQLite behind both.

A client asks through the sidecar with a secret in its prompt. A second client, holding the
same API key or none, looks for the receipt id (before this change the node's open status page
and the sidecar's audit list showed it; now neither does, nor /health) and, knowing it anyway,
asks for the answer file: 404, as for a receipt that does not exist. The asking client opens it with the evidence token its
response carried; the operators read what is theirs. (Over p2p: tests/p2p/test_mesh.py.)
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx
import openai
import pytest

from node.api.evidence_tokens import EvidenceTokens, receipt_path
from node.runtime.model_runtime import CacheLimits
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import audited_node
from verify.evidence import AnswerFile
from verify.identity import NodeKey

LIMITS = CacheLimits(max_batch_size=4, max_total_tokens=1024, prefill_chunk=64)
MODEL = "tiny"
API_KEY = "sk-shared-by-many-clients"
NODE_OPERATOR = "op-node-secret"
SIDECAR_OPERATOR = "op-sidecar-secret"
SECRET = "my password is hunter2-violet"
AUDIT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def servers(tmp_path_factory, store):
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("privacy") / MODEL)
    with audited_node(folder, store, tmp_path_factory.mktemp("privacy-state"), limits=LIMITS, node_operator_keys=[NODE_OPERATOR],
                      sidecar_api_keys=[API_KEY], sidecar_operator_keys=[SIDECAR_OPERATOR]) as servers:
        yield servers


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_receipt_id_alone_opens_no_answer_file(servers):
    with openai.OpenAI(base_url=f"{servers.sidecar_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as asker:
        out = asker.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=4)
    proof = out.model_extra["proofmesh"]
    receipt_id, token = proof["receipt"]["receipt_id"], proof["evidence_token"]
    deadline = time.monotonic() + AUDIT_TIMEOUT_S
    while (audit := servers.ledger.audit(receipt_id)) is None or audit.state == "pending":
        assert time.monotonic() < deadline, "the audit did not settle"
        time.sleep(0.1)

    for path in ("/v1/audits", f"/v1/audits/{receipt_id}"):  # the sidecar's audits: not for its API key
        listed = httpx.get(servers.sidecar_url + path, headers=bearer(API_KEY))
        assert listed.status_code == 403 and listed.json()["error"]["code"] == "operator_only"
    for headers in ({}, bearer(API_KEY)):  # no key, or the key every client shares
        # The receipt id is on no page and no health report a client can read...
        for url in (servers.node_url, servers.sidecar_url):
            for path in ("/", "/health"):
                assert receipt_id not in httpx.get(url + path, headers=headers).text, (url, path)
        # ... and knowing it anyway opens nothing: the answer of a receipt that does not exist.
        for query in ("", "?token=", "?token=" + "0" * 64, f"?token={token[:-1]}"):
            refused = httpx.get(f"{servers.node_url}/v1/receipts/{receipt_id}{query}", headers=headers)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "receipt_not_found", query
        unknown = httpx.get(f"{servers.node_url}/v1/receipts/{'0' * 32}", headers=headers).json()
        assert refused.json()["error"]["message"] == unknown["error"]["message"].replace("0" * 32, receipt_id)

    # The asking client opens its own with its token, and reads its conversation back.
    answer = AnswerFile.model_validate_json(httpx.get(servers.node_url + receipt_path(receipt_id, token)).content)
    assert answer.receipt.receipt_id == receipt_id and SECRET in servers.model.tokenizer.decode(answer.evidence.prompt_ids)
    # The node's operator reads any answer file, and finds the receipts listed, linked with their tokens.
    assert httpx.get(f"{servers.node_url}/v1/receipts/{receipt_id}", headers=bearer(NODE_OPERATOR)).status_code == 200
    assert f'href="{receipt_path(receipt_id, token)[1:]}"' in httpx.get(f"{servers.node_url}/", headers=bearer(NODE_OPERATOR)).text
    # The sidecar's operator reads its audits; the node's operator key is nobody there.
    operator = bearer(SIDECAR_OPERATOR)
    assert receipt_id in {a["receipt_id"] for a in httpx.get(f"{servers.sidecar_url}/v1/audits", headers=operator).json()["data"]}
    assert httpx.get(f"{servers.sidecar_url}/v1/audits/{receipt_id}", headers=operator).json()["state"] == "pass"
    assert receipt_id in httpx.get(f"{servers.sidecar_url}/", headers=operator).text
    assert httpx.get(f"{servers.sidecar_url}/v1/audits", headers=bearer(NODE_OPERATOR)).status_code == 401


def test_the_streamed_receipt_carries_its_token(servers):
    with openai.OpenAI(base_url=f"{servers.node_url}/v1", api_key="none", max_retries=0, timeout=60) as client:
        chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True))
    (proof,) = [c.model_extra["proofmesh"] for c in chunks if c.model_extra.get("proofmesh")]
    fetched = httpx.get(servers.node_url + receipt_path(proof["receipt"]["receipt_id"], proof["evidence_token"]))
    assert fetched.status_code == 200 and AnswerFile.model_validate_json(fetched.content).receipt.receipt_id == proof["receipt"]["receipt_id"]


def test_tokens_follow_from_the_key_alone_and_only_through_its_own_label(tmp_path):
    """No storage: the same key file gives the same tokens after a restart; another key others.
    The identity seed is never the HMAC key itself (HKDF with the evidence-token label)."""
    receipt_id = "ab" * 16
    first, again = (EvidenceTokens(NodeKey.load_or_create(tmp_path / "node_key.pem")) for _ in range(2))
    token = first.token(receipt_id)
    assert len(token) == 64 and token == again.token(receipt_id) and again.admits(receipt_id, token)
    assert token != EvidenceTokens(NodeKey.generate()).token(receipt_id) and token != first.token("cd" * 16)
    seed = NodeKey.load_or_create(tmp_path / "node_key.pem").seed
    assert token != hmac.new(seed, receipt_id.encode(), hashlib.sha256).hexdigest()
    assert not first.admits(receipt_id, None) and not first.admits(receipt_id, "") and not first.admits(receipt_id, token.upper())
