"""The five ProofMesh protocols, both sides of each, on the trio thread.

    /proofmesh/caps/1      dialler sends its capability table, listener answers with its own
    /proofmesh/infer/1     InferRequest -> InferAccepted, then InferHead holding a whole answer,
                           or InferHead, InferData..., InferEnd for a stream (repeatable)
    /proofmesh/verify/1    VerifyRequest -> Reply(attestation)
    /proofmesh/evidence/1  EvidenceRequest (receipt id, evidence token) -> Reply(answer)
    /proofmesh/fraud/1     FraudNotice, one way: the node decides (``LocalNode.fraud``) and the
                           notice it returns goes on to every other known peer (a flood; each
                           node relays a given notice once)

Discovery is this own exchange protocol, not GossipSub: a newcomer needs the whole table at
once (gossip delivers only what is published after it subscribes), and py-libp2p 0.8.1's
GossipSub drops bursts past a 32-entry per-peer queue and caps 10 messages/s per topic without
telling anyone (DESIGN.md, measured), which makes it a poor carrier for the one thing routing
depends on. The exchange is one stream per peer per round: the listener learns the dialler's
table and the dialler the listener's. Peers learn of peers through the ones they know, and dial
them in turn. No Kademlia DHT: with one record per peer, the whole table is small enough to
hold everywhere (512 records per message), so a lookup would add a round trip and nothing else.

The node itself (models, engine, evidence store) is reached through ``LocalNode``, which node/
implements with asyncio code; the bridge carries the calls, so p2p/ never imports node/.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import AsyncIterator, Callable, Protocol, Union

from p2p.bridge import TrioThread
from p2p.errors import BadSignature, MalformedMessage, P2PError, RemoteError, StreamEnded, StreamFailed, Unavailable, WireError
from p2p.host import Host
from p2p.limits import DialPolicy, PeerLimits
from p2p.peers import PeerTable
from p2p.wire import (
    CAPS_MAX_BYTES,
    CAPS_PROTOCOL,
    EVIDENCE_MAX_BYTES,
    EVIDENCE_PROTOCOL,
    FRAUD_PROTOCOL,
    INFER_FRAME,
    INFER_MAX_BYTES,
    INFER_PROTOCOL,
    VERIFY_PROTOCOL,
    Attestation,
    CapsExchange,
    EvidenceRequest,
    FramedStream,
    FraudNotice,
    InferAccepted,
    InferData,
    InferEnd,
    InferHead,
    InferRequest,
    ModelOffer,
    Reply,
    SignedCapability,
    VerifyRequest,
)
from verify.evidence import AnswerFile

log = logging.getLogger(__name__)

# A peer acknowledges a request at once; no acknowledgement in this long: it is dead or stalled.
INFER_ACCEPT_TIMEOUT_S = 5.0
# Then the answer waits for the model: a non-streamed answer arrives whole after generation
# (minutes for a long one on a CPU). A dead peer is noticed at once (the stream resets) or by its
# missing acknowledgement; this only bounds a peer that acknowledged and then stalled.
INFER_TOKEN_TIMEOUT_S = 300.0
# A served infer stream waits this long for the next request before the server closes it; the
# asking side reuses an idle stream only for a shorter while, so it rarely finds one closed.
INFER_IDLE_TIMEOUT_S = 60.0
INFER_REUSE_S = 30.0
MAX_IDLE_STREAMS = 8  # per peer: about the concurrency one node forwards to one peer
# Teacher-forced re-execution of a long answer on a CPU takes a while.
VERIFY_TIMEOUT_S = 300.0
# A peer's re-check request may hold at most this many tokens (prompt + answer): a prefill of the
# whole KV capacity (16k tokens) would stall this node's generation for everyone.
MAX_REMOTE_VERIFY_TOKENS = 4096

InferPart = Union[InferHead, InferData, InferEnd]


class LocalNode(Protocol):
    """What the p2p layer needs from the node it runs in (node/ implements it, asyncio side)."""

    def offers(self) -> tuple[list[ModelOffer], int, str | None]:
        """(models served here, current load, HTTP URL). Called from the trio thread: it must
        only read plain attributes."""

    def infer(self, request: InferRequest) -> AsyncIterator[InferPart]:
        """Answer a forwarded request: a head, data, then an end."""

    async def verify(self, answer: AnswerFile) -> Attestation:
        """Re-check ``answer`` on a local model; raises ``LookupError`` if none fits."""

    async def evidence(self, receipt_id: str, token: str) -> AnswerFile | None:
        """The answer file behind one of this node's receipts, while it is retained, if ``token``
        is that receipt's evidence token (None otherwise, as for an unknown receipt)."""

    async def fraud(self, notice: FraudNotice, sender: str) -> FraudNotice | None:
        """Act on a fraud notice from ``sender``; returns the notice to pass on, or None."""


