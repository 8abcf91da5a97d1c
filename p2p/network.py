"""The node's view of the network, for asyncio code: start and stop the host, forward a request
to the best peer with failover, ask peers for verdicts and evidence.

Everything libp2p runs on the bridge's trio thread (``p2p/bridge.py``); the methods here are
asyncio coroutines that hand the work over. Discovery runs there on its own (``p2p/discovery.py``).

Failover (``forward``): peers are tried best first (``p2p/peers.py``). A peer that fails before
the answer starts, or answers 429/503 (full), is skipped and the next one tried. Once a stream's
first token has been relayed the answer is committed to that peer: a failure after that reaches
the caller as ``StreamFailed`` (the HTTP layer ends the stream with an error chunk). A
non-streamed answer is collected whole before it is returned, so any failure in it is retried.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Collection, Sequence

import trio
from prometheus_client import CollectorRegistry

from p2p.bridge import TrioThread
from p2p.discovery import Discovery, OwnRecord
from p2p.errors import MalformedMessage, NoPeerAvailable, P2PError, StreamFailed
from p2p.host import Host, check_listen_addr, peer_info
from p2p.limits import DialPolicy, PeerLimits
from p2p.metrics import P2PMetrics
from p2p.peers import PeerState, PeerTable
from p2p.protocols import LocalNode, Protocols
from p2p.wire import FraudNotice, InferData, InferEnd, InferHead, InferPath, InferRequest
from verify.attestation import Attestation
from verify.evidence import AnswerFile
from verify.identity import NodeKey

log = logging.getLogger(__name__)

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
        self.record = OwnRecord(self.key, self.host, self.local)
        self.protocols = Protocols(self.host, self.table, self.bridge, self.local, self.record.current, self.metrics.reject,
                                   PeerLimits(self.config.peer_allow),
                                   DialPolicy((*self.config.listen, *self.config.announce), self.config.allow_private))
        self.discovery = Discovery(self.host, self.table, self.protocols, self.metrics, self.config.bootstrap)

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
            await nursery.start(self.discovery.run)
            self._serving = True
            task_status.started()

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
