"""What a peer may ask of this node: per-peer budgets on every protocol, an allowlist, and the
addresses this node will dial for it.

A stranger's request costs this node real work (a forwarded generation, a teacher-forced
re-check, a database read, a fraud re-check), so each (peer, protocol) pair has a token bucket
(requests per second, with a burst) and a cap on requests at once; past either the request is
refused (``RateLimited``) and counted, and the peer can try again later. With an allowlist
(``--peer-allow``, or implied empty by ``--api-key``) only the listed peers get any work done;
discovery stays open to all.

Dialing: addresses learned from others' capability records are dialed only if they are public,
or private/loopback when this node itself listens on such an address or the operator allows it
(a record naming 10.0.0.1 must not make every node probe its own internal network); at most
``MAX_ADDRS_PER_RECORD`` of a record's addresses are kept, and at most ``NEW_PEERS_PER_WINDOW``
new peers are taken from records per ``WINDOW_S``.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Collection, Iterator

from p2p.errors import NotAllowed, RateLimited

MAX_ADDRS_PER_RECORD = 4
NEW_PEERS_PER_WINDOW = 64
WINDOW_S = 60.0


@dataclass(frozen=True)
class Budget:
    per_second: float
    burst: int
    at_once: int


# Per peer and protocol. A re-check is a whole prefill: one at a time, one every two seconds.
BUDGETS = {
    "/proofmesh/caps/1": Budget(per_second=2.0, burst=10, at_once=2),
    "/proofmesh/infer/1": Budget(per_second=50.0, burst=100, at_once=32),  # a gateway forwards many users
    "/proofmesh/verify/1": Budget(per_second=0.5, burst=2, at_once=1),
    "/proofmesh/evidence/1": Budget(per_second=20.0, burst=40, at_once=4),
    "/proofmesh/fraud/1": Budget(per_second=1.0, burst=5, at_once=2),
}
OPEN_PROTOCOLS = ("/proofmesh/caps/1",)  # discovery: open to peers outside an allowlist


class PeerLimits:
    """Token buckets and concurrency counts per (peer, protocol); thread-safe (trio thread)."""

    def __init__(self, allow: Collection[str] | None = None, budgets: dict[str, Budget] = BUDGETS):
        self.allow = None if allow is None else frozenset(allow)
        self.budgets = budgets
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], tuple[float, float]] = {}  # (tokens, at)
        self._busy: dict[tuple[str, str], int] = defaultdict(int)

    @contextmanager
    def admit(self, peer_id: str, protocol: str) -> Iterator[None]:
        """Hold one of ``peer_id``'s slots on ``protocol`` while the work runs."""
        if self.allow is not None and protocol not in OPEN_PROTOCOLS and peer_id not in self.allow:
            raise NotAllowed(f"{peer_id} is not on this node's allowlist")
        budget, key, now = self.budgets[protocol], (peer_id, protocol), time.monotonic()
        with self._lock:
            tokens, at = self._tokens.get(key, (float(budget.burst), now))
            tokens = min(float(budget.burst), tokens + (now - at) * budget.per_second)
            if tokens < 1.0:
                raise RateLimited(f"{peer_id} is past {budget.per_second:g}/s on {protocol}")
            if self._busy[key] >= budget.at_once:
                raise RateLimited(f"{peer_id} already has {budget.at_once} {protocol} request(s) running")
            self._tokens[key] = (tokens - 1.0, now)
            self._busy[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[key] -= 1


def is_private(addr: str) -> bool:
    """Whether a multiaddr names a loopback, private, link-local or unspecified IP (or a name:
    names resolve to anything, so they count as private)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return True
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return True
    return not ip.is_global


class DialPolicy:
    """Which learned addresses this node will dial, and how many new peers it takes per window."""

    def __init__(self, own_addrs: Collection[str], allow_private: bool = False):
        self.allow_private = allow_private or any(is_private(a) for a in own_addrs)
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()

    def usable(self, addrs: Collection[str]) -> list[str]:
        """The addresses of a record this node may dial (at most ``MAX_ADDRS_PER_RECORD``)."""
        return [a for a in addrs if self.allow_private or not is_private(a)][:MAX_ADDRS_PER_RECORD]

    def take_new_peer(self) -> bool:
        """Whether one more new peer fits this window's budget (and count it if so)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0] > WINDOW_S:
                self._recent.popleft()
            if len(self._recent) >= NEW_PEERS_PER_WINDOW:
                return False
            self._recent.append(now)
            return True


__all__ = ["BUDGETS", "Budget", "DialPolicy", "PeerLimits", "is_private"]
