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


def test_dial_policy_dials_private_addresses_only_when_the_node_lives_on_them():
    from p2p.limits import MAX_ADDRS_PER_RECORD, DialPolicy, is_private

    assert is_private("/ip4/10.1.2.3/tcp/1") and is_private("/ip4/127.0.0.1/tcp/1") and is_private("/ip4/169.254.0.1/tcp/1")
    assert is_private("/dns4/internal.example/tcp/1") and is_private("/ip6/::1/tcp/1")
    assert not is_private("/ip4/8.8.8.8/tcp/4001") and not is_private("/ip6/2001:4860:4860::8888/tcp/1")
    addrs = ["/ip4/10.0.0.1/tcp/1", *(f"/ip4/8.8.8.{i}/tcp/1" for i in range(6))]
    public = DialPolicy(own_addrs=["/ip4/8.8.4.4/tcp/4001"])
    assert public.usable(addrs) == addrs[1:1 + MAX_ADDRS_PER_RECORD]
    assert DialPolicy(own_addrs=["/ip4/127.0.0.1/tcp/0"]).usable(addrs)[0] == "/ip4/10.0.0.1/tcp/1"
    assert DialPolicy(own_addrs=["/ip4/8.8.4.4/tcp/4001"], allow_private=True).usable(addrs[:1]) == addrs[:1]


def test_new_peers_per_window_are_budgeted():
    from p2p.limits import NEW_PEERS_PER_WINDOW, DialPolicy

    policy = DialPolicy(own_addrs=())
    taken = sum(policy.take_new_peer() for _ in range(NEW_PEERS_PER_WINDOW + 10))
    assert taken == NEW_PEERS_PER_WINDOW


def test_peer_budgets_limit_rate_and_concurrency_and_the_allowlist_keeps_discovery_open():
    import pytest

    from p2p.errors import NotAllowed, RateLimited
    from p2p.limits import Budget, PeerLimits

    limits = PeerLimits(budgets={"/proofmesh/verify/1": Budget(per_second=0.001, burst=2, at_once=1),
                                 "/proofmesh/caps/1": Budget(per_second=1, burst=1, at_once=1)})
    with limits.admit("a", "/proofmesh/verify/1"):
        with pytest.raises(RateLimited, match="already has 1"):  # one at a time
            with limits.admit("a", "/proofmesh/verify/1"):
                pass
        with limits.admit("b", "/proofmesh/verify/1"):  # another peer has its own budget
            pass
    with limits.admit("a", "/proofmesh/verify/1"):
        pass
    with pytest.raises(RateLimited, match="past"):  # the burst of 2 is spent and refills slowly
        with limits.admit("a", "/proofmesh/verify/1"):
            pass
    allow = PeerLimits(allow=["friend"], budgets=limits.budgets)
    with pytest.raises(NotAllowed):
        with allow.admit("stranger", "/proofmesh/verify/1"):
            pass
    with allow.admit("stranger", "/proofmesh/caps/1"):  # discovery stays open
        pass


def test_newcomers_weigh_until_they_are_seen_to_serve():
    import time as _time

    from p2p.peers import NEWCOMER_PENALTY, PeerTable
    from p2p.wire import Capability, ModelOffer, SignedCapability
    from verify.identity import NodeKey

    table = PeerTable("me")
    offer = ModelOffer(name="m", model_id="a" * 64, backend="b", max_context=8)
    veteran, newcomer = NodeKey.generate(), NodeKey.generate()
    now = _time.time()
    for key, load in ((veteran, 2), (newcomer, 0)):
        table.merge(SignedCapability.sign(Capability(peer_id=key.node_id, models=[offer], load=load, addrs=[],
                                                     issued=now, expires=now + 30), key))
    table.answered(veteran.node_id)
    assert table.candidates("m")[0] == veteran.node_id  # load 0 claimed, but never seen to answer
    table.answered(newcomer.node_id)
    assert table.candidates("m")[0] == newcomer.node_id and NEWCOMER_PENALTY > 2
