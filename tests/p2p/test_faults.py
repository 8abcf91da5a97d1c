"""Faults on real processes: a serving node killed (SIGKILL) in the middle of an answer, a
gateway and a verifier sidecar killed with requests in flight through them. Every client gets an answer or a clean
error within its timeout, none hangs; started again on the same home, the node has the same
identity, still serves the evidence of answers it gave before, and its ledger opens intact."""

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
from types import SimpleNamespace

import httpx
import pytest

from node.api.evidence_tokens import receipt_path
from tests.models_fixtures import home_sharing
from tests.p2p.cluster import OPERATOR, OPERATOR_KEY, REPO_ROOT, NodeProcess, tiny_cluster
from verify.evidence import AnswerFile
from verify.ledger import Ledger

CLIENT_TIMEOUT_S = 60
MODEL = "tiny"  # the served name: the checkpoint folder's name


def _post(node: NodeProcess, body: dict) -> tuple[int | None, str]:
    """(status, text), or (None, the error) when the connection failed: never waits past the timeout."""
    request = urllib.request.Request(f"{node.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, ConnectionError) as exc:
        return None, str(exc)


def _in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=fn(), finished=time.monotonic()))
    thread.start()
    return thread, out


@pytest.fixture
def cluster(tmp_path_factory, store):
    c, c.tiny = tiny_cluster(tmp_path_factory, store, MODEL)
    try:
        yield c
    finally:
        c.close()


def test_a_node_killed_mid_answer_fails_cleanly_and_restarts_intact(cluster):
    node = cluster.wait_ready(cluster.start("server", [str(cluster.tiny)]))
    status, text = _post(node, {"model": MODEL, "prompt": "keep this", "max_tokens": 4, "seed": 1})
    assert status == 200, text
    kept = json.loads(text)["proofmesh"]  # its evidence token outlives the process: derived from the key

    started = threading.Event()

    def stream() -> str:
        """Read a long streamed answer; the node is killed once its first chunk arrived."""
        try:
            with httpx.stream("POST", f"{node.url}/v1/completions", timeout=CLIENT_TIMEOUT_S,
                              json={"model": MODEL, "prompt": "long", "max_tokens": 240, "temperature": 1.0,
                                    "seed": 2, "stream": True}) as response:
                for line in response.iter_lines():
                    started.set()
                    if line == "data: [DONE]":
                        return "complete"
            return "cut short"
        except httpx.HTTPError as exc:
            return f"broken: {type(exc).__name__}"
        finally:
            started.set()

    thread, out = _in_background(stream)
    assert started.wait(CLIENT_TIMEOUT_S)
    killed_at = time.monotonic()
    node.kill(signal.SIGKILL)
    thread.join(CLIENT_TIMEOUT_S + 5)
    assert not thread.is_alive(), "the client hung on a dead node"
    assert out["result"] in ("complete", "cut short") or out["result"].startswith("broken")  # never a hang
    assert out["finished"] - killed_at < 10

    again = cluster.wait_ready(cluster.start("server", [str(cluster.tiny)]))
    assert again.get("/health")["node_id"] == node.peer_id  # the same key
    with urllib.request.urlopen(again.url + receipt_path(kept["receipt"]["receipt_id"], kept["evidence_token"]), timeout=30) as response:
        answer = AnswerFile.model_validate_json(response.read())  # evidence written before the kill is there
    assert answer.receipt.receipt_id == kept["receipt"]["receipt_id"] and answer.evidence.digest() == answer.receipt.evidence_hash
    ledger = Ledger(cluster.root / "server" / "node-ledger.sqlite")
    assert ledger.convicted() == set()
    ledger.close()
    status, text = _post(again, {"model": MODEL, "prompt": "and on", "max_tokens": 3})
    assert status == 200, text


def test_a_gateway_killed_with_a_request_in_flight_leaves_no_client_hanging(cluster):
    gateway = cluster.wait_ready(cluster.start("gateway", []))
    server = cluster.wait_ready(cluster.start("server", [str(cluster.tiny)], bootstrap=[gateway.addrs[0]]))
    deadline = time.monotonic() + 30
    while not gateway.get("/v1/models")["data"]:
        assert time.monotonic() < deadline, "the gateway did not learn the server's model"
        time.sleep(0.2)
    server.kill(signal.SIGSTOP)  # the answer cannot finish while the gateway is killed
    thread, out = _in_background(lambda: _post(gateway, {"model": MODEL, "prompt": "through", "max_tokens": 20,
                                                         "temperature": 1.0, "seed": 3}))
    time.sleep(1.0)
    killed_at = time.monotonic()
    gateway.kill(signal.SIGKILL)
    thread.join(CLIENT_TIMEOUT_S + 5)
    assert not thread.is_alive() and out["finished"] - killed_at < 10
    assert out["result"][0] is None  # the connection broke: a clean error
    server.kill(signal.SIGCONT)
    status, text = _post(server, {"model": MODEL, "prompt": "still serving", "max_tokens": 3})
    assert status == 200, text  # the server lost its peer, not its wits


def _start_verifier(cluster, upstream: str, home) -> tuple[subprocess.Popen, str]:
    log = home / "verifier.log"
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "verifier", "--upstream", upstream, "--model", str(cluster.tiny),
             "--device", "cpu", "--audit-rate", "1", "--port", "0", "--operator-key", OPERATOR_KEY],
            cwd=REPO_ROOT, env={**os.environ, "PROOFMESH_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if found := re.search(r"proxying (http://[0-9.:]+)/v1", text):
            return process, found.group(1)
        assert process.poll() is None and time.monotonic() < deadline, text[-3000:]
        time.sleep(0.2)


def test_a_sidecar_killed_with_requests_in_flight_restarts_with_its_ledger(cluster):
    node = cluster.wait_ready(cluster.start("server", [str(cluster.tiny)]))
    home = home_sharing(cluster.root / "verifier", cluster.warm_home)
    verifier, url = _start_verifier(cluster, node.url, home)
    try:
        done = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "audit me", "max_tokens": 4, "seed": 5},
                          timeout=CLIENT_TIMEOUT_S)
        assert done.status_code == 200, done.text
        audited = done.json()["proofmesh"]["receipt"]["receipt_id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/audits/{audited}", headers=OPERATOR, timeout=10).json().get("state") in (None, "pending"):
            assert time.monotonic() < deadline, "the answer was not audited"
            time.sleep(0.2)

        node.kill(signal.SIGSTOP)  # requests stay in flight while the sidecar is killed
        threads = [_in_background(lambda i=i: _post(SimpleNamespace(url=url), {"model": MODEL, "prompt": f"in flight {i}",
                                                                               "max_tokens": 4}))
                   for i in range(3)]
        time.sleep(1.0)
        killed_at = time.monotonic()
        verifier.kill()
        for thread, out in threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
            assert not thread.is_alive() and out["result"][0] is None and out["finished"] - killed_at < 10
        node.kill(signal.SIGCONT)

        verifier, url = _start_verifier(cluster, node.url, home)  # the same home: key, ledger
        record = httpx.get(f"{url}/v1/audits/{audited}", headers=OPERATOR, timeout=10).json()
        assert record["state"] == "pass" and record["verdicts"][0]["verifier_id"] == httpx.get(f"{url}/health").json()["verifier_id"]
        again = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "and on", "max_tokens": 3}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        node.kill(signal.SIGCONT)
        verifier.kill()
        verifier.wait(15)
