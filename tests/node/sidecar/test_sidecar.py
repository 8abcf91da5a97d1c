"""The verifier sidecar in front of real nodes on 127.0.0.1: answers pass through unchanged
(openai client, streamed and not), audits of an honest node pass, a node serving another model
under the honest model_id is caught with a fraud proof that re-checks, the serving node sees
the same traffic whether or not an answer is audited, and clients can submit answer files."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from node.runtime.loading import LoadedModel, load_model
from node.runtime.model_runtime import CacheLimits
from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from node.sidecar.app import Sidecar, make_sidecar_app
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from verify.evidence import AnswerFile
from verify.evidence_store import EvidenceStore
from verify.fraud import check_fraud_proof
from verify.identity import NodeKey
from verify.ledger import Ledger

LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=2048, prefill_chunk=64)
HELLO = [{"role": "user", "content": "Hello there"}]
OPERATOR_KEY = "sidecar-operator"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}  # reads the audits


@dataclasses.dataclass
class Impostor(LoadedModel):
    """Another model that claims the honest model's model_id (and signs receipts for it)."""

    claimed_model_id: str = ""

    @property
    def model_id(self) -> str:
        return self.claimed_model_id


@pytest.fixture(scope="module")
def models(tmp_path_factory, store):
    honest_dir = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("honest") / "tiny")
    other_dir = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("other") / "tiny", seed=1)  # same shape, other weights
    honest, honest2, auditor, other = (load_model(str(folder), device="cpu", limits=LIMITS, root=store)
                                       for folder in (honest_dir, honest_dir, honest_dir, other_dir))
    cheat = Impostor(**{f.name: getattr(other, f.name) for f in dataclasses.fields(other)}, claimed_model_id=honest.model_id)
    return SimpleNamespace(honest=honest, honest2=honest2, auditor=auditor, cheat=cheat)


def node_serving(model, tmp_path, name: str = "node"):
    evidence = EvidenceStore(tmp_path / name / "evidence.sqlite")
    return evidence, serving(make_app([model], NodeKey.generate(), evidence))


def sidecar_for(upstream: str, auditor, tmp_path, rate: float, secret: bytes | None = None):
    sidecar = Sidecar([upstream] if isinstance(upstream, str) else upstream, Ledger(tmp_path / "ledger.sqlite"), NodeKey.generate(),
                      {auditor.model_id: auditor}, audit_rate=rate, secret=secret)
    return sidecar, serving(make_sidecar_app(sidecar, operator_keys=[OPERATOR_KEY]))