class Protocols:
    """Handlers and clients of the five protocols for one host."""

    def __init__(self, host: Host, table: PeerTable, bridge: TrioThread, local: LocalNode,
                 own_record: Callable[[], SignedCapability], on_reject: Callable[[str, str], None],
                 limits: PeerLimits | None = None, dial: DialPolicy | None = None):
        self.host, self.table, self.bridge, self.local = host, table, bridge, local
        self.own_record = own_record
        self.on_reject = on_reject
        self.limits = limits or PeerLimits()
        self.dial = dial or DialPolicy(own_addrs=(), allow_private=True)
        self.on_new_peer: Callable[[str], None] = lambda peer_id: None
        self._idle: dict[str, list[tuple[FramedStream, float]]] = defaultdict(list)  # reusable infer streams
        host.handle(CAPS_PROTOCOL, self._serve_caps, CAPS_MAX_BYTES)
        host.handle(INFER_PROTOCOL, self._serve_infer, INFER_MAX_BYTES)
        host.handle(VERIFY_PROTOCOL, self._serve_verify, EVIDENCE_MAX_BYTES)
        host.handle(EVIDENCE_PROTOCOL, self._serve_evidence, EVIDENCE_MAX_BYTES)
        host.handle(FRAUD_PROTOCOL, self._serve_fraud, EVIDENCE_MAX_BYTES)

    # -- capabilities ----------------------------------------------------------------------
    def _table_message(self) -> CapsExchange:
        return CapsExchange(records=[self.own_record(), *self.table.records()])

    def _merge(self, message: CapsExchange, sender: str) -> None:
        """Take every valid record; a bad one is counted and skipped, not the whole message.
        Records already known (most of every table) are skipped before their signature check."""
        for signed in message.records:
            if not self.table.is_news(signed.record):
                continue
            try:
                signed.check()
            except WireError as exc:
                log.info("dropped a capability record from %s: %s", sender, exc)
                self.on_reject(CAPS_PROTOCOL, exc.reason)
                continue
            if not self.table.knows(signed.record.peer_id) and not self.dial.take_new_peer():
                self.on_reject(CAPS_PROTOCOL, "new_peer_budget")  # a flood of new keys waits its turn
                continue
            if self.table.merge(signed):
                try:
                    self.host.learn(signed.record.peer_id, self.dial.usable(signed.record.addrs))
                except WireError as exc:
                    self.table.forget(signed.record.peer_id)
                    self.on_reject(CAPS_PROTOCOL, exc.reason)
                    log.info("dropped a record with unusable addresses: %s", exc)
                    continue
                self.on_new_peer(signed.record.peer_id)

    async def _serve_caps(self, stream: FramedStream) -> None:
        with self.limits.admit(stream.remote_peer, CAPS_PROTOCOL):
            message = await stream.read(CapsExchange)
        await stream.write(self._table_message())
        self._merge(message, stream.remote_peer)
        self.table.seen(stream.remote_peer)

    async def exchange(self, peer_id: str) -> None:
        """One round with ``peer_id``: send our table, merge theirs, time the round trip."""
        start = time.perf_counter()
        reply = await self.host.request(peer_id, CAPS_PROTOCOL, CAPS_MAX_BYTES, self._table_message(), CapsExchange)
        self._merge(reply, peer_id)
        self.table.seen(peer_id, time.perf_counter() - start)

    # -- inference -------------------------------------------------------------------------
    async def _serve_infer(self, stream: FramedStream) -> None:
        """Answer requests one after another until the asking peer closes the stream."""
        while True:
            try:
                request = await stream.read(InferRequest, timeout=INFER_IDLE_TIMEOUT_S)
            except StreamEnded:
                return
            with self.limits.admit(stream.remote_peer, INFER_PROTOCOL):
                await stream.write(InferAccepted())
                async for part in self.bridge.iterate_asyncio(self.local.infer, request):
                    await stream.write(part)

    async def infer(self, peer_id: str, request: InferRequest) -> AsyncIterator[InferPart]:
        """Forward ``request`` to ``peer_id`` and yield its answer's parts as they come.

        Streams are reused (a new one costs a protocol negotiation, ~4 ms on loopback): a stream
        whose answer ended cleanly goes back to an idle pool. An idle stream may have been closed
        by the peer meanwhile; if it fails before the first part, a fresh one is tried."""
        stream, first = await self._send_infer(peer_id, request)
        finished = _is_last(first)
        try:
            yield first
            while not finished:
                part = await stream.read(INFER_FRAME, timeout=INFER_TOKEN_TIMEOUT_S)
                finished = _is_last(part)
                yield part
        finally:
            if finished:
                await self._release(peer_id, stream)
            else:
                await stream.reset()

    async def _send_infer(self, peer_id: str, request: InferRequest) -> tuple[FramedStream, InferPart]:
        """A stream carrying ``request`` and the first part of its answer."""
        while idle := self._idle[peer_id]:
            stream, since = idle.pop()
            if time.monotonic() - since > INFER_REUSE_S:
                await stream.close()
                continue
            try:
                await self._request(stream, request)
            except StreamFailed:
                await stream.reset()  # closed (or dead) while idle: the next one, or a new one
                continue
            return stream, await self._first_part(stream)
        stream = await self.host.open(peer_id, INFER_PROTOCOL, INFER_MAX_BYTES)
        await self._request(stream, request)
        return stream, await self._first_part(stream)

    @staticmethod
    async def _request(stream: FramedStream, request: InferRequest) -> None:
        """Send ``request`` and wait (briefly) for the peer's acknowledgement."""
        try:
            await stream.write(request)
            if not isinstance(await stream.read(INFER_FRAME, timeout=INFER_ACCEPT_TIMEOUT_S), InferAccepted):
                raise MalformedMessage("an answer must start with its acknowledgement")
        except BaseException:
            await stream.reset()
            raise

    @staticmethod
    async def _first_part(stream: FramedStream) -> InferPart:
        try:
            return await stream.read(INFER_FRAME, timeout=INFER_TOKEN_TIMEOUT_S)
        except BaseException:
            await stream.reset()
            raise

    async def _release(self, peer_id: str, stream: FramedStream) -> None:
        idle = self._idle[peer_id]
        if len(idle) < MAX_IDLE_STREAMS:
            idle.append((stream, time.monotonic()))
        else:
            await stream.close()

    # -- verification and evidence ---------------------------------------------------------
    async def _serve_verify(self, stream: FramedStream) -> None:
        with self.limits.admit(stream.remote_peer, VERIFY_PROTOCOL):
            request = await stream.read(VerifyRequest)
            evidence = request.answer.evidence
            if len(evidence.prompt_ids) + len(evidence.output_ids) > MAX_REMOTE_VERIFY_TOKENS:
                await stream.write(Reply(error=f"a peer's re-check may hold at most {MAX_REMOTE_VERIFY_TOKENS} tokens"))
                return
            try:
                reply = Reply(attestation=await self.bridge.call_asyncio(self.local.verify, request.answer))
            except (LookupError, Unavailable) as exc:
                reply = Reply(error=str(exc))
            await stream.write(reply)

    async def _serve_evidence(self, stream: FramedStream) -> None:
        with self.limits.admit(stream.remote_peer, EVIDENCE_PROTOCOL):
            request = await stream.read(EvidenceRequest)
            answer = await self.bridge.call_asyncio(self.local.evidence, request.receipt_id, request.token)
            await stream.write(Reply(answer=answer) if answer else Reply(error=f"no receipt {request.receipt_id} here"))

    async def _serve_fraud(self, stream: FramedStream) -> None:
        sender = stream.remote_peer
        with self.limits.admit(sender, FRAUD_PROTOCOL):
            notice = await stream.read(FraudNotice)
            await stream.close()
            onward = await self.bridge.call_asyncio(self.local.fraud, notice, sender)
        if onward is not None:  # back to the sender too when this node added its voucher: that is news to it
            await self.spread_fraud(onward, skip=set() if onward.vouchers != notice.vouchers else {sender})

    async def spread_fraud(self, notice: FraudNotice, skip: set[str]) -> int:
        """Send ``notice`` to every known peer but those in ``skip``; returns how many took it."""
        sent = 0
        for peer_id in self.table.peer_ids():
            if peer_id in skip:
                continue
            try:
                await self.host.request(peer_id, FRAUD_PROTOCOL, EVIDENCE_MAX_BYTES, notice)
                sent += 1
            except P2PError as exc:
                log.info("fraud notice not delivered to %s: %s", peer_id, exc)
        return sent

    async def _ask(self, peer_id: str, protocol: str, request: VerifyRequest | EvidenceRequest, timeout: float) -> Reply:
        reply = await self.host.request(peer_id, protocol, EVIDENCE_MAX_BYTES, request, Reply, timeout)
        if reply.error is not None:
            raise RemoteError(f"{peer_id}: {reply.error}")
        return reply

    async def verify(self, peer_id: str, answer: AnswerFile) -> Attestation:
        reply = await self._ask(peer_id, VERIFY_PROTOCOL, VerifyRequest(answer=answer), VERIFY_TIMEOUT_S)
        if reply.attestation is None or not reply.attestation.is_valid() or reply.attestation.verdict.verifier_id != peer_id:
            raise BadSignature(f"{peer_id} sent no attestation signed by itself")
        return reply.attestation

    async def evidence(self, peer_id: str, receipt_id: str, token: str) -> AnswerFile:
        reply = await self._ask(peer_id, EVIDENCE_PROTOCOL, EvidenceRequest(receipt_id=receipt_id, token=token), VERIFY_TIMEOUT_S)
        if reply.answer is None or reply.answer.receipt.receipt_id != receipt_id or reply.answer.receipt.node_id != peer_id:
            raise RemoteError(f"{peer_id} sent no answer file of its own for {receipt_id}")
        return reply.answer


def _is_last(part: InferPart) -> bool:
    return isinstance(part, InferEnd) or (isinstance(part, InferHead) and part.end)
