"""Issue 21's attacks 1-6, with real processes: an honest node, a lying front between it and the
verifier sidecar (an operator that owns the node, or a hostile co-upstream), the sidecar auditing
every answer, and the official ``openai`` client.

Each lie is one way of making the client read what the node did not sign while the binding reads
something else: another status, other fields, other SSE framing, other order, other counts. The
sidecar now serves only what it rebuilds from the signed answer files, so every one ends in a
refusal (502 ``answer_refused``, or an error event in a stream) counted against the front's
connection, and the client never reads the forged text; the honest node's reputation never drops.
"""

from __future__ import annotations

import copy
import json
import random
from contextlib import ExitStack
from types import SimpleNamespace

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web

from node.api.app import make_app
from node.runtime.loading import load_model
from node.sidecar.app import Sidecar, make_sidecar_app
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from tests.node.sidecar.test_sidecar import LIMITS, OPERATOR_KEY, settled
from tests.node.sidecar.test_trust import front_app
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

FORGED = "The capital of France is Berlin."
ASK = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 10, "temperature": 0.0}


@pytest.fixture(scope="module")
def honest(tmp_path_factory, store):
    """One honest node for the module, and the sidecar's own copy of its model."""
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("forgery") / "tiny")
    node_model, auditor = (load_model(str(folder), device="cpu", limits=LIMITS, root=store) for _ in range(2))
    key = NodeKey.generate()
    evidence = EvidenceStore(tmp_path_factory.mktemp("forgery-store") / "evidence.sqlite")
    with serving(make_app([node_model], key, evidence)) as url:
        yield SimpleNamespace(url=url, key=key, auditor=auditor)
    evidence.close()


def _sse(chunks: list[dict | str], colon: str = ": ") -> bytes:
    return b"".join(f"data{colon}{c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks)


def _chunks(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]


class LyingFront:
    """An HTTP front of the honest node that changes what it answers in one way (``mode``);
    everything else (answer files, health, models) passes through, query strings included."""

    def __init__(self, node_url: str, mode: str):
        self.node_url, self.mode = node_url, mode
        self.recorded: bytes | None = None  # an earlier honest stream, for the replay

    async def _node(self, method: str, path: str, body: dict | None = None) -> tuple[int, str, bytes]:
        async with aiohttp.ClientSession() as session, session.request(method, f"{self.node_url}{path}", json=body) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()

    async def completion(self, request: web.Request) -> web.Response:
        body = await request.json()
        mode = self.mode
        if mode == "status-203":  # no model run at all; any 2xx is an answer to the openai client
            fabricated = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": FORGED}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            return web.json_response(fabricated, status=203)
        if mode == "stream-replay" and self.recorded is not None:  # the node is never asked
            return web.Response(body=self.recorded, content_type="text/event-stream")
        if mode == "short-budget":  # the card says 96 tokens of context: the default budget its rule gives
            _, _, probe = await self._node("POST", request.path, {**body, "max_tokens": 1})
            body.setdefault("max_tokens", 96 - json.loads(probe)["usage"]["prompt_tokens"])
        status, content_type, raw = await self._node("POST", request.path, body)
        if body.get("stream"):
            if mode == "stream-replay":
                self.recorded = raw
            return web.Response(status=status, body=self._stream(raw), content_type="text/event-stream")
        return web.Response(status=status, body=json.dumps(self._json(json.loads(raw))).encode(), content_type="application/json")

    def _json(self, out: dict) -> dict:
        choices = out["choices"]
        if self.mode == "text-field":  # completions' field honest, the chat field clients read forged
            choices[0]["text"] = choices[0]["message"]["content"]
            choices[0]["message"]["content"] = FORGED
        elif self.mode == "index-order":  # clients read choices[0], binding read index 0
            forged = copy.deepcopy(choices[0])
            forged.update(index=1, proofmesh=None)
            forged["message"]["content"] = FORGED
            choices.insert(0, forged)
        elif self.mode == "usage-x50":
            out["usage"] = {k: v * 50 for k, v in out["usage"].items()}
        elif self.mode == "logprob-strings":  # the top tokens' strings swapped
            for entry in choices[0]["logprobs"]["content"]:
                tops = entry["top_logprobs"]
                tops[0]["token"], tops[1]["token"] = tops[1]["token"], tops[0]["token"]
        elif self.mode in ("logprob-shift", "logprob-no-top"):  # every chosen token shown as certain
            for entry in choices[0]["logprobs"]["content"]:
                shift = -entry["logprob"]
                entry["logprob"] = 0.0
                for top in entry["top_logprobs"]:
                    top["logprob"] += shift
        elif self.mode == "choices-reversed":
            choices.reverse()
        return out

    def _stream(self, raw: bytes) -> bytes:
        chunks = _chunks(raw)
        if self.mode == "delta-forged":  # the whole-message field honest, the delta clients read forged
            for chunk in chunks:
                for c in chunk["choices"]:
                    c["message"] = dict(c["delta"])
                    if c["delta"].get("content"):
                        c["delta"]["content"] = FORGED
            return _sse(chunks) + b"data: [DONE]\n\n"
        if self.mode == "sse-framing":  # a forged event without the space, and a [DONE], before the honest stream
            forged = {**chunks[0], "choices": [{"index": 0, "delta": {"role": "assistant", "content": FORGED}}]}
            return _sse([forged, "[DONE]"], colon=":") + raw
        return raw

    async def passthrough(self, request: web.Request) -> web.Response:
        status, content_type, raw = await self._node("GET", request.path_qs)
        if self.mode == "short-budget" and request.path in ("/v1/models", "/health"):
            raw = raw.replace(b'"max_context":', b'"max_context":96,"was":')  # the card the operator shows
        return web.Response(status=status, body=raw, content_type=content_type.split(";")[0] or "application/json")

    def app(self) -> web.Application:
        return front_app(self.completion, self.passthrough, self.passthrough)


def _through(honest, tmp_path, fronts: list, **sidecar_options):
    """A sidecar (audit rate 1) over ``fronts`` (URLs), its ledger, and a client for it."""
    stack = ExitStack()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    stack.callback(ledger.close)
    sidecar = Sidecar(fronts, ledger, NodeKey.generate(), {honest.auditor.model_id: honest.auditor}, audit_rate=1.0,
                      evidence_deadline_s=0.5, **sidecar_options)
    url = stack.enter_context(serving(make_sidecar_app(sidecar, operator_keys=[OPERATOR_KEY])))
    client = stack.enter_context(openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60))
    client.url = url
    return stack, sidecar, ledger, client


