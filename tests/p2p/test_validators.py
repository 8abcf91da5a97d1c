"""Audits re-checked by peers of the network through the sidecar: real nodes in subprocesses on
127.0.0.1 (a server, an honest validator, a lazy validator that says pass to everything), the
sidecar in-process with the same tiny model. A forged answer is convicted, the honest validator
agrees, and the lazy one is caught the first time it passes a cheat."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import httpx
import pytest

from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from node.sidecar.app import Sidecar, make_sidecar_app
from p2p.network import NetworkConfig
from tests.node.api.http_fixtures import serving
from tests.models_fixtures import home_sharing
from tests.p2p.cluster import OPERATOR, OPERATOR_KEY, REPO_ROOT, tiny_cluster
from verify.evidence import AnswerFile, sign_answer
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

DISCOVERY_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def network(tmp_path_factory, store):
    cluster, tiny = tiny_cluster(tmp_path_factory, store)
    warm = cluster.warm_home
    try:
        server = cluster.wait_ready(cluster.start("server", [str(tiny)]))
        honest = cluster.start("honest", [str(tiny)], bootstrap=[server.addrs[0]])
        lazy = cluster.start("lazy", [str(tiny)], bootstrap=[server.addrs[0]], module="tests.p2p.lazy_validator")
        for node in (honest, lazy):
            cluster.wait_ready(node)
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while {p["peer_id"] for p in server.get("/v1/peers")["data"] if p["models"]} != {honest.peer_id, lazy.peer_id}:
            assert time.monotonic() < deadline, "the validators did not show up at the server"
            time.sleep(0.2)
        auditor = load_model(str(tiny), device="cpu", limits=CacheLimits(max_batch_size=4, max_total_tokens=1024,
                                                                         prefill_chunk=64), root=warm)
        yield server, honest, lazy, auditor, warm
    finally:
        cluster.close()


def honest_answer(server) -> AnswerFile:
    body = json.dumps({"model": server.get("/v1/models")["data"][0]["id"],
                       "prompt": "hello world", "max_tokens": 8, "seed": 3}).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        proof = json.load(response)["proofmesh"]
    with urllib.request.urlopen(server.url + receipt_path(proof["receipt"]["receipt_id"], proof["evidence_token"]), timeout=30) as response:
        return AnswerFile.model_validate_json(response.read())


def forged(answer: AnswerFile) -> AnswerFile:
    """The same answer with one token changed, validly signed by another key: a lie to catch."""
    ev, r = answer.evidence, answer.receipt
    output = list(ev.output_ids)
    output[2] = (output[2] + 1) % 256
    return sign_answer(NodeKey.generate(), model_id=r.model_id, backend=r.backend, prompt_ids=ev.prompt_ids,
                       output_ids=output, params=ev.sampling, fingerprints=ev.fingerprints,
                       finish_reason=r.finish_reason)


def test_peers_recheck_audits_and_a_lazy_validator_is_caught(network, tmp_path):
    """Validators are drawn by the sidecar's own gateway (its key, no model), never by the node
    under audit: the server signed the good answer and is not asked about it; the lie is another
    key's, so all three serving peers are asked about it."""
    server, honest, lazy, auditor, _ = network
    key = NodeKey.generate()
    gateway_store = EvidenceStore(tmp_path / "gateway.sqlite")
    gateway = make_app([], key, gateway_store, network=NetworkConfig(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[server.addrs[0]]))
    with serving(gateway) as gateway_url:
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while len([p for p in httpx.get(f"{gateway_url}/v1/peers").json()["data"] if p["models"]]) < 3:
            assert time.monotonic() < deadline, "the sidecar's gateway did not find the serving peers"
            time.sleep(0.2)
        sidecar = Sidecar([server.url], Ledger(tmp_path / "ledger.sqlite"), key, {auditor.model_id: auditor},
                          audit_rate=0.0, validators=3, validator_gateway=gateway_url)
        _audits_with_validators(sidecar, server, honest, lazy)
    gateway_store.close()


def _audits_with_validators(sidecar, server, honest, lazy) -> None:
    with serving(make_sidecar_app(sidecar)) as url:
        good = honest_answer(server)
        record = httpx.post(f"{url}/v1/audits", content=good.model_dump_json(), timeout=120).json()
        assert record["state"] == "pass"
        by_verifier = {v["verifier_id"]: v["verdict"]["verdict"] for v in record["verdicts"]}
        assert by_verifier == {sidecar.key.node_id: "pass", honest.peer_id: "pass", lazy.peer_id: "pass"}

        lie = forged(good)
        record = httpx.post(f"{url}/v1/audits", content=lie.model_dump_json(), timeout=120).json()
        assert record["state"] == "fraud"
        by_verifier = {v["verifier_id"]: v["verdict"]["verdict"] for v in record["verdicts"]}
        assert by_verifier == {sidecar.key.node_id: "fraud", server.peer_id: "fraud", honest.peer_id: "fraud",
                               lazy.peer_id: "pass"}
        assert sidecar.ledger.convicted() == {lie.receipt.node_id}
        lazy_rep, honest_rep = sidecar.ledger.reputation(lazy.peer_id), sidecar.ledger.reputation(honest.peer_id)
        assert (lazy_rep.passes, lazy_rep.failures) == (1, 1) and (honest_rep.passes, honest_rep.failures) == (2, 0)
        assert lazy_rep.score < honest_rep.score


def test_the_verifier_joins_the_network_itself(network, tmp_path):
    """``proofmesh verifier --bootstrap``: an embedded gateway routes through the network, and the
    answers it relays are audited like any others."""
    server, honest, lazy, auditor, warm = network
    home = home_sharing(tmp_path / "home", warm)
    log = tmp_path / "verifier.log"
    with open(log, "wb") as out:
        verifier = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "verifier", "--bootstrap", server.addrs[0], "--model", str(auditor.path),
             "--device", "cpu", "--audit-rate", "1", "--port", "0", "--operator-key", OPERATOR_KEY],
            cwd=REPO_ROOT, env={**os.environ, "PROOFMESH_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (found := re.search(r"proxying (http://[0-9.:]+)/v1", log.read_text(errors="replace"))):
            assert verifier.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        url = found.group(1)
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while not httpx.get(f"{url}/v1/models", timeout=10).json().get("data"):  # the gateway found the servers
            assert time.monotonic() < deadline, "the verifier's gateway found no model in the network"
            time.sleep(0.3)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        out = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 5, "seed": 1},
                         timeout=60).json()
        receipt = out["proofmesh"]["receipt"]
        assert receipt["node_id"] in {server.peer_id, honest.peer_id, lazy.peer_id}
        deadline = time.monotonic() + 60
        while (record := httpx.get(f"{url}/v1/audits/{receipt['receipt_id']}", headers=OPERATOR, timeout=10)).status_code != 200 \
                or record.json()["state"] == "pending":
            assert time.monotonic() < deadline, "the relayed answer was not audited"
            time.sleep(0.3)
        assert record.json()["state"] == "pass"
    finally:
        verifier.send_signal(signal.SIGTERM)
        try:
            verifier.wait(15)
        except subprocess.TimeoutExpired:
            verifier.kill()
            verifier.wait()
