"""A fraud proof spreads through the network and routing turns away from the convicted node: real
nodes in subprocesses on 127.0.0.1 (a gateway, an honest server, an impostor serving another
model under the honest model_id), the verifier sidecar in-process auditing every answer."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request

import httpx

from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from node.api.evidence_tokens import receipt_path
from node.sidecar.app import Sidecar, make_sidecar_app
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from tests.p2p.cluster import Cluster, NodeProcess, warm_store
from verify.evidence import AnswerFile
from verify.fraud import FraudProof, check_fraud_proof, sign_verdict
from verify.identity import NodeKey
from verify.ledger import Ledger
from verify.verifier import Verdict

TIMEOUT_S = 60.0


def complete(url: str, model: str, seed: int) -> dict:
    body = json.dumps({"model": model, "prompt": "hello world", "max_tokens": 6, "seed": seed}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def convicted_at(node: NodeProcess) -> set[str]:
    return set(node.get("/v1/peers")["convicted"])


def test_a_fraud_proof_spreads_and_the_network_stops_routing_to_the_cheat(tmp_path_factory, store, monkeypatch):
    root = tmp_path_factory.mktemp("fraud")
    honest_dir = make_tiny_hf_checkpoint(root / "honest" / "tiny")
    other_dir = make_tiny_hf_checkpoint(root / "other" / "tiny", seed=1)  # same name and shape, other weights
    warm_store(store, honest_dir)  # the session's build of the tiny shape
    auditor = load_model(str(honest_dir), device="cpu", limits=CacheLimits(max_batch_size=4, max_total_tokens=1024,
                                                                             prefill_chunk=64), root=store)
    cluster = Cluster(root / "nodes", store)
    try:
        # Without the model the gateway convicts only on vouchers of peers it saw serve (quorum 1 here:
        # one honest server can re-check; the default of 2 needs two).
        gateway = cluster.wait_ready(cluster.start("gateway", [], extra=["--fraud-quorum", "1"]))
        honest = cluster.start("honest", [str(honest_dir)], bootstrap=[gateway.addrs[0]])
        monkeypatch.setenv("PROOFMESH_TEST_CLAIMED_MODEL_ID", auditor.model_id)
        cheat = cluster.start("cheat", [str(other_dir)], bootstrap=[gateway.addrs[0]], module="tests.p2p.impostor")
        for node in (honest, cheat):
            cluster.wait_ready(node)
        wait_for(lambda: set(gateway.get("/v1/models")["data"][0].get("peers", [])) == {honest.peer_id, cheat.peer_id}
                 if gateway.get("/v1/models")["data"] else False, "both servers at the gateway")

        # The gateway counts vouchers only from peers it saw serve: let it see the honest one answer.
        def honest_served() -> bool:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda seed: complete(gateway.url, "tiny", 500 + seed), range(4)))
            return any(a["proofmesh"]["receipt"]["node_id"] == honest.peer_id for a in answers)

        wait_for(honest_served, "the gateway to see the honest server answer")
        sidecar = Sidecar([gateway.url], Ledger(root / "ledger.sqlite"), NodeKey.generate(), {auditor.model_id: auditor},
                          audit_rate=1.0)
        with serving(make_sidecar_app(sidecar)) as url:
            rounds = iter(range(0, 10_000, 8))

            def cheat_served() -> bool:
                """Concurrent requests through the sidecar until the gateway routes one to the cheat (a
                newcomer it prefers less than the server it saw answer: not always in the first round)."""
                first = next(rounds)
                with ThreadPoolExecutor(4) as pool:
                    answers = list(pool.map(lambda seed: complete(url, "tiny", seed), range(first, first + 8)))
                return any(a["proofmesh"]["receipt"]["node_id"] == cheat.peer_id for a in answers)

            wait_for(cheat_served, "the gateway to route an audited request to the cheat")
            wait_for(lambda: sidecar.ledger.convicted() == {cheat.peer_id}, "the sidecar's audit to convict the cheat")
            wait_for(lambda: cheat.peer_id in convicted_at(gateway) and cheat.peer_id in convicted_at(honest),
                     "the fraud proof to reach the gateway and the honest server")
            assert convicted_at(gateway) == convicted_at(honest) == {cheat.peer_id}  # the honest node never
            for audit in sidecar.ledger.audits(node_id=honest.peer_id):
                assert audit.state in ("pass", "pending")
            proof = sidecar.ledger.fraud_proof(next(a.receipt_id for a in sidecar.ledger.audits(state="fraud")))
            assert check_fraud_proof(proof, auditor).upheld
            # The conviction's proof is served (anyone can re-check it) and kept on disk across restarts.
            # (the first proof to arrive convicts; later ones against a convicted node are dropped)
            served = [r for a in sidecar.ledger.audits(state="fraud")
                      if (r := httpx.get(f"{honest.url}/v1/fraud-proofs/{a.receipt_id}")).status_code == 200]
            assert served and check_fraud_proof(FraudProof.model_validate_json(served[0].content), auditor).upheld
            on_disk = Ledger(cluster.root / "honest" / "node-ledger.sqlite")
            assert on_disk.convicted() == {cheat.peer_id}
            on_disk.close()
            # The operator's status page lists the peers and the conviction, linked to its proof.
            page = httpx.get(f"{honest.url}/").text
            assert gateway.peer_id in page and "convicted" in page
            assert any(f'href="v1/fraud-proofs/{r.receipt_id}"' in page for r in sidecar.ledger.audits(state="fraud"))
            # Framing the honest node with one of its receipts, evidence altered, a fresh key's verdict: refused.
            proof = complete(honest.url, "tiny", 999)["proofmesh"]
            mine = proof["receipt"]["receipt_id"]
            genuine = AnswerFile.model_validate_json(httpx.get(honest.url + receipt_path(mine, proof["evidence_token"])).content)
            ev = genuine.evidence
            altered = genuine.model_copy(update={"evidence": ev.model_copy(update={"output_ids": [*ev.output_ids[:-1], 5]})})
            lie = Verdict(receipt_id=mine, verdict="fraud", reasons=["output_hash does not match"], failures=[])
            framing = FraudProof(answer=altered, verdict=sign_verdict(lie, NodeKey.generate()))
            for target in (gateway, cheat):
                posted = httpx.post(f"{target.url}/v1/fraud-proofs", content=framing.model_dump_json(), timeout=30)
                assert posted.status_code == 400 and posted.json()["error"]["code"] == "invalid_fraud_proof"
            after = {complete(gateway.url, "tiny", 100 + seed)["proofmesh"]["receipt"]["node_id"] for seed in range(6)}
            assert after == {honest.peer_id}  # no request is routed to the convicted node any more
    finally:
        cluster.close()
