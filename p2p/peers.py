"""What a node knows about other peers: their signed capability records, when it last heard
from them, how fast they answer, and how often they failed it. Plain data, no I/O, one lock,
so the trio thread (which learns) and the asyncio thread (which routes and reports) share it.

Choosing a peer for a model: lowest ``load`` (the peer's announced queue, plus what this node
has in flight to it since), then latency, with recent failures weighing like a full queue each,
so a peer that just failed is tried last and the next request goes elsewhere; a peer never seen
to answer carries a newcomer's weight on top (a claimed load of 0 costs nothing to announce).

A peer that goes away is forgotten with a tombstone: its old record, still circulating in other
peers' tables until it expires, is not taken back; a newer record (the peer came back and
re-announced itself) is.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from p2p.wire import MAX_RECORDS_PER_MESSAGE, Capability, ModelOffer, SignedCapability

LATENCY_SMOOTHING = 0.3  # weight of a new round trip in the moving average
FAILURE_PENALTY = 8  # a failure counts like this many queued requests
LATENCY_UNIT_S = 0.01  # 10 ms of round trip counts like one queued request
# Records are cheap to make (any key signs its own), so the table is bounded: past this, new
# peers wait until known ones expire or go away (the peers already known, among them those
# whose service this node has seen, are never pushed out by newcomers). One fewer than a
# message holds, so this node's own record and its whole table always travel in one message.
MAX_PEERS = MAX_RECORDS_PER_MESSAGE - 1
# A peer this node has never seen answer weighs like this many queued requests: a new key
# that announces load 0 does not go first ahead of peers with a record of service.
NEWCOMER_PENALTY = 4


@dataclass
class PeerState:
    signed: SignedCapability
    last_seen: float  # unix seconds of the last record or successful stream
    latency_s: float | None = None
    failures: int = 0  # consecutive
    in_flight: int = 0  # requests this node has forwarded to it and not yet finished
    answered: int = 0  # requests this node forwarded to it that it answered to the end: observed service

    @property
    def record(self) -> Capability:
        return self.signed.record

    def serves(self, model: str) -> bool:
        return any(model in (m.name, m.model_id) for m in self.record.models)

    def cost(self) -> float:
        latency = (self.latency_s or 0.0) / LATENCY_UNIT_S
        newcomer = 0 if self.answered else NEWCOMER_PENALTY
        return self.record.load + self.in_flight + latency + FAILURE_PENALTY * self.failures + newcomer


@dataclass
class PeerTable:
    own_id: str
    _peers: dict[str, PeerState] = field(default_factory=dict)
    _gone: dict[str, float] = field(default_factory=dict)  # peer id -> issued of its last record
    _convicted: set[str] = field(default_factory=set)  # by an upheld fraud proof: never routed to again
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def merge(self, signed: SignedCapability, now: float | None = None) -> bool:
        """Take a checked record; True if it names a peer not known before."""
        record, now = signed.record, time.time() if now is None else now
        if record.peer_id == self.own_id:
            return False
        with self._lock:
            if record.issued <= self._gone.get(record.peer_id, -1.0):
                return False
            self._gone.pop(record.peer_id, None)
            known = self._peers.get(record.peer_id)
            if known is None:
                if len(self._peers) >= MAX_PEERS:
                    return False
                self._peers[record.peer_id] = PeerState(signed, now)
                return True
            if record.issued > known.record.issued:  # fresher news of it, possibly second-hand
                known.signed = signed
            return False

    def knows(self, peer_id: str) -> bool:
        with self._lock:
            return peer_id in self._peers

    def is_news(self, record: Capability) -> bool:
        """Whether ``merge`` would take ``record`` (cheap: no signature check)."""
        with self._lock:
            known = self._peers.get(record.peer_id)
            return (record.peer_id != self.own_id and record.issued > self._gone.get(record.peer_id, -1.0)
                    and (known is None or record.issued > known.record.issued))

    def seen(self, peer_id: str, round_trip_s: float | None = None) -> None:
        """A successful exchange with ``peer_id``."""
        with self._lock:
            state = self._peers.get(peer_id)
            if state is None:
                return
            state.last_seen, state.failures = time.time(), 0
            if round_trip_s is not None:
                old = state.latency_s
                state.latency_s = round_trip_s if old is None else old + LATENCY_SMOOTHING * (round_trip_s - old)

    def failed(self, peer_id: str) -> None:
        with self._lock:
            if peer_id in self._peers:
                self._peers[peer_id].failures += 1

    def forget(self, peer_id: str) -> None:
        """The peer is unreachable: drop it and refuse its current record from now on."""
        with self._lock:
            state = self._peers.pop(peer_id, None)
            if state is not None:
                self._gone[peer_id] = state.record.issued

    def expire(self, now: float | None = None) -> list[str]:
        """Drop records past their expiry; returns the peers dropped."""
        now = time.time() if now is None else now
        with self._lock:
            dead = [p for p, s in self._peers.items() if s.record.expires < now]
            for p in dead:
                del self._peers[p]
            return dead

    def answered(self, peer_id: str) -> None:
        """``peer_id`` answered a request this node forwarded to it, to the end."""
        with self._lock:
            if peer_id in self._peers:
                self._peers[peer_id].answered += 1

    def observed(self, model: str) -> set[str]:
        """Peers serving ``model`` whose service this node has seen itself (not merely their own
        claim to serve it), never a convicted one: whose fraud vouchers a gateway counts."""
        with self._lock:
            return {p for p, s in self._peers.items() if s.answered and s.serves(model) and p not in self._convicted}

    def add_in_flight(self, peer_id: str, delta: int) -> None:
        with self._lock:
            if peer_id in self._peers:
                self._peers[peer_id].in_flight += delta

    def convict(self, peer_id: str) -> None:
        with self._lock:
            self._convicted.add(peer_id)

    def convicted(self) -> set[str]:
        with self._lock:
            return set(self._convicted)

    def candidates(self, model: str) -> list[str]:
        """Peers that serve ``model`` (a name or a model_id), best first; never a convicted one."""
        with self._lock:
            serving = [s for s in self._peers.values() if s.serves(model) and s.record.peer_id not in self._convicted]
            return [s.record.peer_id for s in sorted(serving, key=PeerState.cost)]

    def records(self) -> list[SignedCapability]:
        with self._lock:
            return [s.signed for s in self._peers.values()]

    def peer_ids(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    def snapshot(self) -> list[PeerState]:
        """Copies, for reporting (GET /v1/peers)."""
        with self._lock:
            return [PeerState(s.signed, s.last_seen, s.latency_s, s.failures, s.in_flight, s.answered) for s in self._peers.values()]

    def offers(self) -> dict[str, tuple[ModelOffer, list[str]]]:
        """Every model reachable through a peer: name -> (offer, serving peer ids)."""
        out: dict[str, tuple[ModelOffer, list[str]]] = {}
        for state in self.snapshot():
            for offer in state.record.models:
                out.setdefault(offer.name, (offer, []))[1].append(state.record.peer_id)
        return out