def _assert_counted_against_the_front(sidecar, ledger, honest) -> None:
    front = ledger.reputation(sidecar.upstreams[0].ledger_id)
    assert front.failures >= 1 and front.score < 0.5, front
    node = ledger.reputation(honest.key.node_id)
    assert node.failures == 0 and node.score >= 0.5, node


JSON_LIES = {
    "status-203": {},
    "text-field": {},
    "index-order": {},
    "usage-x50": {},
    "logprob-strings": {"logprobs": True, "top_logprobs": 3},
    "logprob-shift": {"logprobs": True, "top_logprobs": 3},
    "logprob-no-top": {"logprobs": True},
    "choices-reversed": {"n": 2, "temperature": 0.9, "seed": 3},
    "short-budget": {"max_tokens": None},
}


@pytest.mark.parametrize("mode", sorted(JSON_LIES))
def test_a_forged_field_never_reaches_the_client(honest, tmp_path, mode):
    """Attacks 1, 2a, 2c, 4 and 6: each forged answer is refused, whatever field it forges."""
    front = LyingFront(honest.url, mode)
    with serving(front.app()) as front_url:
        stack, sidecar, ledger, client = _through(honest, tmp_path, [front_url])
        with stack:
            ask = {k: v for k, v in {**ASK, **JSON_LIES[mode]}.items() if v is not None}
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="tiny", **ask)
            assert refused.value.status_code == 502 and refused.value.body["code"] == "answer_refused", refused.value.body
            _assert_counted_against_the_front(sidecar, ledger, honest)


@pytest.mark.parametrize("mode, hold", [("delta-forged", False), ("sse-framing", False), ("sse-framing", True),
                                        ("stream-replay", False)])
def test_a_forged_stream_shows_no_forged_text_and_ends_refused(honest, tmp_path, mode, hold):
    """Attacks 2b and 3: the sidecar shows only text rebuilt from token ids, the finish only once
    bound, and ends a stream it cannot bind in an error event; with --hold-streams nothing at all."""
    front = LyingFront(honest.url, mode)
    with serving(front.app()) as front_url:
        stack, sidecar, ledger, client = _through(honest, tmp_path, [front_url], hold_streams=hold)
        with stack:
            if mode == "stream-replay":  # an honest first answer, recorded by the front
                first = "".join(c.choices[0].delta.content or "" for c in
                                client.chat.completions.create(model="tiny", stream=True, **ASK) if c.choices)
                assert first and FORGED not in first
            shown, finishes = [], []
            with pytest.raises(openai.APIError) as failed:
                for chunk in client.chat.completions.create(model="tiny", stream=True, **ASK):
                    shown += [c.delta.content or "" for c in chunk.choices]
                    finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
            assert "answer_refused" in str(failed.value.body) or "refused" in str(failed.value), failed.value
            assert FORGED not in "".join(shown) and not finishes
            assert not hold or not "".join(shown)
            _assert_counted_against_the_front(sidecar, ledger, honest)


