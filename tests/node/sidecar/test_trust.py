"""Trust end to end, as an adversary tries it: a lying operator between the verifier sidecar and
its own honest node (it owns the node's key, so it can re-sign anything), and outsiders trying to
frame an honest node. Real node and sidecar on 127.0.0.1, the official openai client, the tiny
model; the sidecar audits every answer (rate 1).

Every lie is caught every time (refused to the client, or a failed audit), an honest control
passes, and no framing attempt convicts anyone or costs the honest node reputation."""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web

from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from node.api.app import make_app
from node.api.evidence_tokens import receipt_path
from node.sidecar.app import Sidecar, make_sidecar_app
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from tests.node.sidecar.test_sidecar import OPERATOR_KEY, settled
from verify.evidence import AnswerFile, Fingerprint, sign_answer
from verify.evidence_store import EvidenceStore
from verify.fraud import FraudProof, sign_verdict
from verify.identity import NodeKey
from verify.ledger import Ledger
from verify.verifier import Verdict

LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=2048, prefill_chunk=64)
ASK = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea"}], "max_tokens": 12,
       "temperature": 0.9, "seed": 7}


@pytest.fixture(scope="module")
def models(tmp_path_factory, store):
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("trust") / "tiny")
    honest, auditor = (load_model(str(folder), device="cpu", limits=LIMITS, root=store) for _ in range(2))
    return SimpleNamespace(honest=honest, auditor=auditor)


def resign(key: NodeKey, answer: AnswerFile, **change) -> AnswerFile:
    """What an operator holding the node's key can do: sign any evidence as the node's answer."""
    ev, r = answer.evidence, answer.receipt
    fields = dict(prompt_ids=ev.prompt_ids, output_ids=ev.output_ids, params=ev.sampling, finish_reason=r.finish_reason,
                  fingerprints=ev.fingerprints, seed_source=r.seed_source)
    fields.update(change)
    return sign_answer(key, model_id=r.model_id, backend=r.backend, **fields)


