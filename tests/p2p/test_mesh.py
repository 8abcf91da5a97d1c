"""The network end to end: a gateway (``--model none``) and three serving nodes, each its own
``proofmesh run`` process on 127.0.0.1 with only the gateway's address to start from.

One cluster for the module (starting processes is the slow part); the tests run in file order
and the last ones kill nodes on purpose.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import multiaddr
import openai
import pytest
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from node.api.evidence_tokens import peer_receipt_path, receipt_path
from p2p.errors import StreamFailed
from p2p.host import Host
from p2p.wire import (
    CAPS_MAX_BYTES,
    CAPS_PROTOCOL,
    EVIDENCE_PROTOCOL,
    INFER_PROTOCOL,
    FRAUD_PROTOCOL,
    VERIFY_PROTOCOL,
    Capability,
    FraudNotice,
    CapsExchange,
    SignedCapability,
    encode_varint,
    frame,
)
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.p2p.cluster import LOOPBACK, REPO_ROOT, Cluster, NodeProcess, warm_store
from tests.verify.test_evidence_store import make_answer
from verify.evidence import AnswerFile
from verify.fraud import FraudProof, sign_verdict
from verify.verifier import Verdict
from verify.identity import NodeKey, peer_id_from_public_key
from verify.receipts import Receipt, verify_receipt

DISCOVERY_TIMEOUT_S = 20.0
PROMPT = "hello world"
PROTOCOLS = (CAPS_PROTOCOL, INFER_PROTOCOL, VERIFY_PROTOCOL, EVIDENCE_PROTOCOL, FRAUD_PROTOCOL)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_model, store):
    """Gateway + B, C, D serving the tiny model, every one bootstrapped from the gateway only."""
    warm_store(store, tiny_model)  # the session's build of the tiny shape
    cluster = Cluster(tmp_path_factory.mktemp("nodes"), store)
    try:
        gateway = cluster.wait_ready(cluster.start("gateway", []))
        servers = [cluster.start(n, [str(tiny_model)], bootstrap=[gateway.addrs[0]], extra=extra)
                   for n, extra in (("b", []), ("c", []), ("d", ["--max-queue", "1"]))]  # d fills up at once
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
    listed = subprocess.run([sys.executable, "-m", "node.cli", "peers", "--node", gateway.url], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"node {gateway.peer_id}: 3 peer(s)" in listed.stdout
    assert all(s.peer_id in listed.stdout for s in servers) and tiny_model.name in listed.stdout


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
    receipt_id, token = body["proofmesh"]["receipt"]["receipt_id"], body["proofmesh"]["evidence_token"]

    # Through the gateway over /proofmesh/evidence/1: the signer serves the file for its token only.
    fetched = gateway.get(peer_receipt_path(signer.peer_id, receipt_id, token))
    answer = AnswerFile.model_validate(fetched)
    assert answer == AnswerFile.model_validate(signer.get(receipt_path(receipt_id, token)))
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
    # Altered evidence under the signer's receipt is nobody's: unattributable, never fraud.
    assert status == 200 and attestation["verdict"]["verdict"]["verdict"] == "unattributable"
    assert attestation["verdict"]["verdict"] == _local_verdict(forged, tiny_model, signer)

    # No way around the token: without it, or with another, the gateway gets nothing from the signer.
    for path in (peer_receipt_path(signer.peer_id, "0" * 32, token), peer_receipt_path(signer.peer_id, receipt_id, None),
                 peer_receipt_path(signer.peer_id, receipt_id, "0" * 64)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(gateway.url + path, timeout=30)
        assert err.value.code == 404, path


def _local_verdict(answer: AnswerFile, tiny_model: Path, signer: NodeProcess) -> dict:
    """``proofmesh verify`` run here, on the same model (the verifier's own CLI, in the signer's
    store so the library is already compiled)."""
    path = signer.log.parent / f"answer-{answer.receipt.receipt_id}.json"
    path.write_text(answer.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "node.cli", "verify", str(path), "--model", str(tiny_model),
                           "--device", "cpu"], cwd=REPO_ROOT, env={**os.environ, "PROOFMESH_HOME": str(signer.log.parent)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1, 2), done.stderr  # 2: a verdict on input that is not the node's
    return json.loads(done.stdout)


# ---------------------------------------------------------------------- hostile peers


def _rejections(node: NodeProcess) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(node.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.findall(r'proofmesh_p2p_rejected_messages_total\{protocol="([^"]+)",reason="([^"]+)"\} ([0-9.e+]+)', text)
    return {(p, r): float(v) for p, r, v in found}


async def _attack(target: NodeProcess) -> None:
    """Open every protocol of ``target`` over a valid Noise connection and send it garbage."""
    key = NodeKey.generate()
    host = Host(key, lambda protocol, reason: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, [LOOPBACK])
        await host.connect(target.addrs[0])
        for protocol in PROTOCOLS:
            for raw in (frame(b"not json at all"), encode_varint(1 << 30) + b"x", b"\xff" * 6,
                        frame(b'{"unexpected": 1}')):
                try:  # past the peer's budget on a protocol (verify: 2 at a burst) the stream is reset at once
                    stream = await host.open(target.peer_id, protocol, CAPS_MAX_BYTES)
                    await stream.stream.write(raw)  # the raw libp2p stream: its own StreamReset, untranslated
                except (StreamFailed, StreamReset):
                    continue
                with pytest.raises(StreamFailed):  # the node resets the stream, it sends nothing back
                    await stream.read_frame(timeout=5)
        # Capability records: one signed by the wrong key (posing as another peer), one expired.
        victim, now = NodeKey.generate(), time.time()
        forged = Capability(peer_id=victim.node_id, models=[], load=0, addrs=[], issued=now, expires=now + 30)
        expired = Capability(peer_id=key.node_id, models=[], load=0, addrs=host.addrs, issued=now - 60, expires=now - 30)
        message = CapsExchange(records=[SignedCapability(record=forged, signature=key.sign_base64(forged.signing_bytes())),
                                        SignedCapability(record=expired, signature=key.sign_base64(expired.signing_bytes()))])
        unsigned = {"records": [{"record": json.loads(forged.model_dump_json())}]}  # no signature at all
        stream = await host.open(target.peer_id, CAPS_PROTOCOL, CAPS_MAX_BYTES)
        await stream.stream.write(frame(json.dumps(unsigned).encode()))
        with pytest.raises(StreamFailed):
            await stream.read_frame(timeout=5)
        # A fraud notice whose verdict is signed by another key than its verifier's: dropped, not relayed.
        answer = make_answer(4, seed=9)
        verdict = Verdict(receipt_id=answer.receipt.receipt_id, verdict="fraud", reasons=["made up"], failures=[])
        honest_looking = sign_verdict(verdict, key)
        posing = honest_looking.model_copy(update={"verifier_id": victim.node_id, "public_key": victim.public_key.hex()})
        await host.request(target.peer_id, FRAUD_PROTOCOL, CAPS_MAX_BYTES, FraudNotice(proof=FraudProof(answer=answer, verdict=posing)))
        reply = await host.request(target.peer_id, CAPS_PROTOCOL, CAPS_MAX_BYTES, message, CapsExchange)  # the node still answers with its own table
        assert target.peer_id in {r.record.peer_id for r in reply.records}
        nursery.cancel_scope.cancel()


def test_garbage_to_every_protocol_is_dropped_and_counted(mesh, tiny_model):
    gateway, servers = mesh
    target = servers[0]
    before = _rejections(target)
    trio.run(_attack, target)
    after = _rejections(target)
    def grew(protocol: str, reason: str) -> float:
        return after.get((protocol, reason), 0) - before.get((protocol, reason), 0)

    for protocol in PROTOCOLS:  # every garbage message dropped and counted, as what it is or past the budget
        assert grew(protocol, "malformed") + grew(protocol, "oversized") + grew(protocol, "rate_limited") >= 4, protocol
        if protocol != VERIFY_PROTOCOL:  # the others' budgets take four messages at once
            assert grew(protocol, "malformed") >= 3 and grew(protocol, "oversized") >= 1, protocol
    assert after.get((CAPS_PROTOCOL, "malformed"), 0) - before.get((CAPS_PROTOCOL, "malformed"), 0) >= 4  # + unsigned
    assert after.get((CAPS_PROTOCOL, "bad_signature"), 0) - before.get((CAPS_PROTOCOL, "bad_signature"), 0) >= 2
    deadline = time.monotonic() + 10  # the fraud notice is judged after its stream closed
    while _rejections(target).get((FRAUD_PROTOCOL, "bad_signature"), 0) - before.get((FRAUD_PROTOCOL, "bad_signature"), 0) < 1:
        assert time.monotonic() < deadline, "the badly signed fraud notice was not counted"
        time.sleep(0.1)
    assert not target.get("/v1/peers")["convicted"]
    known = {p["peer_id"] for p in target.get("/v1/peers")["data"]}
    assert known == {n.peer_id for n in (gateway, *servers) if n is not target}  # nothing forged got in
    status, _, body = _completion(target, tiny_model.name)
    assert status == 200, body  # and it keeps serving


def test_plaintext_dial_is_refused(mesh):
    _, servers = mesh

    async def dial_in_plaintext() -> None:
        key_pair = create_new_key_pair(NodeKey.generate().seed)
        host = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
                        muxer_opt=create_yamux_muxer_option())
        async with host.run([multiaddr.Multiaddr(LOOPBACK)]):
            with trio.fail_after(15):
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(servers[0].addrs[0])))

    # The node offers no security protocol the dialler speaks, so the dial fails (a Noise dial
    # to the same node works: see the test above).
    with pytest.raises(ExceptionGroup) as refused:
        trio.run(dial_in_plaintext)
    assert refused.group_contains(SwarmDialAllFailedError)
    assert servers[0].get("/health")["status"] == "ok"


def test_a_full_node_forwards_to_a_peer(mesh, tiny_model):
    """d admits one waiting request: of a burst sent to it, those it cannot queue go to peers."""
    _, servers = mesh
    full = servers[2]

    def ask(i: int) -> tuple[int, dict, dict]:
        return _completion(full, tiny_model.name, max_tokens=64, temperature=1.0, seed=i)

    results: list = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(status == 200 for status, _, _ in results), results
    forwarded = [headers["X-ProofMesh-Peer"] for _, headers, _ in results if "X-ProofMesh-Peer" in headers]
    assert forwarded and full.peer_id not in forwarded
    for _, headers, body in results:
        _check_proof(body["proofmesh"], headers.get("X-ProofMesh-Peer", full.peer_id))


# ---------------------------------------------------------------------- failures


def test_peer_killed_before_its_first_token_is_retried_elsewhere(mesh, tiny_model):
    """Every server is frozen, so the gateway's first choice cannot answer; that one is then
    killed (SIGKILL) while the gateway waits for it, the others thawed: the request completes."""
    gateway, servers = mesh
    result: dict = {}
    for s in servers:
        s.kill(signal.SIGSTOP)
    try:
        caller = threading.Thread(target=lambda: result.update(answer=_completion(gateway, tiny_model.name)))
        caller.start()
        chosen = _wait_for_in_flight(gateway)
        victim = next(s for s in servers if s.peer_id == chosen)
        victim.kill(signal.SIGKILL)
    finally:
        for s in servers:
            s.kill(signal.SIGCONT)
    caller.join(60)
    status, headers, body = result["answer"]
    assert status == 200, body
    assert headers["X-ProofMesh-Peer"] != victim.peer_id
    _check_proof(body["proofmesh"], headers["X-ProofMesh-Peer"])
    assert _metric(gateway, 'proofmesh_p2p_forwarded_requests_total{outcome="retried"}') >= 1
    victim.process.wait(10)
    servers.remove(victim)


def _metric(node: NodeProcess, series: str) -> float:
    with urllib.request.urlopen(node.url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def _wait_for_in_flight(gateway: NodeProcess, timeout: float = 4.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [p["peer_id"] for p in gateway.get("/v1/peers")["data"] if p["in_flight"]]
        if busy:
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("the gateway did not forward the request")


def test_peer_killed_mid_stream_ends_the_stream_cleanly(mesh, tiny_model):
    gateway, servers = mesh
    body = {"model": tiny_model.name, "prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "stream": True,
            "seed": _seed_that_runs_long(servers[0], tiny_model.name)}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", gateway.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            serving = next(s for s in servers if s.peer_id == response.headers["X-ProofMesh-Peer"])
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            serving.kill(signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
    assert "choices" in json.loads(first[6:])
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "peer_failed" and serving.peer_id in error["message"]
    serving.process.wait(10)

    status, headers, answer = _completion(gateway, tiny_model.name)
    assert status == 200 and headers["X-ProofMesh-Peer"] != serving.peer_id  # the next one goes elsewhere
    _check_proof(answer["proofmesh"], headers["X-ProofMesh-Peer"])


def _seed_that_runs_long(node: NodeProcess, model: str) -> int:
    """A seed whose answer does not stop early (a random model may draw its end token)."""
    for seed in range(20):
        status, _, body = _completion(node, model, max_tokens=200, temperature=1.0, seed=seed)
        if body["choices"][0]["finish_reason"] == "length":
            return seed
    raise AssertionError("every seed stopped early")