def settled(sidecar_url: str, expected: int, timeout: float = 60) -> list[dict]:
    """The sidecar's audits once ``expected`` of them are no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        audits = httpx.get(f"{sidecar_url}/v1/audits", headers=OPERATOR, timeout=10).json()["data"]
        done = [a for a in audits if a["state"] != "pending"]
        if len(done) >= expected or time.monotonic() > deadline:
            return done
        time.sleep(0.2)


def lookups(node_url: str) -> float:
    text = httpx.get(f"{node_url}/metrics").text
    return sum(float(v) for v in re.findall(r'^proofmesh_receipt_lookups_total\{result="found"\} (\S+)$', text, re.M))


def test_honest_answers_pass_through_unchanged_and_their_audits_pass(models, tmp_path):
    evidence, node = node_serving(models.honest, tmp_path)
    with node as node_url:
        sidecar, app = sidecar_for(node_url, models.auditor, tmp_path, rate=1.0)
        with app as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            direct = openai.OpenAI(base_url=f"{node_url}/v1", api_key="x", max_retries=0, timeout=60)
            via = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=4, temperature=0.8)
            same = direct.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=4, temperature=0.8)
            assert via.choices[0].message.content == same.choices[0].message.content
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt="Once upon", max_tokens=10, seed=2, stream=True) if c.choices)
            assert streamed == direct.completions.create(model="tiny", prompt="Once upon", max_tokens=10, seed=2).choices[0].text
            listed = client.models.list().data
            assert [m.id for m in listed] == ["tiny"] and listed[0].model_extra["format"] == models.auditor.weight_format
            audits = settled(url, 2)
            assert len(audits) == 2 and {a["state"] for a in audits} == {"pass"}
            assert via.model_extra["proofmesh"]["receipt"]["receipt_id"] in {a["receipt_id"] for a in audits}
            assert all(len(a["verdicts"]) == 1 for a in audits)
            node_id = audits[0]["node_id"]
            assert sidecar.ledger.reputation(node_id).passes == 2
            assert httpx.get(f"{url}/v1/audits/nope", headers=OPERATOR).status_code == 404
            assert httpx.get(f"{url}/v1/audits", params={"state": "bogus"}, headers=OPERATOR).status_code == 400
    evidence.close()


def test_structured_answers_pass_through_the_sidecar_bound_and_audited(models, tmp_path):
    """A schema'd chat answer and a streamed Lark-constrained completion, through the sidecar at
    audit rate 1: both bind (the grammar is one of the parameters bound) and both audits pass
    with the grammar rebuilt. (Tool calls: tests/node/api/test_structured.py; their prompt does
    not fit this tiny model's context.)"""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    evidence, node = node_serving(models.honest, tmp_path)
    with node as node_url:
        sidecar, app = sidecar_for(node_url, models.auditor, tmp_path, rate=1.0)
        with app as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            shaped = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, temperature=0.9,
                                                    response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
            assert json.loads(shaped.choices[0].message.content)["ok"] in (True, False)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt="go", max_tokens=60, stream=True,
                extra_body={"response_format": {"type": "grammar", "grammar": 'start: "<tool_call>" %json {"const": 1} "</tool_call>"'}}) if c.choices)
            assert streamed == "<tool_call>1</tool_call>"
            audits = settled(url, 2)
            assert [a["state"] for a in audits] == ["pass", "pass"]
    evidence.close()


def test_a_node_serving_another_model_is_caught_with_a_fraud_proof(models, tmp_path):
    evidence, node = node_serving(models.cheat, tmp_path)
    with node as node_url:
        sidecar, app = sidecar_for(node_url, models.auditor, tmp_path, rate=1.0)
        with app as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=1)
            assert answer.model_extra["proofmesh"]["receipt"]["model_id"] == models.honest.model_id  # the lie
            (audit,) = settled(url, 1)
            assert audit["state"] == "fraud"
            proof = sidecar.ledger.fraud_proof(audit["receipt_id"])
            assert proof is not None and check_fraud_proof(proof, models.auditor).upheld
            assert sidecar.ledger.convicted() == {audit["node_id"]}
    evidence.close()


def test_audited_and_unaudited_answers_look_the_same_to_the_node(models, tmp_path):
    """At rate 0.5 about half are audited, yet the node serves one evidence lookup per answer
    either way, and the choice is HMAC-SHA256(secret, receipt_id) < rate, recomputed here from
    the sidecar's secret (which the node never sees)."""
    secret = b"the sidecar's secret, 32 bytes!!"
    evidence, node = node_serving(models.honest, tmp_path)
    with node as node_url:
        sidecar, app = sidecar_for(node_url, models.auditor, tmp_path, rate=0.5, secret=secret)
        with app as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            n = 12
            receipts = [client.completions.create(model="tiny", prompt=f"Count {i}", max_tokens=4, seed=i)
                        .model_extra["proofmesh"]["receipt"]["receipt_id"] for i in range(n)]
            chosen = [r for r in receipts if int.from_bytes(hmac.new(secret, r.encode(), hashlib.sha256).digest()[:8], "big") < 2**63]
            assert 0 < len(chosen) < n
            audits = settled(url, len(chosen))
            deadline = time.monotonic() + 30
            while lookups(node_url) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            assert lookups(node_url) == n
            assert {a["receipt_id"] for a in audits} == set(chosen)
    evidence.close()


