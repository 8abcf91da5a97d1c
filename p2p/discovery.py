"""Discovery, on the bridge's trio thread: who is out there and what they serve.

Dial the bootstrap peers, then exchange capability tables (``/proofmesh/caps/1``,
``p2p/protocols.py``) with every known peer every ``EXCHANGE_INTERVAL_S``, and at once whenever
a new peer turns up (so news spreads in a few round trips, not intervals). A peer that cannot be
reached is forgotten (a closed connection triggers a round at once, so a peer that goes away is
dropped within a round trip); a record that is not refreshed expires after ``RECORD_TTL_S``.

Apart from ``p2p/network.py``, which is the asyncio side the node calls: nothing here is
awaited from asyncio, and nothing there runs on trio but what it hands to the bridge.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import trio

from p2p.errors import P2PError, WireError
from p2p.host import Host
from p2p.metrics import P2PMetrics
from p2p.peers import PeerTable
from p2p.protocols import LocalNode, Protocols
from p2p.wire import CAPS_PROTOCOL, Capability, SignedCapability
from verify.identity import NodeKey

log = logging.getLogger(__name__)

RECORD_TTL_S = 30.0  # a peer silent for this long (6 missed rounds) is dropped
EXCHANGE_INTERVAL_S = 5.0
REISSUE_S = RECORD_TTL_S / 3  # a third of a record's life: peers always hold one with two thirds left


class OwnRecord:
    """This node's signed capability record, as every exchange sends it."""

    def __init__(self, key: NodeKey, host: Host, local: LocalNode):
        self.key, self.host, self.local = key, host, local
        self._own: tuple[tuple, SignedCapability] | None = None  # (what it says, the signed record)

    def current(self) -> SignedCapability:
        """Re-issued when what it says changes or ``REISSUE_S`` has passed, otherwise the same
        one (peers then skip it without a signature check)."""
        offers, load, http = self.local.offers()
        addrs = self.host.addrs
        content = (offers, load, http, addrs)
        now = time.time()
        if self._own is None or self._own[0] != content or now - self._own[1].record.issued > REISSUE_S:
            record = Capability(peer_id=self.host.peer_id, models=offers, load=load, http=http, addrs=addrs,
                                issued=now, expires=now + RECORD_TTL_S)
            self._own = (content, SignedCapability.sign(record, self.key))
        return self._own[1]


class Discovery:
    """Rounds of capability exchanges that keep ``table`` current (run it in the host's nursery)."""

    def __init__(self, host: Host, table: PeerTable, protocols: Protocols, metrics: P2PMetrics,
                 bootstrap: Sequence[str]):
        self.host, self.table, self.protocols, self.metrics = host, table, protocols, metrics
        self.bootstrap = bootstrap
        self._wake: trio.Event | None = None
        protocols.on_new_peer = self._on_new_peer
        host.on_disconnect = self._on_disconnect

    def _on_new_peer(self, peer_id: str) -> None:
        log.info("new peer %s", peer_id)
        if self._wake is not None:
            self._wake.set()

    def _on_disconnect(self, peer_id: str) -> None:
        """A connection closed: check on that peer now (a round re-dials it, or forgets it)."""
        if self._wake is not None and peer_id in self.table.peer_ids():
            self._wake.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Rounds of exchanges: with every peer when there is news (a new peer, a lost
        connection), else only with those not heard from since the last round (an exchange
        updates both sides, so the peer that dialled us spares us dialling it). Supervised: a
        round that fails in any way is logged and counted, and the next one runs; nothing a
        peer sends can end discovery (or the p2p thread with it). Reports started once news
        is listened for."""
        self._wake = trio.Event()
        task_status.started()
        news = True
        while True:
            try:
                await self._round(news)
            except Exception:  # noqa: BLE001 - the supervisor: count it, keep discovering
                log.exception("a discovery round failed")
                self.metrics.failures.labels("discovery").inc()
            with trio.move_on_after(EXCHANGE_INTERVAL_S):
                await self._wake.wait()
            news = self._wake.is_set()
            self._wake = trio.Event()

    async def _round(self, news: bool) -> None:
        if not self.table.peer_ids():
            await self._bootstrap()
        for gone in self.table.expire():
            log.info("peer %s expired", gone)
        quiet_since = time.time() - (0 if news else EXCHANGE_INTERVAL_S)
        async with trio.open_nursery() as nursery:
            for state in self.table.snapshot():
                if state.last_seen <= quiet_since:
                    nursery.start_soon(self._exchange, state.record.peer_id)
        self.metrics.peers.set(len(self.table.peer_ids()))

    async def _bootstrap(self) -> None:
        for addr in self.bootstrap:
            try:
                peer_id = await self.host.connect(addr)
                await self.protocols.exchange(peer_id)
            except P2PError as exc:
                log.warning("bootstrap peer %s: %s", addr, exc)

    async def _exchange(self, peer_id: str) -> None:
        try:
            await self.protocols.exchange(peer_id)
        except WireError as exc:
            self.metrics.reject(CAPS_PROTOCOL, exc.reason)
            self.table.forget(peer_id)
        except P2PError as exc:
            log.info("peer %s is unreachable (%s): forgetting it", peer_id, exc)
            self.table.forget(peer_id)
        except Exception:  # noqa: BLE001 - whatever this peer caused, the round goes on
            log.exception("exchange with %s failed", peer_id)
            self.metrics.failures.labels("exchange").inc()
            self.table.forget(peer_id)
