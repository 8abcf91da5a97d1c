"""Who a request comes from: the one client identity by which the node shares out what every
client shares (DESIGN.md, "Who signed what": evidence storage, queue places, running slots and
connections are shared out per client).

A client is the API key it bears, when the node has keys (then every ``/v1`` request bears a
valid one; a key sent to a node without keys proves nothing and is ignored, or any client would
be a new one per request), else its peer address. An IPv6 peer counts by its /64, the block
one subscriber is routinely given whole. Keys are named by a hash prefix, so an identity can
be logged or kept in the evidence store without the key itself.

Before a request's head arrives only the address is known: the listener counts connections by
``client_identity(None, address)``, which is what a keyless request's identity is too.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from typing import Callable

from aiohttp import web

IPV6_CLIENT_PREFIX = 64  # one subscriber's block (RFC 6177 allocates at least a /64 a site)

CLIENT = web.RequestKey("client", str)
"""Set on every request by ``node.api.errors.require_api_key``: ``client_identity`` of it."""

# Request body bytes one client may send a second, and at once. Parsing a body holds the GIL
# (tens of milliseconds for 1 MiB of JSON), so a client sending 1 MiB bodies back to back took
# the whole process from everyone (attack 8 of issue 21). 1 MiB/s is ~250k tokens of text a
# second, hundreds of times what a node prefills; the burst lets four full-size bodies through.
BODY_BYTES_PER_S = 1 << 20
BODY_BURST_BYTES = 4 << 20
MAX_TRACKED_CLIENTS = 65536  # past this, the clients whose buckets are full again are forgotten


class BodyBudget:
    """A token bucket of body bytes per client: ``take`` spends from it, or says how long until
    the client may send that much (nothing is spent then)."""

    def __init__(self, rate: float = BODY_BYTES_PER_S, burst: float = BODY_BURST_BYTES,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (bytes left, when)
        self._lock = threading.Lock()

    def take(self, client: str, nbytes: int) -> float:
        """0 when ``client`` may send ``nbytes`` now (they are spent), else the seconds to wait."""
        now = self.clock()
        with self._lock:
            left, then = self._buckets.get(client, (self.burst, now))
            left = min(self.burst, left + (now - then) * self.rate)
            if nbytes > left:
                self._buckets[client] = (left, now)
                return (min(nbytes, self.burst) - left) / self.rate
            self._buckets[client] = (left - nbytes, now)
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._forget_idle(now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        self._buckets = {c: (left, t) for c, (left, t) in self._buckets.items() if left + (now - t) * self.rate < self.burst}


BODY_BUDGET = web.AppKey("body_budget", BodyBudget)
"""The app's ``BodyBudget``, which ``node.api.errors.read_body`` spends from (node and sidecar)."""


def client_identity(api_key: str | None, peer: str | None) -> str:
    """``key:<16 hex of sha256(key)>`` for a request bearing a valid API key, else
    ``addr:<address>`` (an IPv6 one as its /64; ``addr:unknown`` when the transport has none)."""
    if api_key is not None:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    if peer is None:
        return "addr:unknown"
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:  # a Unix socket's path, say: itself
        return f"addr:{peer}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"addr:{address.ipv4_mapped}"
        return f"addr:{ipaddress.ip_network(f'{address}/{IPV6_CLIENT_PREFIX}', strict=False)}"
    return f"addr:{address}"