def test_clients_submit_answer_files(models, tmp_path):
    evidence, node = node_serving(models.honest, tmp_path)
    with node as node_url:
        sidecar, app = sidecar_for(node_url, models.auditor, tmp_path, rate=0.0)
        with app as url:
            out = httpx.post(f"{node_url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 6, "seed": 3}).json()
            receipt_id = out["proofmesh"]["receipt"]["receipt_id"]
            answer = AnswerFile.model_validate_json(httpx.get(node_url + receipt_path(receipt_id, out["proofmesh"]["evidence_token"])).content)
            record = httpx.post(f"{url}/v1/audits", content=answer.model_dump_json(), timeout=60).json()
            assert record["state"] == "pass" and record["receipt_id"] == receipt_id
            assert httpx.get(f"{url}/v1/audits/{receipt_id}", headers=OPERATOR).json()["state"] == "pass"
            bad = httpx.post(f"{url}/v1/audits", content=b'{"receipt": 1}')
            assert bad.status_code == 400 and "answer file" in bad.json()["error"]["message"]
    evidence.close()


def test_redundant_execution_agrees_across_honest_nodes_and_exposes_a_liar(models, tmp_path):
    stores_a, node_a = node_serving(models.honest, tmp_path, "a")
    stores_b, node_b = node_serving(models.honest2, tmp_path, "b")
    stores_c, node_c = node_serving(models.cheat, tmp_path, "c")
    ask = {"model": "tiny", "messages": HELLO, "max_tokens": 10, "temperature": 0.9}
    with node_a as a, node_b as b, node_c as c:
        _, app = sidecar_for([a, b], models.auditor, tmp_path / "s1", rate=0.0)
        with app as url:
            out = httpx.post(f"{url}/v1/chat/completions", json=ask, headers={"X-ProofMesh-Redundancy": "2"}, timeout=60)
            assert out.status_code == 200, out.text
            agreed = out.json()["proofmesh_redundancy"]
            assert agreed["agreed"] and len({x["node_id"] for x in agreed["answers"]}) == 2
            receipts = [x["proofmesh"][0]["receipt"] for x in agreed["answers"]]
            assert receipts[0]["output_hash"] == receipts[1]["output_hash"] and receipts[0]["seed"] == receipts[1]["seed"]
            too_many = httpx.post(f"{url}/v1/chat/completions", json={**ask, "proofmesh": {"redundancy": 3}}, timeout=60)
            assert too_many.status_code == 503 and too_many.json()["error"]["code"] == "not_enough_nodes"
            for bad in ({**ask, "proofmesh": {"redundancy": "two"}}, {**ask, "stream": True, "proofmesh": {"redundancy": 2}}):
                r = httpx.post(f"{url}/v1/chat/completions", json=bad, timeout=60)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_redundancy"

        sidecar, app = sidecar_for([a, c], models.auditor, tmp_path / "s2", rate=0.0)
        with app as url:
            out = httpx.post(f"{url}/v1/chat/completions", json={**ask, "proofmesh": {"redundancy": 2}}, timeout=60)
            assert out.status_code == 502 and out.json()["error"]["code"] == "redundancy_disagreement"
            audits = settled(url, 2)  # the disagreement escalated to audits of both answers
            by_state = {x["state"]: x["node_id"] for x in audits}
            liar = httpx.get(f"{c}/health").json()["node_id"]
            assert by_state == {"fraud": liar, "pass": httpx.get(f"{a}/health").json()["node_id"]}
            assert sidecar.ledger.convicted() == {liar}
            served_by = {httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": f"n{i}", "max_tokens": 3},
                                    timeout=60).json()["proofmesh"]["receipt"]["node_id"] for i in range(6)}
            assert served_by == {by_state["pass"]}  # no request goes to the convicted node any more
    for store_ in (stores_a, stores_b, stores_c):
        store_.close()
