"""The node's view of the network, for asyncio code: start and stop the host, discover peers,
forward a request to the best peer with failover, ask peers for verdicts and evidence.

Everything libp2p runs on the bridge's trio thread (``p2p/bridge.py``); the methods here are
asyncio coroutines that hand the work over. Discovery runs there on its own: dial the bootstrap
peers, then exchange capability tables with every known peer every ``EXCHANGE_INTERVAL_S``, and
at once whenever a new peer turns up (so news spreads in a few round trips, not intervals). A
peer that cannot be reached is forgotten (a closed connection triggers a round at once, so a
peer that goes away is dropped within a round trip); a record that is not refreshed expires.

Failover (``forward``): peers are tried best first (``p2p/peers.py``). A peer that fails before
the answer starts, or answers 429/503 (full), is skipped and the next one tried. Once a stream's
first token has been relayed the answer is committed to that peer: a failure after that reaches
the caller as ``StreamFailed`` (the HTTP layer ends the stream with an error chunk). A
non-streamed answer is collected whole before it is returned, so any failure in it is retried.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Collection, Sequence

import trio
from prometheus_client import CollectorRegistry

from p2p.bridge import TrioThread
from p2p.errors import MalformedMessage, NoPeerAvailable, P2PError, StreamFailed, WireError
from p2p.host import Host, check_listen_addr, peer_info
from p2p.limits import DialPolicy, PeerLimits
from p2p.metrics import P2PMetrics
from p2p.peers import PeerState, PeerTable
from p2p.protocols import LocalNode, Protocols
from p2p.wire import Capability, FraudNotice, InferData, InferEnd, InferHead, InferPath, InferRequest, SignedCapability
from verify.attestation import Attestation
from verify.evidence import AnswerFile
from verify.identity import NodeKey

log = logging.getLogger(__name__)

RECORD_TTL_S = 30.0  # a peer silent for this long (6 missed rounds) is dropped
EXCHANGE_INTERVAL_S = 5.0
REISSUE_S = RECORD_TTL_S / 3
MAX_ATTEMPTS = 3  # peers tried per forwarded request
BUSY_STATUSES = (429, 503)  # the peer is full or shutting down: another one may take it
SSE_CONTENT_TYPE = "text/event-stream"
# A non-streamed answer is held whole before it is relayed (so a failure can be retried): at
# most this much of it (an answer of 16k tokens with logprobs is a few MB).
MAX_BUFFERED_ANSWER_CHARS = 16 << 20
# A streamed answer is relayed as it comes, but not without end: a peer that keeps streaming past
# this (an answer of the whole context with logprobs stays far below) is cut off.
MAX_RELAYED_ANSWER_CHARS = 64 << 20
_VALIDATOR_DRAW = random.SystemRandom()


@dataclass(frozen=True)
class NetworkConfig:
    listen: Sequence[str]
    bootstrap: Sequence[str] = ()
    announce: Sequence[str] = ()  # where peers should dial this node (default: where it listens)
    peer_allow: Sequence[str] | None = None  # peers that may ask for work (None: any); discovery is open
    allow_private: bool = False  # dial private/loopback addresses learned from records (implied by listening on one)


@dataclass
class Forwarded:
    """An answer from a peer: its status and content type, then its body as it arrives."""

    peer_id: str
    head: InferHead
    body: AsyncIterator[str]

    @property
    def streaming(self) -> bool:
        return self.head.content_type.startswith(SSE_CONTENT_TYPE)


@dataclass
class PeerNetwork:
    """One node's membership of the network (asyncio side)."""

    key: NodeKey
    config: NetworkConfig
    local: LocalNode
    registry: CollectorRegistry
    bridge: TrioThread = field(default_factory=TrioThread)

    def __post_init__(self) -> None:
        """Raises ``P2PError`` for an address that is not a multiaddr (before anything starts)."""
        for addr in (*self.config.listen, *self.config.announce):
            check_listen_addr(addr)
        for addr in self.config.bootstrap:
            peer_info(addr)
        self.metrics = P2PMetrics(self.registry)
        self.table = PeerTable(self.key.node_id)
        self._serving = False
        self._build()

    def _build(self) -> None:
        """A fresh host and protocol set on the current bridge (at start, and on a restart;
        the peer table, with its convictions, is kept)."""
        self.host = Host(self.key, self.metrics.reject, self.config.announce)
        self.protocols = Protocols(self.host, self.table, self.bridge, self.local, self.own_record, self.metrics.reject,
                                   PeerLimits(self.config.peer_allow),
                                   DialPolicy((*self.config.listen, *self.config.announce), self.config.allow_private))
        self._wake: trio.Event | None = None
        self._own: tuple[tuple, SignedCapability] | None = None  # (what it says, the signed record)
        self.protocols.on_new_peer = self._on_new_peer
        self.host.on_disconnect = self._on_disconnect

    @property
    def running(self) -> bool:
        """Whether the p2p thread is alive and serving (False: degraded, see ``restart``)."""
        return self.bridge.alive and self._serving

    async def restart(self) -> None:
        """Start the p2p side again after its thread died: a new thread, host and protocols."""
        self.metrics.failures.labels("thread").inc()
        await self.bridge.stop()
        self.bridge = TrioThread()
        self._build()
        await self.start()

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.host.addrs

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen, then discover in the background; raises ``P2PError`` if it cannot listen."""
        await self.bridge.start()
        try:
            await self.bridge.start_service(self._serve)
        except Exception as exc:  # noqa: BLE001 - libp2p's, often in trio's exception groups
            await self.bridge.stop()
            raise P2PError(f"cannot listen on {', '.join(self.config.listen)}: {_leaves(exc)}") from exc
        except BaseException:
            await self.bridge.stop()
            raise

    async def stop(self) -> None:
        await self.bridge.stop()

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._serve_until_cancelled(task_status)
        finally:
            self._serving = False

    async def _serve_until_cancelled(self, task_status) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.host.run, list(self.config.listen))
            self._serving = True
            self._wake = trio.Event()
            task_status.started()
            nursery.start_soon(self._discover)

    # -- discovery (trio) ------------------------------------------------------------------
    def own_record(self) -> SignedCapability:
        """This node's signed record: re-issued when what it says changes or a third of its life
        has passed, otherwise the same one (peers then skip it without a signature check)."""
        offers, load, http = self.local.offers()
        content = (offers, load, http, self.addrs)
        now = time.time()
        if self._own is None or self._own[0] != content or now - self._own[1].record.issued > REISSUE_S:
            record = Capability(peer_id=self.peer_id, models=offers, load=load, http=http, addrs=self.addrs,
                                issued=now, expires=now + RECORD_TTL_S)
            self._own = (content, SignedCapability.sign(record, self.key))
        return self._own[1]

    def _on_new_peer(self, peer_id: str) -> None:
        log.info("new peer %s", peer_id)
        if self._wake is not None:
            self._wake.set()

    def _on_disconnect(self, peer_id: str) -> None:
        """A connection closed: check on that peer now (a round re-dials it, or forgets it)."""
        if self._wake is not None and peer_id in self.table.peer_ids():
            self._wake.set()

    async def _discover(self) -> None:
        """Rounds of exchanges: with every peer when there is news (a new peer, a lost
        connection), else only with those not heard from since the last round (an exchange
        updates both sides, so the peer that dialled us spares us dialling it). Supervised: a
        round that fails in any way is logged and counted, and the next one runs; nothing a
        peer sends can end discovery (or the p2p thread with it)."""
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
        for addr in self.config.bootstrap:
            try:
                peer_id = await self.host.connect(addr)
                await self.protocols.exchange(peer_id)
            except P2PError as exc:
                log.warning("bootstrap peer %s: %s", addr, exc)

    async def _exchange(self, peer_id: str) -> None:
        try:
            await self.protocols.exchange(peer_id)
        except WireError as exc:
            self.metrics.reject("/proofmesh/caps/1", exc.reason)
            self.table.forget(peer_id)
        except P2PError as exc:
            log.info("peer %s is unreachable (%s): forgetting it", peer_id, exc)
            self.table.forget(peer_id)
        except Exception:  # noqa: BLE001 - whatever this peer caused, the round goes on
            log.exception("exchange with %s failed", peer_id)
            self.metrics.failures.labels("exchange").inc()
            self.table.forget(peer_id)

    # -- routing (asyncio) -----------------------------------------------------------------
    def serves(self, model: str) -> bool:
        return bool(self.table.candidates(model))

    def peers(self) -> list[PeerState]:
        return self.table.snapshot()

    async def forward(self, model: str, path: InferPath, body: str) -> Forwarded:
        """The answer of the best peer that serves ``model`` and takes the request."""
        request = InferRequest(path=path, body=body)
        problems = []
        for peer_id in self.table.candidates(model)[:MAX_ATTEMPTS]:
            try:
                answer = await self._try_peer(peer_id, request)
            except P2PError as exc:
                problems.append(f"{peer_id}: {exc}")
                self.metrics.forwarded.labels("retried").inc()
                continue
            if answer is not None:
                self.metrics.forwarded.labels("answered").inc()
                return answer
            problems.append(f"{peer_id}: busy")
        self.metrics.forwarded.labels("no_peer").inc()
        detail = "; ".join(problems) if problems else "no known peer serves it"
        raise NoPeerAvailable(f"no peer could answer for model {model!r} ({detail})")

    async def _try_peer(self, peer_id: str, request: InferRequest) -> Forwarded | None:
        """The peer's answer once it has started (``None``: the peer is busy)."""
        parts = self.bridge.iterate(self.protocols.infer, peer_id, request)
        self.table.add_in_flight(peer_id, 1)
        released = committed = False

        def release() -> None:  # once, whoever ends the answer
            nonlocal released
            if not released:
                released = True
                self.table.add_in_flight(peer_id, -1)

        try:
            head = await anext(parts, None)
            if not isinstance(head, InferHead):
                raise MalformedMessage("an answer must start with its head")
            if head.status in BUSY_STATUSES:
                return None
            if head.end:  # the whole answer came in its head
                self.table.seen(peer_id)
                if head.status == 200:
                    self.table.answered(peer_id)
                return Forwarded(peer_id, head, _replay([head.data]))
            answer = Forwarded(peer_id, head, self._relay(peer_id, head.data, parts, release))
            if not answer.streaming:  # collect it now (capped): a failure is still retryable
                whole, size = [], 0
                async for chunk in answer.body:
                    size += len(chunk)
                    if size > MAX_BUFFERED_ANSWER_CHARS:
                        raise MalformedMessage(f"{peer_id} sent an answer over {MAX_BUFFERED_ANSWER_CHARS} characters")
                    whole.append(chunk)
                answer.body = _replay(whole)
            committed = True
            return answer
        except StreamFailed:
            self.table.forget(peer_id)  # it went away (or never answered): do not try it again
            raise
        except P2PError:
            self.table.failed(peer_id)
            raise
        finally:
            if not committed:
                await parts.aclose()
                release()

    async def _relay(self, peer_id: str, first: str, parts: AsyncIterator,
                     release: Callable[[], None]) -> AsyncIterator[str]:
        """The body's data (``first``: what came in the head) until the end, at most
        ``MAX_RELAYED_ANSWER_CHARS``; a peer that fails now is penalised for next time."""
        relayed = len(first)
        try:
            if first:
                yield first
            async for part in parts:
                if isinstance(part, InferEnd):
                    self.table.seen(peer_id)
                    self.table.answered(peer_id)
                    return
                if not isinstance(part, InferData):
                    raise MalformedMessage("a second head in one answer")
                relayed += len(part.data)
                if relayed > MAX_RELAYED_ANSWER_CHARS:
                    raise MalformedMessage(f"{peer_id} streamed more than {MAX_RELAYED_ANSWER_CHARS} characters")
                yield part.data
            raise StreamFailed(f"{peer_id} ended the answer without its end frame")
        except P2PError:
            self.table.failed(peer_id)
            self.metrics.forwarded.labels("failed_mid_stream").inc()
            raise
        finally:
            await parts.aclose()
            release()

    # -- verification and evidence (asyncio) -----------------------------------------------
    async def verify(self, answer: AnswerFile, exclude: Collection[str] = ()) -> Attestation:
        """A signed re-check of ``answer`` by a random peer that serves its model (not its signer,
        nor any peer in ``exclude``: a verifier asking for several validators names those it has)."""
        problems = []
        candidates = self.table.candidates(answer.receipt.model_id)
        _VALIDATOR_DRAW.shuffle(candidates)  # validators at random: an accused node cannot predict them
        for peer_id in candidates:
            if peer_id == answer.receipt.node_id or peer_id in exclude:
                continue
            try:
                return await self.bridge.call(self.protocols.verify, peer_id, answer)
            except P2PError as exc:
                problems.append(f"{peer_id}: {exc}")
        raise NoPeerAvailable(f"no peer could verify the answer ({'; '.join(problems) or 'none serves its model'})")

    async def evidence(self, peer_id: str, receipt_id: str, token: str) -> AnswerFile:
        """The answer file behind ``receipt_id``, from the peer that signed it, which serves it
        only with the receipt's evidence ``token``."""
        return await self.bridge.call(self.protocols.evidence, peer_id, receipt_id, token)

    async def spread_fraud(self, notice: FraudNotice) -> int:
        """Start a fraud notice on its way to every known peer; returns how many took it."""
        return await self.bridge.call(self.protocols.spread_fraud, notice, set())


def _leaves(exc: BaseException) -> str:
    """The messages at the bottom of (possibly nested) exception groups."""
    if isinstance(getattr(exc, "exceptions", None), (list, tuple)):  # an exception group
        return "; ".join(_leaves(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def _replay(chunks: list[str]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk
