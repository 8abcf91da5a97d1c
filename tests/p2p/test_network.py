"""Two or three in-process peers (each its own trio thread) with a fake node behind them:
discovery through a bootstrap peer, forwarding with failover, signed records, wire hygiene."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from p2p.errors import BadSignature, MessageTooLarge, NoPeerAvailable
from p2p.network import NetworkConfig, PeerNetwork
from p2p.wire import Capability, InferData, InferEnd, InferHead, InferRequest, ModelOffer, SignedCapability, encode_varint, frame, FramedStream
from verify.identity import NodeKey

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MODEL_ID = "ab" * 32


class FakeNode:
    def __init__(self, models: list[str], reply: str = "hello"):
        self.models, self.reply, self.load = models, reply, 0

    def offers(self):
        return [ModelOffer(name=m, model_id=MODEL_ID, backend="fake", max_context=64) for m in self.models], self.load, None

    async def infer(self, request: InferRequest) -> AsyncIterator:
        yield InferHead(status=200, content_type="application/json")
        yield InferData(data=self.reply)
        yield InferEnd()

    async def verify(self, answer):
        raise LookupError("no model")

    async def evidence(self, receipt_id, token):
        return None


async def _network(local: FakeNode, bootstrap: list[str] = ()) -> PeerNetwork:
    net = PeerNetwork(NodeKey.generate(), NetworkConfig([LOOPBACK], bootstrap), local, CollectorRegistry())
    await net.start()
    return net


async def _until(condition, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_discovery_and_forwarding_in_process():
    async def body() -> None:
        a = await _network(FakeNode([]))
        b = await _network(FakeNode(["m"], "from b"), [a.addrs[0]])
        c = await _network(FakeNode(["m"], "from c"), [a.addrs[0]])
        try:
            assert all(addr.endswith(f"/p2p/{a.peer_id}") for addr in a.addrs)
            await _until(lambda: len(a.table.peer_ids()) == 2 and len(b.table.peer_ids()) == 2 and len(c.table.peer_ids()) == 2)
            answer = await a.forward("m", "/v1/completions", "{}")
            assert answer.head.status == 200 and answer.peer_id in (b.peer_id, c.peer_id)
            assert [x async for x in answer.body] in (["from b"], ["from c"])
            with pytest.raises(NoPeerAvailable):
                await a.forward("other", "/v1/completions", "{}")
            await c.stop()  # c goes away: requests go to b, and c is forgotten
            for _ in range(3):
                answer = await a.forward("m", "/v1/completions", "{}")
                assert answer.peer_id == b.peer_id
                assert [x async for x in answer.body] == ["from b"]
            await _until(lambda: c.peer_id not in a.table.candidates("m"), timeout=30)  # next discovery round
        finally:
            for net in (a, b, c):
                await net.stop()

    asyncio.run(body())


def test_records_are_signed_by_their_peer():
    key, other = NodeKey.generate(), NodeKey.generate()
    now = time.time()
    record = Capability(peer_id=key.node_id, models=[], load=0, addrs=[], issued=now, expires=now + 30)
    signed = SignedCapability.sign(record, key)
    assert signed.check() == record
    forged = SignedCapability(record=record, signature=SignedCapability.sign(
        record.model_copy(update={"peer_id": other.node_id}), other).signature)
    with pytest.raises(BadSignature):
        forged.check()
    with pytest.raises(BadSignature):
        signed.check(now=now + 60)  # expired
    with pytest.raises(ValueError):
        SignedCapability.sign(record, other)


def test_frames_and_their_caps():
    assert encode_varint(0) == b"\x00" and encode_varint(300) == b"\xac\x02"
    record = Capability(peer_id=NodeKey.generate().node_id, models=[], load=0, addrs=[], issued=1.0, expires=2.0)
    payload = record.model_dump_json().encode()
    assert frame(payload) == encode_varint(len(payload)) + payload
    with pytest.raises(MessageTooLarge):
        asyncio.run(_write_capped(record))


async def _write_capped(record: Capability) -> None:
    await FramedStream(stream=None, max_bytes=10).write(record)  # refused before touching the stream


@pytest.mark.parametrize("args, message", [
    (["--p2p-listen", "/ip4/127.0.0.1/tcp/notaport"], "is not a multiaddr"),
    (["--p2p-listen", "/ip4/192.0.2.1/tcp/0"], "could not listen"),  # not an address of this machine
    (["--p2p-listen", LOOPBACK, "--bootstrap", "garbage"], "ending in /p2p/<peer id>"),
    ([], "need --p2p-listen"),
])
def test_run_refuses_unusable_p2p_settings(tmp_path, args, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "node.cli", "run", "--model", "none", "--port", "0", *args],
                          cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PROOFMESH_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_announced_addresses_replace_the_listening_ones():
    async def body() -> None:
        key = NodeKey.generate()
        net = PeerNetwork(key, NetworkConfig(["/ip4/0.0.0.0/tcp/0"], announce=["/ip4/203.0.113.7/tcp/4001"]),
                          FakeNode([]), CollectorRegistry())
        await net.start()
        try:
            assert net.addrs == [f"/ip4/203.0.113.7/tcp/4001/p2p/{key.node_id}"]
            assert net.record.current().record.addrs == net.addrs
        finally:
            await net.stop()

    asyncio.run(body())
