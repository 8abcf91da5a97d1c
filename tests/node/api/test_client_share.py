"""One client's share (issue 21, attacks 7-10, DESIGN.md "No one client may take what everyone
shares"), each attack run scaled down against a real node on 127.0.0.1 (``make_app``, a real
evidence store, real clients): the attacker is throttled (429, OpenAI-shaped, Retry-After) or
its cost bounded (400 naming the bound), and another client is still served meanwhile.

Clients are told apart as the node tells them apart (``node.api.clients``): by API key, and for
connections by address (the attacker connects from 127.0.0.2, the victim from 127.0.0.1).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import numpy as np
import openai
import pytest

from node.api.app import make_app
from node.api.clients import BODY_BURST_BYTES, BodyBudget
from node.api.evidence_tokens import receipt_path
from node.api.protocol import MAX_MESSAGES, MAX_PROMPT_CHARS
from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import serving
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS

MODEL = "tiny"
ATTACKER_KEY, VICTIM_KEY = "sk-attacker", "sk-victim"
HELLO = [{"role": "user", "content": "Hello there"}]
# Batch 16 over 4,096 KV slots: sixteen 240-token prompts fill the cache, as attack 10's did.
LIMITS = CacheLimits(max_batch_size=16, max_total_tokens=4096, prefill_chunk=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory, store):
    return load_model(str(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("share") / MODEL)), device="cpu",
                      limits=LIMITS, root=store)


@contextmanager
def node(model, evidence: EvidenceStore, *, max_connections: int = 64, **app_options) -> Iterator[str]:
    """One node serving ``model`` with both clients' keys (each test its own: its own limits)."""
    try:
        with serving(make_app([model], NodeKey.generate(), evidence, api_keys=[ATTACKER_KEY, VICTIM_KEY], **app_options),
                     max_connections=max_connections) as url:
            yield url
    finally:
        evidence.close()


def http(url: str, key: str, source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        transport=httpx.HTTPTransport(local_address=source))


