"""The network end to end: a gateway (``--model none``) and three serving nodes, each its own
``proofmesh run`` process on 127.0.0.1 with only the gateway's address to start from.

One cluster for the module (starting processes is the slow part); the tests run in file order
and the last ones kill nodes on purpose.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import trio

from p2p.host import Host
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.p2p.cluster import Cluster, NodeProcess, warm_store
from verify.evidence import AnswerFile
from verify.identity import NodeKey, peer_id_from_public_key
from verify.receipts import Receipt, verify_receipt

DISCOVERY_TIMEOUT_S = 20.0
PROMPT = "hello world"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_model):
    """Gateway + B, C, D serving the tiny model, every one bootstrapped from the gateway only."""
    warm = tmp_path_factory.mktemp("warm")
    warm_store(warm, tiny_model)
    cluster = Cluster(tmp_path_factory.mktemp("nodes"), warm)
    try:
        gateway = cluster.wait_ready(cluster.start("gateway", []))
        servers = [cluster.start(n, [str(tiny_model)], bootstrap=[gateway.addrs[0]]) for n in ("b", "c", "d")]
        for s in servers:
            cluster.wait_ready(s)
        yield gateway, servers
    finally:
        cluster.close()


def _post(node: NodeProcess, path: str, body: dict, timeout: float = 60) -> tuple[int, dict, dict]:
    request = urllib.request.Request(node.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def _completion(node: NodeProcess, model: str, **extra) -> tuple[int, dict, dict]:
    return _post(node, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "seed": 1, **extra})


def _check_proof(proof: dict, served_by: str) -> Receipt:
    """The receipt verifies against the serving peer's key, and names that peer."""
    receipt = Receipt.model_validate(proof["receipt"])
    public_key = bytes.fromhex(proof["public_key"])
    assert peer_id_from_public_key(public_key) == receipt.node_id == served_by
    assert verify_receipt(receipt, proof["signature"], public_key)
    return receipt


def test_nodes_discover_each_other_from_one_bootstrap_address(mesh, tiny_model):
    gateway, servers = mesh
    everyone = [gateway, *servers]
    health = gateway.get("/health")
    assert health["peer_id"] == gateway.peer_id and health["models"] == []
    assert health["p2p_addrs"] and all(a.endswith(f"/p2p/{gateway.peer_id}") for a in health["p2p_addrs"])
    start = time.monotonic()
    while True:
        views = {n.name: {p["peer_id"] for p in n.get("/v1/peers")["data"]} for n in everyone}
        if all(views[n.name] == {m.peer_id for m in everyone if m is not n} for n in everyone):
            break
        assert time.monotonic() - start < DISCOVERY_TIMEOUT_S, f"not everyone found everyone: {views}"
        time.sleep(0.2)
    peers = {p["peer_id"]: p for p in servers[0].get("/v1/peers")["data"]}
    assert peers[gateway.peer_id]["models"] == []
    assert [m["name"] for m in peers[servers[1].peer_id]["models"]] == [tiny_model.name]
    models = gateway.get("/v1/models")["data"]
    assert [m["id"] for m in models] == [tiny_model.name]
    assert set(models[0]["peers"]) == {s.peer_id for s in servers}


def test_gateway_answers_through_a_peer(mesh, tiny_model):
    gateway, servers = mesh
    server_ids = {s.peer_id for s in servers}
    status, headers, body = _completion(gateway, tiny_model.name)
    assert status == 200, body
    assert headers["X-ProofMesh-Peer"] in server_ids
    _check_proof(body["proofmesh"], headers["X-ProofMesh-Peer"])
    direct = _completion(servers[0], tiny_model.name)[2]
    assert body["choices"][0]["text"] == direct["choices"][0]["text"]  # same seed, same model: same answer

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, seed=3)
    proof = chat.model_extra["proofmesh"]
    _check_proof(proof, proof["receipt"]["node_id"])
    assert proof["receipt"]["node_id"] in server_ids

    chunks = list(client.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, seed=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    last = chunks[-1].model_extra["proofmesh"]
    _check_proof(last, last["receipt"]["node_id"])

    status, _, body = _completion(gateway, "no-such-model")
    assert status == 400 and body["error"]["code"] == "model_not_found"


def test_verify_and_evidence_over_the_network(mesh, tiny_model):
    gateway, servers = mesh
    status, headers, body = _completion(gateway, tiny_model.name, max_tokens=12, temperature=0.8)
    signer = next(s for s in servers if s.peer_id == headers["X-ProofMesh-Peer"])
    receipt_id = body["proofmesh"]["receipt"]["receipt_id"]

    fetched = gateway.get(f"/v1/peers/{signer.peer_id}/receipts/{receipt_id}")
    answer = AnswerFile.model_validate(fetched)
    assert answer == AnswerFile.model_validate(signer.get(f"/v1/receipts/{receipt_id}"))
    assert verify_receipt(answer.receipt, answer.signature, bytes.fromhex(answer.public_key))

    status, _, attestation = _post(gateway, "/v1/peers/verify", fetched, timeout=120)
    assert status == 200, attestation
    verdict = attestation["verdict"]
    assert verdict["verifier_id"] != signer.peer_id and verdict["verifier_id"] in {s.peer_id for s in servers}
    assert verdict["verdict"]["verdict"] == "pass"
    assert len(attestation["fingerprints"]) == len(answer.evidence.output_ids)
    # The validator's own fingerprints match the committed ones (same model, same arithmetic).
    assert [f["ids"] for f in attestation["fingerprints"]] == [f.ids for f in answer.evidence.fingerprints]
    local = _local_verdict(answer, tiny_model, signer)
    assert verdict["verdict"] == local

    forged = answer.model_copy(update={"evidence": answer.evidence.model_copy(
        update={"output_ids": answer.evidence.output_ids[:-1] + [(answer.evidence.output_ids[-1] + 1) % 50]})})
    status, _, attestation = _post(gateway, "/v1/peers/verify", json.loads(forged.model_dump_json()), timeout=120)
    assert status == 200 and attestation["verdict"]["verdict"]["verdict"] == "fraud"
    assert attestation["verdict"]["verdict"] == _local_verdict(forged, tiny_model, signer)

    missing = urllib.request.Request(f"{gateway.url}/v1/peers/{signer.peer_id}/receipts/{'0' * 32}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(missing, timeout=30)
    assert err.value.code == 404


def _local_verdict(answer: AnswerFile, tiny_model: Path, signer: NodeProcess) -> dict:
    """``proofmesh verify`` run here, on the same model (a subprocess: the verifier's own CLI)."""
    import subprocess
    import sys

    from tests.p2p.cluster import REPO_ROOT

    path = signer.log.parent / f"answer-{answer.receipt.receipt_id}.json"
    path.write_text(answer.model_dump_json())
    env = {"PROOFMESH_HOME": str(signer.log.parent), "PATH": "/usr/bin:/bin"}
    import os

    done = subprocess.run([sys.executable, "-m", "node.cli", "verify", str(path), "--model", str(tiny_model),
                           "--device", "cpu"], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)
