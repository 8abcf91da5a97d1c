"""The peer table: which peer gets a request, what is believed and for how long."""

from __future__ import annotations

from p2p.peers import FAILURE_PENALTY, PeerTable
from p2p.wire import Capability, ModelOffer, SignedCapability
from verify.identity import NodeKey

MODEL = ModelOffer(name="m", model_id="cd" * 32, backend="cpu", max_context=64)


def _record(key: NodeKey, *, load: int = 0, issued: float = 100.0, models=(MODEL,)) -> SignedCapability:
    record = Capability(peer_id=key.node_id, models=list(models), load=load, addrs=[], issued=issued, expires=issued + 30)
    return SignedCapability.sign(record, key)


def test_best_peer_first_by_load_in_flight_latency_and_failures():
    me, a, b, c = (NodeKey.generate() for _ in range(4))
    table = PeerTable(me.node_id)
    for key, load in ((a, 3), (b, 0), (c, 1)):
        assert table.merge(_record(key, load=load), now=100.0)
    assert table.candidates("m") == [b.node_id, c.node_id, a.node_id]
    assert table.candidates(MODEL.model_id) == table.candidates("m")  # by model_id too
    assert table.candidates("other") == []

    table.add_in_flight(b.node_id, 2)  # this node already sent b two requests
    assert table.candidates("m")[0] == c.node_id
    table.seen(c.node_id, round_trip_s=0.05)  # 50 ms away: like five queued requests
    assert table.candidates("m") == [b.node_id, a.node_id, c.node_id]
    table.failed(b.node_id)
    assert table.snapshot()[1].failures == 1 and FAILURE_PENALTY > 3
    assert table.candidates("m")[-1] == b.node_id  # a peer that just failed is tried last
    table.seen(b.node_id)
    assert table.candidates("m")[0] == b.node_id  # and forgiven once it answers again


def test_newer_records_replace_older_and_gone_peers_stay_gone():
    me, a = NodeKey.generate(), NodeKey.generate()
    table = PeerTable(me.node_id)
    assert not table.merge(_record(me))  # never itself
    assert table.merge(_record(a, load=1, issued=100.0))
    assert not table.merge(_record(a, load=5, issued=90.0))  # older news is ignored
    assert table.snapshot()[0].record.load == 1
    assert table.is_news(_record(a, issued=110.0).record) and not table.is_news(_record(a, issued=100.0).record)
    table.merge(_record(a, load=2, issued=110.0))
    assert table.snapshot()[0].record.load == 2

    table.forget(a.node_id)  # unreachable
    assert not table.merge(_record(a, issued=110.0))  # its last record, still circulating, is refused
    assert table.merge(_record(a, issued=120.0))  # it re-announced itself: back

    assert table.expire(now=149.0) == []
    assert table.expire(now=151.0) == [a.node_id]
    assert table.peer_ids() == []