def victim_answer(url: str) -> str:
    """The receipt id of what the victim, an ordinary openai client, is served."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=VICTIM_KEY, max_retries=0, timeout=60) as client:
        choice = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, seed=1).choices[0]
    assert choice.finish_reason in ("stop", "length")
    return choice.model_extra["proofmesh"]["receipt"]["receipt_id"]


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "client_share_exceeded" and error["message"]


def test_attack_7_one_client_cannot_fill_the_evidence_store(model, tmp_path):
    """n = 16, max_tokens 1, four stop strings at the cap, again and again: the stop strings are
    kept once a request, and once the attacker's evidence takes its share (half the store) it
    gets 429 while the victim is still served; none of the attacker's evidence is evicted.
    (Before: every choice kept its own copy, nothing told the attacker apart, and the store
    filled: 503 ``evidence_store_full`` for everyone.)"""
    rng = np.random.default_rng(7)
    stops = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), MAX_STOP_CHARS)) for _ in range(MAX_STOP_STRINGS)]
    evidence = EvidenceStore(tmp_path / "evidence.sqlite", max_bytes=160_000)
    with node(model, evidence) as url, http(url, ATTACKER_KEY) as attacker:
        flood = {"model": MODEL, "prompt": "Hello", "n": 16, "max_tokens": 1, "stop": stops}
        receipts = []
        for _ in range(40):
            response = attacker.post("/v1/completions", json=flood)
            if response.status_code != 200:
                break
            receipts += [receipt_path(c["proofmesh"]["receipt"]["receipt_id"], c["proofmesh"]["evidence_token"])
                         for c in response.json()["choices"]]
        assert_throttled(response)
        assert victim_answer(url)
        assert all(attacker.get(path).status_code == 200 for path in receipts)  # none evicted
        for bad, why in ((stops + ["x"], "five"), (["y" * (MAX_STOP_CHARS + 1)], "too long")):
            refused = attacker.post("/v1/completions", json={**flood, "stop": bad})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop", why
            assert f"at most {MAX_STOP_STRINGS} stop strings" in refused.json()["error"]["message"]


def test_attack_8_a_request_cost_is_bounded_before_the_node_works_through_it(model, tmp_path):
    """1 MiB bodies of 29,000 one-letter messages: a 400 naming the bound on messages, counted
    before any message is validated; prompt text past the bound on characters likewise; the
    victim is served while attackers keep sending such bodies (parsing runs off the event loop).
    (Before: each body was validated, templated and tokenized on the event loop, then refused
    for its length in tokens.)"""
    flood = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 29_000}).encode()
    assert len(flood) < 1 << 20
    with node(model, EvidenceStore(tmp_path / "evidence.sqlite")) as url, http(url, ATTACKER_KEY) as attacker:
        refused = attacker.post("/v1/chat/completions", content=flood, headers={"Content-Type": "application/json"})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "messages" and f"at most {MAX_MESSAGES:,}" in error["message"]
        long_prompt = attacker.post("/v1/completions", json={"model": MODEL, "prompt": "ab" * (MAX_PROMPT_CHARS // 2 + 1)})
        assert long_prompt.status_code == 400 and long_prompt.json()["error"]["param"] == "prompt"
        assert f"at most {MAX_PROMPT_CHARS:,}" in long_prompt.json()["error"]["message"]

        stop = threading.Event()

        def keep_flooding() -> None:
            with http(url, ATTACKER_KEY) as c:
                while not stop.is_set():
                    c.post("/v1/chat/completions", content=flood, headers={"Content-Type": "application/json"})

        floods = [threading.Thread(target=keep_flooding) for _ in range(4)]
        for t in floods:
            t.start()
        try:
            assert victim_answer(url)
        finally:
            stop.set()
            for t in floods:
                t.join(60)
        # Back to back, the same bodies soon exceed the client's body budget: 429 before any
        # parsing (parsing holds the GIL, off the loop or not), while another client is served.
        statuses = [attacker.post("/v1/chat/completions", content=flood, headers={"Content-Type": "application/json"})
                    for _ in range(int(BODY_BURST_BYTES / len(flood)) + 2)]
        assert statuses[-1].status_code == 429 and statuses[-1].json()["error"]["code"] == "client_share_exceeded"
        assert int(statuses[-1].headers["Retry-After"]) >= 1
        assert victim_answer(url)


def test_a_body_budget_refills_at_its_rate():
    now = [0.0]
    budget = BodyBudget(rate=100, burst=300, clock=lambda: now[0])
    assert budget.take("a", 200) == 0 and budget.take("a", 100) == 0
    assert budget.take("a", 50) == pytest.approx(0.5) and budget.take("b", 300) == 0  # one client's spending is its own
    now[0] = 0.5
    assert budget.take("a", 50) == 0 and budget.take("a", 1) > 0


def test_attack_9_one_client_s_keep_alive_connections_leave_room_for_others(model, tmp_path):
    """Legal keep-alive connections that each poll /health, as many as the node's cap: past its
    share (half) the attacker's connections get 429 at once, and the victim connects and is
    served. (Before: the attacker held every socket and the victim got 503.)"""
    cap = 8
    with node(model, EvidenceStore(tmp_path / "evidence.sqlite"), max_connections=cap) as url:
        attackers = [http(url, ATTACKER_KEY, source="127.0.0.2") for _ in range(cap)]
        try:
            statuses = []
            for c in attackers:  # each client keeps its one connection alive
                try:
                    response = c.get("/health")
                except httpx.TransportError:  # refused and closed before the request was written
                    statuses.append("reset")
                    continue
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert_throttled(response)
            assert statuses[: cap // 2] == [200] * (cap // 2) and 200 not in statuses[cap // 2 :], statuses
            assert victim_answer(url)
            assert attackers[0].get("/health").status_code == 200  # its admitted connections still serve it
        finally:
            for c in attackers:
                c.close()


def test_attack_10_one_client_s_long_prompts_do_not_hold_the_engine(model, tmp_path):
    """Four requests of 16 x 240-token id prompts, max_tokens 1, at once: the attacker holds at
    most half the queue (429 past it), the victim takes the next free slot, its prefill goes in
    turn with the attacker's (a bounded number of prompt tokens per engine step), and its answer
    is signed while attacker sequences are still waiting. (Before: one FIFO queue, and every
    admitted prefill ran back to back in one step: the victim's answer came after all of the
    attacker's.)"""
    rng = np.random.default_rng(10)
    flood = {"model": MODEL, "prompt": rng.integers(3, 300, size=(16, 240)).tolist(), "max_tokens": 1}
    evidence = EvidenceStore(tmp_path / "evidence.sqlite")
    path = evidence.path
    with node(model, evidence) as url:
        statuses: list[int] = []

        def attack() -> None:
            with http(url, ATTACKER_KEY) as c:
                statuses.append(c.post("/v1/completions", json=flood).status_code)

        attacks = [threading.Thread(target=attack) for _ in range(4)]
        for t in attacks:
            t.start()
        with httpx.Client(base_url=url, timeout=10) as probe:  # until the attack is queued up at the engine
            deadline = time.monotonic() + 30
            while (m := probe.get("/health").json()["models"][0])["queue_depth"] < 16:
                assert time.monotonic() < deadline and any(t.is_alive() for t in attacks), f"the attack never queued up: {statuses}"
        victim = victim_answer(url)
        for t in attacks:
            t.join(60)
    assert 200 in statuses and set(statuses) <= {200, 429}, statuses
    with sqlite3.connect(path) as db:  # the order in which the node signed the answers
        signed = [r for (r,) in db.execute("SELECT receipt_id FROM answers ORDER BY created")]
    assert len(signed) - signed.index(victim) > 8, f"the victim's answer was signed {signed.index(victim) + 1}th of {len(signed)}"