class LyingOperator:
    """An HTTP front of the honest node that lies in one way (``mode``); files it re-signed are
    served at /v1/receipts as the node's."""

    def __init__(self, node_url: str, key: NodeKey, tokenizer, mode: str):
        self.node_url, self.key, self.tok, self.mode = node_url, key, tokenizer, mode
        self.files: dict[str, AnswerFile] = {}
        self.cached: bytes | None = None

    async def _node(self, session: aiohttp.ClientSession, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        async with session.request(method, f"{self.node_url}{path}", json=body) as resp:
            return resp.status, await resp.read()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        asked = dict(body)
        if self.mode == "prompt-swap":  # a cheaper question than the client's
            body["messages"] = [{"role": "user", "content": "Hi"}]
        if self.mode in ("truncated", "greedy"):
            body.update(temperature=0.0, **({"max_tokens": 2} if self.mode == "truncated" else {}))
        if self.mode == "replay" and self.cached is not None:
            return web.Response(body=self.cached, content_type="application/json")
        async with aiohttp.ClientSession() as session:
            status, data = await self._node(session, "POST", "/v1/chat/completions", body)
            out = json.loads(data)
            receipt_id = out["proofmesh"]["receipt"]["receipt_id"]
            _, raw = await self._node(session, "GET", receipt_path(receipt_id, out["proofmesh"]["evidence_token"]))
        answer = AnswerFile.model_validate_json(raw)
        choice = out["choices"][0]
        if self.mode == "text-swap":
            choice["message"]["content"] = "Something the node never said."
        elif self.mode in ("truncated", "greedy", "emptied"):
            params = answer.evidence.sampling.model_copy(update={"temperature": asked["temperature"], "max_tokens": asked["max_tokens"]})
            change = {"params": params}
            if self.mode == "truncated":  # two tokens claimed as the complete answer
                change["finish_reason"] = "stop"
            if self.mode == "emptied":
                change = {"fingerprints": [Fingerprint(ids=[], logits=[], token_logit=0.0, log_normalizer=0.0)] * len(answer.evidence.output_ids)}
            answer = resign(self.key, answer, **change)
            self.files[answer.receipt.receipt_id] = answer
            proof = {"receipt": answer.receipt.model_dump(mode="json"), "signature": answer.signature,
                     "public_key": answer.public_key, "backend": answer.receipt.backend,
                     "evidence_token": choice["proofmesh"]["evidence_token"]}
            out["proofmesh"] = choice["proofmesh"] = proof
            choice["finish_reason"] = answer.receipt.finish_reason
        elif self.mode == "substituted":  # the file served later is another, re-signed one
            self.files[receipt_id] = resign(self.key, answer, output_ids=[*answer.evidence.output_ids[:-1], 3])
            self.files[receipt_id] = self.files[receipt_id].model_copy(update={"receipt": self.files[receipt_id].receipt.model_copy(
                update={"receipt_id": receipt_id})})
        data = json.dumps(out).encode()
        self.cached = data
        return web.Response(status=status, body=data, content_type="application/json")

    async def receipt(self, request: web.Request) -> web.Response:
        receipt_id = request.match_info["receipt_id"]
        if self.mode == "withheld":
            return web.json_response({"error": {"message": "gone", "type": "not_found_error"}}, status=404)
        if receipt_id in self.files:
            return web.Response(body=self.files[receipt_id].model_dump_json(), content_type="application/json")
        async with aiohttp.ClientSession() as session:
            status, raw = await self._node(session, "GET", request.path_qs)  # the client's token goes on
        return web.Response(status=status, body=raw, content_type="application/json")

    async def passthrough(self, request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as session:
            status, raw = await self._node(session, "GET", request.path)
        return web.Response(status=status, body=raw, content_type="application/json")

    def app(self) -> web.Application:
        return front_app(self.chat, self.receipt, self.passthrough)


def front_app(chat, receipt, passthrough) -> web.Application:
    """What a front of a node serves the sidecar: chat answers, answer files, and the rest passed through."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/receipts/{receipt_id}", receipt)
    app.router.add_get("/v1/models", passthrough)
    app.router.add_get("/health", passthrough)
    return app


@contextmanager
def honest_node(models, tmp_path):
    key = NodeKey.generate()
    store = EvidenceStore(tmp_path / "evidence.sqlite")
    try:
        with serving(make_app([models.honest], key, store)) as url:
            yield url, key
    finally:
        store.close()


CAUGHT_BY_BINDING = {"prompt-swap", "text-swap", "truncated", "withheld", "substituted", "replay"}
CAUGHT_BY_AUDIT = {"greedy": "fraud", "emptied": "malformed"}


@pytest.mark.parametrize("mode", ["honest", *sorted(CAUGHT_BY_BINDING), *sorted(CAUGHT_BY_AUDIT)])
def test_a_lying_operator_is_caught_every_time_and_an_honest_one_passes(models, tmp_path, mode):
    with honest_node(models, tmp_path) as (node_url, key):
        operator = LyingOperator(node_url, key, models.honest.tokenizer, mode)
        with serving(operator.app()) as front:
            ledger = Ledger(tmp_path / "ledger.sqlite")
            sidecar = Sidecar([front], ledger, NodeKey.generate(), {models.auditor.model_id: models.auditor}, audit_rate=1.0,
                              evidence_deadline_s=0.5)
            with serving(make_sidecar_app(sidecar, operator_keys=[OPERATOR_KEY])) as url, \
                    openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
                ask = dict(ASK)
                ask.pop("model")
                if mode == "replay":  # the first answer is honest; the same receipt again is a replay
                    client.chat.completions.create(model="tiny", **ask)
                if mode in CAUGHT_BY_BINDING:
                    with pytest.raises(openai.APIStatusError) as refused:
                        client.chat.completions.create(model="tiny", **ask)
                    assert refused.value.status_code == 502
                    error = refused.value.body
                    assert error["code"] == "answer_refused", error
                    # Counted against the connection that served it, not the node its receipts name:
                    # an upstream that relays another's answers could otherwise sink that node.
                    rep = ledger.reputation(sidecar.upstreams[0].ledger_id)
                    assert rep.failures >= 1 and rep.score < 0.5 and not rep.convicted
                    node = ledger.reputation(key.node_id)
                    assert node.failures == 0 and node.score >= 0.5  # (replay: its first, honest answer passed)
                    return
                answer = client.chat.completions.create(model="tiny", **ask)
                receipt_id = answer.model_extra["proofmesh"]["receipt"]["receipt_id"]
                (audit,) = [a for a in settled(url, 1) if a["receipt_id"] == receipt_id]
                assert audit["state"] == CAUGHT_BY_AUDIT.get(mode, "pass"), audit
                assert ledger.convicted() == ({key.node_id} if mode == "greedy" else set())
            ledger.close()


def test_a_streamed_answer_is_bound_before_its_end(models, tmp_path):
    """Text swapped inside a stream: the client gets an error event before [DONE]."""
    with honest_node(models, tmp_path) as (node_url, _):
        sidecar = Sidecar([node_url], Ledger(tmp_path / "ledger.sqlite"), NodeKey.generate(),
                          {models.auditor.model_id: models.auditor}, audit_rate=0.0)
        with serving(make_sidecar_app(sidecar)) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**ASK, "stream": True}, timeout=60) as resp:
                lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)  # honest: bound
            # A client that asks for a seed the node did not use is told so (the seed rides in the request).
            direct = httpx.post(f"{node_url}/v1/chat/completions", json={**ASK, "seed": 8}, timeout=60).json()
            assert direct["proofmesh"]["receipt"]["seed_source"] == "client"
            unseeded = httpx.post(f"{url}/v1/chat/completions", json={k: v for k, v in ASK.items() if k != "seed"}, timeout=60)
            assert unseeded.json()["proofmesh"]["receipt"]["seed_source"] == "client"  # the sidecar drew it


def test_framing_attempts_convict_nobody(models, tmp_path):
    """An honest receipt with altered evidence under a fraud verdict from a fresh key, posted to a
    node and to a sidecar; a badly signed answer file posted for audit: nobody is convicted and
    the honest node's reputation does not move."""
    with honest_node(models, tmp_path) as (node_url, key):
        out = httpx.post(f"{node_url}/v1/chat/completions", json=ASK, timeout=60).json()
        receipt_id = out["proofmesh"]["receipt"]["receipt_id"]
        honest = AnswerFile.model_validate_json(httpx.get(node_url + receipt_path(receipt_id, out["proofmesh"]["evidence_token"])).content)
        ev = honest.evidence
        altered = honest.model_copy(update={"evidence": ev.model_copy(update={"output_ids": [*ev.output_ids[:-1], 5]})})
        lie = Verdict(receipt_id=receipt_id, verdict="fraud", reasons=["output_hash does not match"], failures=[])
        framing = FraudProof(answer=altered, verdict=sign_verdict(lie, NodeKey.generate()))
        badly_signed = honest.model_copy(update={"signature": NodeKey.generate().sign_base64(b"x")})

        ledger = Ledger(tmp_path / "ledger.sqlite")
        sidecar = Sidecar([node_url], ledger, NodeKey.generate(), {models.auditor.model_id: models.auditor}, audit_rate=0.0)
        with serving(make_sidecar_app(sidecar, api_keys=["secret"])) as url:
            auth = {"Authorization": "Bearer secret"}
            assert httpx.post(f"{url}/v1/audits", content=altered.model_dump_json(), timeout=60).status_code == 401
            for submitted in (altered, badly_signed):
                record = httpx.post(f"{url}/v1/audits", content=submitted.model_dump_json(), headers=auth, timeout=60).json()
                assert record["state"] == "unattributable", record
            assert ledger.convicted() == set()
            rep = ledger.reputation(key.node_id)
            assert (rep.passes, rep.failures, rep.score) == (0, 0, 0.5)
        # The node itself (no p2p network here: the route needs one) refuses nothing it cannot
        # re-check; over a network, tests/p2p/test_fraud_gossip.py posts the same framing.
        assert framing.answer.receipt.node_id == key.node_id
        ledger.close()


def test_a_verifier_without_a_model_is_refused_or_uses_the_upstream_model(tmp_path):
    """``proofmesh verifier`` with --bootstrap alone and no --model refuses to start, clearly."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "node.cli", "verifier", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--model" in out.stderr and "Traceback" not in out.stderr
    unreachable = subprocess.run([sys.executable, "-m", "node.cli", "verifier", "--upstream", "http://127.0.0.1:9"],
                                 capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 2 and "give it with --model" in unreachable.stderr