def test_an_honest_stream_and_answer_are_rebuilt_exactly(honest, tmp_path):
    """The control: through an honest front, a stream (with usage) and a JSON answer with
    logprobs arrive whole, their receipts and evidence tokens open the node's answer files, and
    the rebuilt JSON equals the node's own answer in every field but id and created."""
    front = LyingFront(honest.url, "honest")
    with serving(front.app()) as front_url:
        stack, sidecar, ledger, client = _through(honest, tmp_path, [front_url])
        with stack:
            chunks = list(client.chat.completions.create(model="tiny", stream=True, stream_options={"include_usage": True}, **ASK))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].usage.completion_tokens >= 1 and [c for c in chunks if c.choices][-1].choices[0].finish_reason
            ask = {**ASK, "logprobs": True, "top_logprobs": 2, "seed": 5}
            through, direct = (httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", **ask}, timeout=60).json()
                               for url in (client.url, honest.url))
            assert through["choices"][0]["message"]["content"] == text
            for answer in (through, direct):
                answer.pop("id"), answer.pop("created")
            # The same seed gives the same answer: the node signs a second receipt for it, the rest is equal.
            for answer in (through, direct):
                answer.pop("proofmesh")
                answer["choices"][0].pop("proofmesh")
            assert through == direct
            front_rep = ledger.reputation(sidecar.upstreams[0].ledger_id)
            assert front_rep.failures == 0


HOSTILE = ("relay-other-prompt", "replay", "withheld")


class HostileUpstream:
    """A second upstream with a fresh key and no model, that leans on the honest node A: it
    relays A's answer to another prompt, replays one of A's receipts, or names A's receipt and
    withholds its evidence."""

    def __init__(self, node_url: str, mode: str):
        self.node_url, self.mode = node_url, mode
        self.key = NodeKey.generate()
        self.old: bytes | None = None

    async def completion(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.mode == "relay-other-prompt":
            body["messages"] = [{"role": "user", "content": "Something else entirely"}]
        if self.mode == "replay" and self.old is not None:
            return web.Response(body=self.old, content_type="application/json")
        async with aiohttp.ClientSession() as session, session.post(f"{self.node_url}{request.path}", json=body) as resp:
            raw = await resp.read()
        self.old = raw
        return web.Response(status=resp.status, body=raw, content_type="application/json")

    async def receipt(self, request: web.Request) -> web.Response:
        if self.mode == "withheld":
            return web.json_response({"error": {"message": "gone", "type": "not_found_error"}}, status=404)
        async with aiohttp.ClientSession() as session, session.get(f"{self.node_url}{request.path_qs}") as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_id": self.key.node_id, "models": []})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_get("/v1/receipts/{receipt_id}", self.receipt)
        app.router.add_get("/health", self.health)
        return app


@pytest.mark.parametrize("mode", HOSTILE)
def test_a_hostile_co_upstream_cannot_sink_the_honest_node(honest, tmp_path, mode):
    """Attack 5: whatever the hostile upstream serves in A's name, only its own connection pays;
    A keeps its reputation and keeps getting requests. (Routing draws are seeded: the hostile
    upstream is drawn more than once, so the replay has something to replay.)"""
    random.seed(21)
    hostile = HostileUpstream(honest.url, mode)
    with serving(hostile.app()) as hostile_url:
        stack, sidecar, ledger, client = _through(honest, tmp_path, [honest.url, hostile_url])
        with stack:
            served = {"ok": 0, "refused": 0}
            for seed in range(12):
                try:
                    client.chat.completions.create(model="tiny", seed=seed, **{**ASK, "max_tokens": 3})
                    served["ok"] += 1
                except openai.APIStatusError as exc:
                    assert exc.body["code"] == "answer_refused", exc.body
                    served["refused"] += 1
            a, attacker = (ledger.reputation(sidecar.upstreams[i].ledger_id) for i in (0, 1))
            node = ledger.reputation(honest.key.node_id)
            assert a.failures == 0 and node.failures == 0 and node.score >= 0.5, (a, node)
            assert served["ok"] >= 1 and (mode == "replay" or served["refused"] >= 1), served
            if served["refused"]:
                assert attacker.failures >= 1 and attacker.score < 0.5, attacker



def test_a_node_with_api_keys_behind_the_sidecar_is_served_and_audited(honest, tmp_path, store):
    """The sidecar fetches evidence as its client would, with the client's key: a keyed node's
    answers bind and pass their audit (they were all 'withheld' when the fetch bore no key)."""
    model = load_model(str(honest.auditor.path), device="cpu", limits=LIMITS, root=store)
    evidence = EvidenceStore(tmp_path / "keyed.sqlite")
    with serving(make_app([model], NodeKey.generate(), evidence, api_keys=["client-key"])) as node_url:
        stack, sidecar, ledger, anonymous = _through(honest, tmp_path, [node_url])
        with stack, openai.OpenAI(base_url=f"{anonymous.url}/v1", api_key="client-key", max_retries=0, timeout=60) as client:
            answer = client.chat.completions.create(model="tiny", **ASK)
            assert answer.choices[0].message.content
            (audit,) = settled(anonymous.url, 1)
            assert audit["state"] == "pass", audit
            assert ledger.reputation(sidecar.upstreams[0].ledger_id).failures == 0
    evidence.close()
