"""What travels between peers: protocol ids, the frame format and every message, pydantic at
the boundary (a neutral module, as Petals' ``data_structures.py``: both the asking and the
answering side import it, neither imports the other's handlers).

Frames: an unsigned LEB128 varint length (at most 5 bytes, as multiformats' unsigned-varint)
followed by that many bytes of UTF-8 JSON. Each protocol has its own size cap, checked on the
length prefix before a byte of the body is read, so a hostile peer cannot make a node buffer
more than the cap. Every read and write runs under a deadline. Anything that breaks these
rules raises a ``WireError`` (``p2p/errors.py``); libp2p's and trio's stream errors become
``StreamFailed``: callers never see the library's exceptions.

Capability records are signed by the peer they describe (Ed25519 over their canonical JSON,
``verify/canonical.py``), and the peer id is the key, so a record is checked from its own
content: a peer cannot announce models for another.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, TypeVar, Union

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from p2p.errors import (BadSignature, MalformedMessage, MessageTooLarge, StreamEnded, StreamFailed, StreamTimeout,
                        UntrustedRecord)
from verify.attestation import Attestation
from verify.canonical import canonical_json
from verify.errors import IdentityError
from verify.evidence import AnswerFile
from verify.fraud import FraudProof, SignedVerdict
from verify.identity import NodeKey, public_key_from_peer_id, verify_signed_by

CAPS_PROTOCOL = "/proofmesh/caps/1"
INFER_PROTOCOL = "/proofmesh/infer/1"
VERIFY_PROTOCOL = "/proofmesh/verify/1"
EVIDENCE_PROTOCOL = "/proofmesh/evidence/1"
EVIDENCE_TOKEN_MAX_CHARS = 128  # a node's evidence tokens are 64 hex digits; room for another scheme, no more
FRAUD_PROTOCOL = "/proofmesh/fraud/1"

# Caps per protocol: a capability table of 256 peers is ~200 KB; an HTTP request body is capped
# at 1 MiB by the node (and JSON-quoted here); an answer file of a long answer (fingerprints of
# 8 logits per token) reaches a few MB.
CAPS_MAX_BYTES = 1 << 20
# Records per capability message; a node's table holds one fewer, so its own record and all
# it knows always fit one message (p2p/peers.py).
MAX_RECORDS_PER_MESSAGE = 512
# A record is believed for at most this long ahead, and may be issued at most this far in the
# future (clock skew): a record "valid for 30 billion years" is refused, not kept forever.
MAX_RECORD_LIFETIME_S = 3600.0
CLOCK_SKEW_S = 60.0
INFER_MAX_BYTES = 4 << 20
EVIDENCE_MAX_BYTES = 32 << 20
# A peer that does not send a whole frame in this long is stalled or hostile. Inference frames
# wait for the model instead (``INFER_TOKEN_TIMEOUT_S`` in p2p/protocols.py).
DEFAULT_TIMEOUT_S = 10.0
_READ_CHUNK = 1 << 16
_MAX_VARINT_BYTES = 5

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------- framing


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


class FramedStream:
    """A libp2p stream read and written as whole frames (a buffer keeps what a read over-fetched)."""

    def __init__(self, stream: INetStream, max_bytes: int):
        self.stream = stream
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def remote_peer(self) -> str:
        """Who is at the other end: the peer id the Noise handshake authenticated."""
        return self.stream.muxed_conn.peer_id.to_base58()

    async def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            chunk = await self.stream.read(max(_READ_CHUNK, n - len(self._buffer)))
            if not chunk:
                raise StreamFailed("the peer closed the stream mid-message")
            self._buffer += chunk

    async def _read_length(self) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            await self._fill(i + 1)
            byte = self._buffer[i]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                del self._buffer[: i + 1]
                return value
        raise MalformedMessage("length prefix is not a varint of at most 5 bytes")

    async def read_frame(self, timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
        """The next frame's payload; ``StreamEnded`` if the peer closed the stream before it."""
        with _translated(timeout, "read"):
            if not self._buffer:
                try:
                    chunk = await self.stream.read(_READ_CHUNK)
                except EOFError:  # libp2p's StreamEOF
                    chunk = b""
                if not chunk:
                    raise StreamEnded("the peer closed the stream")
                self._buffer += chunk
            length = await self._read_length()
            if length > self.max_bytes:
                raise MessageTooLarge(f"frame of {length} bytes exceeds the cap of {self.max_bytes}")
            await self._fill(length)
            payload = bytes(self._buffer[:length])
            del self._buffer[:length]
            return payload

    async def read(self, schema: type[M] | TypeAdapter, timeout: float = DEFAULT_TIMEOUT_S):
        """The next frame as ``schema`` (a model or a TypeAdapter of a union)."""
        payload = await self.read_frame(timeout)
        try:
            if isinstance(schema, TypeAdapter):
                return schema.validate_json(payload)
            return schema.model_validate_json(payload)
        except ValidationError as exc:
            raise MalformedMessage(f"not a valid message: {exc.errors()[0]['msg']}") from exc

    async def write(self, message: BaseModel, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        payload = message.model_dump_json().encode()
        if len(payload) > self.max_bytes:
            raise MessageTooLarge(f"message of {len(payload)} bytes exceeds the cap of {self.max_bytes}")
        # Shielded (bounded by its own deadline): a write cancelled halfway leaves half an
        # encrypted frame on the connection, which breaks every stream on it, not just this one.
        with trio.CancelScope(shield=True), _translated(timeout, "write"):
            await self.stream.write(frame(payload))

    async def close(self) -> None:
        """Close, or reset if closing fails: a stream is never left half open. Shielded like
        ``write``: a close also writes to the shared connection."""
        try:
            with trio.CancelScope(shield=True), trio.fail_after(DEFAULT_TIMEOUT_S):
                await self.stream.close()
        except (BaseLibp2pError, OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self.reset()

    async def reset(self) -> None:
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(DEFAULT_TIMEOUT_S):
                await self.stream.reset()
        except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # already broken: nothing left to release


class _translated:
    """Deadline plus the one translation of library errors into ``StreamFailed``."""

    def __init__(self, timeout: float, what: str):
        self.scope = trio.fail_after(timeout)
        self.what = what

    def __enter__(self) -> None:
        self.scope.__enter__()

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            self.scope.__exit__(kind, exc, tb)
        except trio.TooSlowError as slow:
            raise StreamTimeout(f"stream {self.what} timed out") from slow
        if exc is not None and isinstance(exc, (BaseLibp2pError, OSError, EOFError, trio.BrokenResourceError,
                                                 trio.ClosedResourceError)):
            raise StreamFailed(f"stream {self.what} failed: {type(exc).__name__}: {exc}") from exc
        return False


# ---------------------------------------------------------------------- messages

PeerId = Annotated[str, Field(min_length=1, max_length=128)]
Base64Sig = Annotated[str, Field(min_length=1, max_length=200)]


class Message(BaseModel):
    """Base of every wire message: unknown fields are an error (a peer speaking another version
    must be told, not half-understood)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelOffer(Message):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    model_id: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    backend: Annotated[str, Field(min_length=1, max_length=200)]
    max_context: Annotated[int, Field(ge=1)]


class Capability(Message):
    """What a peer says about itself: models, load, where to reach it, until when to believe it."""

    peer_id: PeerId
    models: Annotated[list[ModelOffer], Field(max_length=64)]
    load: Annotated[int, Field(ge=0)]  # sequences queued or running on the peer
    http: Annotated[str, Field(max_length=300)] | None = None  # its public HTTP API, if any
    addrs: Annotated[list[Annotated[str, Field(max_length=300)]], Field(max_length=16)]  # p2p multiaddrs
    issued: Annotated[float, Field(ge=0)]  # unix seconds: a newer record replaces an older one
    expires: Annotated[float, Field(ge=0)]

    def signing_bytes(self) -> bytes:
        return canonical_json(self.model_dump())


class SignedCapability(Message):
    record: Capability
    signature: Base64Sig

    @classmethod
    def sign(cls, record: Capability, key: NodeKey) -> "SignedCapability":
        if record.peer_id != key.node_id:
            raise ValueError("a capability record is signed by the peer it describes")
        return cls(record=record, signature=key.sign_base64(record.signing_bytes()))

    def check(self, now: float | None = None) -> Capability:
        """The record if its signature is its peer's and it has not expired; else ``BadSignature``."""
        try:
            public_key = public_key_from_peer_id(self.record.peer_id)
        except IdentityError as exc:
            raise BadSignature(f"the record's peer id is not an Ed25519 peer id: {exc}") from exc
        if not verify_signed_by(self.record.peer_id, public_key, self.record.signing_bytes(), self.signature):
            raise BadSignature(f"capability record for {self.record.peer_id} is not signed by that peer")
        now = time.time() if now is None else now
        if self.record.expires < now:
            raise BadSignature("capability record has expired")
        if self.record.expires > now + MAX_RECORD_LIFETIME_S or self.record.issued > now + CLOCK_SKEW_S:
            raise UntrustedRecord(f"capability record of {self.record.peer_id} claims a time too far ahead")
        return self.record


class CapsExchange(Message):
    """``/proofmesh/caps/1``: the dialler sends its table, the listener answers with its own."""

    records: Annotated[list[SignedCapability], Field(max_length=MAX_RECORDS_PER_MESSAGE)]


InferPath = Literal["/v1/completions", "/v1/chat/completions"]


class InferRequest(Message):
    """``/proofmesh/infer/1``: one OpenAI request, forwarded as its JSON body."""

    path: InferPath
    body: Annotated[str, Field(max_length=INFER_MAX_BYTES // 2)]


class InferAccepted(Message):
    """Sent as soon as a request is read, before any model work: lets the asking peer tell a
    dead or stalled peer (no ack within seconds) from a slow answer (which may take minutes)."""

    kind: Literal["accepted"] = "accepted"


class InferHead(Message):
    """The serving peer's HTTP status and content type, sent once the answer has started. An
    answer that is whole at once (not a stream) travels in its head (``data``, ``end``): one
    frame instead of three, which is most of what a hop costs on top of the network."""

    kind: Literal["head"] = "head"
    status: Annotated[int, Field(ge=100, le=599)]
    content_type: Annotated[str, Field(max_length=200)]
    data: Annotated[str, Field(max_length=INFER_MAX_BYTES // 2)] = ""
    end: bool = False


class InferData(Message):
    kind: Literal["data"] = "data"
    data: Annotated[str, Field(max_length=INFER_MAX_BYTES // 2)]


class InferEnd(Message):
    kind: Literal["end"] = "end"


InferFrame = Annotated[Union[InferAccepted, InferHead, InferData, InferEnd], Field(discriminator="kind")]
INFER_FRAME = TypeAdapter(InferFrame)


class VerifyRequest(Message):
    """``/proofmesh/verify/1``: re-check this answer file by teacher-forced re-execution."""

    answer: AnswerFile


class EvidenceRequest(Message):
    """``/proofmesh/evidence/1``: the answer file behind one of the listener's receipts, with the
    evidence token its client was given (the listener serves the file only if it is that
    receipt's: an answer file holds a client's conversation, and a receipt id is no secret)."""

    receipt_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    token: Annotated[str, Field(max_length=EVIDENCE_TOKEN_MAX_CHARS)]


class FraudNotice(Message):
    """``/proofmesh/fraud/1`` (one way): a fraud proof spreading through the network, with the
    signed fraud verdicts of the peers that re-checked and upheld it on its way (its vouchers),
    which is what lets a node that cannot re-check it (no copy of the model) act on it."""

    proof: FraudProof
    vouchers: Annotated[list[SignedVerdict], Field(max_length=32)] = []


class Reply(Message):
    """The answer to a verify request (``attestation``) or an evidence request (``answer``), or
    ``error`` saying why there is none."""

    attestation: Attestation | None = None
    answer: AnswerFile | None = None
    error: Annotated[str, Field(max_length=1000)] | None = None
