"""A node on the open network meets strangers: hostile peers against real ``proofmesh run``
processes on 127.0.0.1 (a gateway, and a node serving the tiny model with an allowlist that
names nobody the attacker controls). The attacker is an in-process libp2p host with a valid
Noise identity; every message it sends is well formed enough to reach the handlers.

- 512 fresh self-signed records in one message (what used to end the p2p thread): the node
  answers the next exchange, /health stays ok, the table stays under its cap, and the flood of
  new keys is held to the new-peer budget;
- a record "valid" for billions of years is refused and counted;
- a re-check request longer than the remote token cap is refused without model work;
- a burst of fraud notices from one peer is rate limited;
- a node with --peer-allow refuses a stranger's work but still exchanges records with it.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import trio

from p2p.errors import StreamFailed
from p2p.host import Host
from p2p.protocols import MAX_REMOTE_VERIFY_TOKENS
from p2p.wire import (CAPS_MAX_BYTES, CAPS_PROTOCOL, EVIDENCE_MAX_BYTES, FRAUD_PROTOCOL, INFER_PROTOCOL,
                      VERIFY_PROTOCOL, Capability, CapsExchange, FraudNotice, InferRequest, Reply, SignedCapability,
                      VerifyRequest)
from tests.p2p.cluster import LOOPBACK, NodeProcess, tiny_cluster
from tests.verify.test_evidence_store import make_answer
from verify.fraud import FraudProof, sign_verdict
from verify.identity import NodeKey
from verify.verifier import Verdict


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, store):
    cluster, tiny = tiny_cluster(tmp_path_factory, store)
    try:
        gateway = cluster.wait_ready(cluster.start("gateway", []))
        friend = NodeKey.generate().node_id  # the only peer the server serves: not the attacker
        server = cluster.wait_ready(cluster.start("server", [str(tiny)], bootstrap=[gateway.addrs[0]],
                                                  extra=["--peer-allow", friend, gateway.peer_id]))
        yield gateway, server
    finally:
        cluster.close()


def _counters(node: NodeProcess, name: str) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(node.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.findall(rf'^{name}_total\{{([^}}]*)\}} ([0-9.e+]+)$', text, re.M)
    return {tuple(v for _, v in re.findall(r'(\w+)="([^"]*)"', labels)): float(value) for labels, value in found}


def _rejected(node: NodeProcess, protocol: str, reason: str) -> float:
    return _counters(node, "proofmesh_p2p_rejected_messages").get((protocol, reason), 0.0)


BLACKHOLE = "/ip4/10.255.255.1/tcp/4001"  # dials to it hang until their timeout: the records stay a while


def _record(key: NodeKey, *, lifetime: float = 30.0, addrs: list[str] = ()) -> SignedCapability:
    now = time.time()
    record = Capability(peer_id=key.node_id, models=[], load=0, addrs=list(addrs), issued=now, expires=now + lifetime)
    return SignedCapability.sign(record, key)


async def _as_stranger(target: NodeProcess, attack) -> object:
    key = NodeKey.generate()
    host = Host(key, lambda protocol, reason: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, [LOOPBACK])
        await host.connect(target.addrs[0])
        try:
            return await attack(host, key)
        finally:
            nursery.cancel_scope.cancel()


def test_a_flood_of_512_records_leaves_discovery_alive(nodes):
    gateway, _ = nodes

    async def flood(host: Host, key: NodeKey) -> list[CapsExchange]:
        replies = []
        for records in ([_record(NodeKey.generate(), addrs=[BLACKHOLE]) for _ in range(511)] + [_record(key)],
                        [_record(key)]):  # a second exchange: the node still answers with its table
            replies.append(await host.request(gateway.peer_id, CAPS_PROTOCOL, CAPS_MAX_BYTES, CapsExchange(records=records),
                                              CapsExchange))
            await trio.sleep(3)  # a discovery round runs on the news meanwhile (where the thread used to die)
        return replies

    before = _rejected(gateway, CAPS_PROTOCOL, "new_peer_budget")
    first, second = trio.run(_as_stranger, gateway, flood)
    assert gateway.get("/health")["status"] == "ok" and gateway.get("/health")["p2p"] == "ok"
    assert len(second.records) <= 512
    assert _rejected(gateway, CAPS_PROTOCOL, "new_peer_budget") - before >= 512 - 64
    assert len(gateway.get("/v1/peers")["data"]) <= 511
    assert gateway.process.poll() is None


def test_a_record_claiming_a_far_expiry_is_refused(nodes):
    gateway, _ = nodes
    liar = NodeKey.generate()

    async def claim(host: Host, key: NodeKey) -> CapsExchange:
        claimed = CapsExchange(records=[_record(liar, lifetime=3e10 * 365 * 24 * 3600)])
        return await host.request(gateway.peer_id, CAPS_PROTOCOL, CAPS_MAX_BYTES, claimed, CapsExchange)

    before = _rejected(gateway, CAPS_PROTOCOL, "untrusted_record")
    trio.run(_as_stranger, gateway, claim)
    assert _rejected(gateway, CAPS_PROTOCOL, "untrusted_record") - before == 1
    assert liar.node_id not in {p["peer_id"] for p in gateway.get("/v1/peers")["data"]}


def test_a_re_check_past_the_token_cap_is_refused_without_model_work(nodes):
    gateway, _ = nodes  # the gateway serves no model: a model would never be reached anyway
    too_long = make_answer(MAX_REMOTE_VERIFY_TOKENS)  # 20 prompt tokens + the cap: one over

    async def ask(host: Host, key: NodeKey) -> Reply:
        return await host.request(gateway.peer_id, VERIFY_PROTOCOL, EVIDENCE_MAX_BYTES, VerifyRequest(answer=too_long), Reply)

    reply = trio.run(_as_stranger, gateway, ask)
    assert reply.attestation is None and f"at most {MAX_REMOTE_VERIFY_TOKENS} tokens" in reply.error


def test_a_burst_of_fraud_notices_is_rate_limited(nodes):
    gateway, _ = nodes
    answer = make_answer(4, seed=3)

    async def burst(host: Host, key: NodeKey) -> None:
        verdict = sign_verdict(Verdict(receipt_id=answer.receipt.receipt_id, verdict="fraud", reasons=["x"], failures=[]), key)
        for _ in range(20):
            try:
                await host.request(gateway.peer_id, FRAUD_PROTOCOL, EVIDENCE_MAX_BYTES,
                                   FraudNotice(proof=FraudProof(answer=answer, verdict=verdict)))
            except StreamFailed:
                pass

    before = _rejected(gateway, FRAUD_PROTOCOL, "rate_limited")
    trio.run(_as_stranger, gateway, burst)
    deadline = time.monotonic() + 10
    while _rejected(gateway, FRAUD_PROTOCOL, "rate_limited") - before < 10:
        assert time.monotonic() < deadline, "the burst was not limited"
        time.sleep(0.2)
    assert gateway.get("/health")["status"] == "ok"


def test_an_allowlist_refuses_a_strangers_work_but_not_its_records(nodes):
    _, server = nodes

    async def ask(host: Host, key: NodeKey) -> tuple[CapsExchange, bool]:
        table = await host.request(server.peer_id, CAPS_PROTOCOL, CAPS_MAX_BYTES, CapsExchange(records=[_record(key)]), CapsExchange)
        stream = await host.open(server.peer_id, INFER_PROTOCOL, CAPS_MAX_BYTES)
        await stream.write(InferRequest(path="/v1/completions", body='{"model": "tiny", "prompt": "hi", "max_tokens": 2}'))
        try:
            await stream.read_frame(timeout=10)
            refused = False
        except StreamFailed:
            refused = True
        return table, refused

    before = _rejected(server, INFER_PROTOCOL, "not_allowed")
    table, refused = trio.run(_as_stranger, server, ask)
    assert server.peer_id in {r.record.peer_id for r in table.records} and refused
    assert _rejected(server, INFER_PROTOCOL, "not_allowed") - before == 1
