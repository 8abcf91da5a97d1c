"""Nothing the node does from a coroutine waits on the evidence store's or the ledger's lock on
the event loop's thread: whoever holds those locks may be in an fsync'd commit, which would stall
every stream and every ``/health`` probe (``node.blocking.off_loop`` is the one door). A real
node on the tiny model, whose store and ledger refuse their locks on a loop's thread, is driven
through every route that reads or writes them."""

from __future__ import annotations

import asyncio
import threading
import traceback
from contextlib import contextmanager

import httpx
import pytest

from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from node.api.peering import SERVICES
from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from p2p.network import NetworkConfig
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from verify.durable import DurableDB
from verify.evidence import AnswerFile, sign_answer
from verify.evidence_store import EvidenceStore
from verify.fraud import FraudProof, make_fraud_proof
from verify.identity import NodeKey
from verify.ledger import Ledger
from verify.verifier import verify_answer

LIMITS = CacheLimits(max_batch_size=4, max_total_tokens=1024, prefill_chunk=64)
API_KEY = "sk-off-loop-test"
OPERATOR_KEY = "sk-off-loop-operator"
MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}


class OffLoopLock:
    """A lock that refuses to be taken on a thread running an event loop. Each refusal is also
    recorded, for calls whose error a background task would swallow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken_on_loop: list[str] = []

    def refuse_on_loop(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop runs on this thread: a worker's, or the test's own
            return
        self.taken_on_loop.append("".join(traceback.format_stack(limit=9)[:-2]))
        raise AssertionError(f"a store or ledger used on the event loop's thread:\n{self.taken_on_loop[-1]}")

    def __enter__(self) -> "OffLoopLock":
        self.refuse_on_loop()
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.release()


def guarded(sql: DurableDB) -> OffLoopLock:
    """``sql``'s writer lock and its lock-free read path (``reading``), both refused on a loop's thread."""
    guard, reading = OffLoopLock(), sql.reading

    @contextmanager
    def guarded_reading():
        guard.refuse_on_loop()
        with reading() as db:
            yield db

    sql.lock, sql.reading = guard, guarded_reading
    return guard


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory, store):
    """Two runtimes of the tiny model: the node's, and one that judges a lie in the test's thread."""
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("off-loop") / MODEL)
    return [load_model(str(folder), device="cpu", limits=LIMITS, root=store) for _ in range(2)]


def fraud_proof_against(answer: AnswerFile, judge) -> FraudProof:
    """``answer`` with one token changed, validly signed by another key (a lie the model
    catches), and a verifier's signed fraud verdict on it."""
    ev, r = answer.evidence, answer.receipt
    output = list(ev.output_ids)
    output[2] = (output[2] + 1) % 256
    lie = sign_answer(NodeKey.generate(), model_id=r.model_id, backend=r.backend, prompt_ids=ev.prompt_ids, output_ids=output,
                      params=ev.sampling, fingerprints=ev.fingerprints, finish_reason=r.finish_reason)
    verdict = verify_answer(lie, judge)
    assert verdict.verdict == "fraud", verdict
    return make_fraud_proof(lie, verdict, NodeKey.generate())


def test_no_store_or_ledger_call_runs_on_the_event_loop(runtimes, tmp_path):
    """A node on a p2p network of its own (loopback, no peers): chat plain and streamed (each
    answer's seal), the receipt, /health, /metrics, the status page (store stats; to the API key
    the convictions), a fraud proof upheld by the node's re-check and then fetched, the peer
    verify route, and the evidence a peer would fetch (``NodeServices.evidence``)."""
    served, judge = runtimes
    evidence, ledger = EvidenceStore(tmp_path / "evidence.sqlite"), Ledger(tmp_path / "ledger.sqlite")
    store_lock, ledger_lock = guarded(evidence._sql), guarded(ledger._sql)
    app = make_app([served], NodeKey.generate(), evidence, api_keys=[API_KEY], operator_keys=[OPERATOR_KEY],
                   network=NetworkConfig(listen=["/ip4/127.0.0.1/tcp/0"]), ledger=ledger)
    try:
        with serving(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            plain = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "seed": 3})
            assert plain.status_code == 200, plain.text
            streamed = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert streamed.status_code == 200 and '"error"' not in streamed.text, streamed.text
            signed = plain.json()["proofmesh"]
            receipt_id, token = signed["receipt"]["receipt_id"], signed["evidence_token"]
            answer = c.get(receipt_path(receipt_id, token))
            assert answer.status_code == 200, answer.text
            assert c.get("/health").json()["evidence"]["answers"] == 2
            assert "proofmesh_evidence_answers 2.0" in c.get("/metrics").text
            assert receipt_id in c.get("/", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).text

            proof = fraud_proof_against(AnswerFile.model_validate_json(answer.content), judge)
            accused = c.post("/v1/fraud-proofs", content=proof.model_dump_json())
            assert accused.status_code == 202 and accused.json()["convicted"], accused.text
            lie = proof.answer.receipt
            assert c.get(f"/v1/fraud-proofs/{lie.receipt_id}").json()["answer"]["receipt"] == lie.model_dump(mode="json")
            assert lie.node_id in c.get("/").text  # the convictions table
            refused = c.post("/v1/peers/verify", content=answer.content)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_peer_available"
            assert asyncio.run(app[SERVICES].evidence(receipt_id, token)).model_dump_json().encode() == answer.content
    finally:  # the stacks of calls made on the loop come first, whatever else failed because of them
        evidence.close()
        ledger.close()
        on_loop = store_lock.taken_on_loop + ledger_lock.taken_on_loop
        assert not on_loop, "store or ledger locks taken on the event loop's thread:\n" + "\n".join(on_loop)
