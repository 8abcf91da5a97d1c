"""The node's libp2p host (trio side): its identity, its secure channel, its streams.

Identity: the node's Ed25519 key (``verify/identity.py``) is the libp2p key pair, so the peer id
is the ``node_id`` in the node's receipts, and the remote peer of a stream is who signed them.

Security: Noise only. py-libp2p's default list also offers TLS, SECIO and ``/plaintext/2.0.0``;
over plaintext a dialler can claim any peer id whose public key it knows (DESIGN.md, measured),
so a host that accepted it would attribute streams to the wrong peer. Multiplexer: yamux.
``max_connections_per_peer=1``: with more, ``connect`` waits a fixed ~250 ms after each dial.

Every library error is translated here or in ``p2p/wire.py``: callers see ``p2p.errors`` only.
Handlers registered with ``handle`` can fail in any way without touching the host: the wrapper
counts wire violations, logs the rest and always releases the stream.
"""

from __future__ import annotations

import logging
import sys
from typing import Awaitable, Callable, Sequence, TypeVar, overload

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from pydantic import BaseModel

from p2p.errors import MalformedMessage, P2PError, StreamFailed, StreamTimeout, WireError
from p2p.wire import DEFAULT_TIMEOUT_S, FramedStream
from verify.identity import NodeKey

if sys.version_info < (3, 11):  # a builtin since 3.11; before, trio brings the backport
    from exceptiongroup import ExceptionGroup

log = logging.getLogger(__name__)

ADDR_TTL_S = 600  # how long the peerstore keeps a learned address (refreshed by each record)
DIAL_TIMEOUT_S = 5.0
OPEN_ATTEMPTS = 2
CLOSE_TIMEOUT_S = 2.0

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[FramedStream], Awaitable[None]]
RejectHook = Callable[[str, str], None]  # (protocol, reason) of a dropped message


# What py-libp2p, multiaddr and trio raise when a dial, an address or a stream goes wrong.
_LIBRARY_ERRORS = (BaseLibp2pError, OSError, EOFError, ValueError, KeyError, trio.BrokenResourceError,
                   trio.ClosedResourceError)


def peer_info(addr: str) -> PeerInfo:
    """A full multiaddr (``.../p2p/<peer id>``) parsed, or ``P2PError`` saying why not."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except _LIBRARY_ERRORS as exc:
        raise P2PError(f"{addr!r} is not a multiaddr ending in /p2p/<peer id>: {exc}") from exc


def check_listen_addr(addr: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(addr)
    except _LIBRARY_ERRORS as exc:
        raise P2PError(f"{addr!r} is not a multiaddr: {exc}") from exc


class _Disconnections(INotifee):
    """Tells the host's owner when a connection to a peer closes (the other events: nothing)."""

    def __init__(self, on_disconnect: Callable[[str], None]):
        self.on_disconnect = on_disconnect

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.on_disconnect(conn.muxed_conn.peer_id.to_base58())

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class Host:
    """A libp2p host with the node's key, Noise + yamux, run inside the bridge's trio thread."""

    def __init__(self, key: NodeKey, on_reject: RejectHook, announce: Sequence[str] = ()):
        """``announce``: the addresses to tell peers instead of the listening ones (a node that
        listens on 0.0.0.0 or behind NAT must say where it can be reached)."""
        key_pair = create_new_key_pair(key.seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self._host: IHost = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt=create_yamux_muxer_option(),
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            announce_addrs=[check_listen_addr(a) for a in announce] or None,
        )
        self.peer_id = self._host.get_id().to_base58()
        assert self.peer_id == key.node_id, "the libp2p identity must be the receipt-signing key"
        self._on_reject = on_reject
        self.on_disconnect: Callable[[str], None] = lambda peer_id: None
        self._host.get_network().register_notifee(_Disconnections(lambda peer_id: self.on_disconnect(peer_id)))

    @property
    def addrs(self) -> list[str]:
        """Full listen multiaddrs, each ending in ``/p2p/<peer id>``."""
        return [str(a) for a in self._host.get_addrs()]

    async def run(self, listen: Sequence[str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``listen`` until cancelled; reports ready (via ``task_status``) once bound."""
        async with self._host.run([check_listen_addr(a) for a in listen]):
            if not self._host.get_transport_addrs():  # py-libp2p logs a failed listen and carries on
                raise P2PError(f"could not listen on any of {', '.join(listen)} (see the log above)")
            if any("/ip4/0.0.0.0/" in a or "/ip6/::/" in a for a in self.addrs):
                log.warning("announcing an unspecified address (%s): peers on other machines cannot dial it; "
                            "pass the reachable one with --p2p-announce", ", ".join(self.addrs))
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:  # close connections for real, so peers notice at once (not at their timeouts)
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await self._host.close()


    def learn(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Remember where a peer listens, so ``open`` can dial it."""
        try:
            parsed = [multiaddr.Multiaddr(a).decapsulate_code(multiaddr.protocols.P_P2P) for a in addrs]
            self._host.get_peerstore().add_addrs(ID.from_base58(peer_id), parsed, ADDR_TTL_S)
        except _LIBRARY_ERRORS as exc:
            raise MalformedMessage(f"unusable address for {peer_id}: {exc}") from exc

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (with ``/p2p/<id>``); returns the peer id."""
        info = peer_info(addr)
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self._host.connect(info)
        except trio.TooSlowError as exc:
            raise StreamTimeout(f"dialling {addr} timed out") from exc
        except (*_LIBRARY_ERRORS, ExceptionGroup) as exc:
            raise StreamFailed(f"cannot dial {addr}: {exc}") from exc
        return info.peer_id.to_base58()

    async def open(self, peer_id: str, protocol: str, max_bytes: int) -> FramedStream:
        """A new stream to ``peer_id`` speaking ``protocol`` (dials first if needed).

        One retry: when two peers dial each other at once, py-libp2p keeps one connection and
        closes the other, and a stream opened on the loser fails its protocol negotiation
        (seen in the tests). Nothing was sent yet, so a second try is safe."""
        for attempt in range(OPEN_ATTEMPTS):
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    stream = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
                return FramedStream(stream, max_bytes)
            except trio.TooSlowError as exc:
                raise StreamTimeout(f"opening {protocol} to {peer_id} timed out") from exc
            except (*_LIBRARY_ERRORS, ExceptionGroup) as exc:
                if attempt + 1 == OPEN_ATTEMPTS:
                    raise StreamFailed(f"cannot open {protocol} to {peer_id}: {exc}") from exc
                log.debug("opening %s to %s failed (%s); once more", protocol, peer_id, exc)
        raise AssertionError("unreachable")

    @overload
    async def request(self, peer_id: str, protocol: str, max_bytes: int, message: BaseModel, reply: type[M],
                      timeout: float = DEFAULT_TIMEOUT_S) -> M: ...

    @overload
    async def request(self, peer_id: str, protocol: str, max_bytes: int, message: BaseModel, reply: None = None,
                      timeout: float = DEFAULT_TIMEOUT_S) -> None: ...

    async def request(self, peer_id: str, protocol: str, max_bytes: int, message: BaseModel,
                      reply: type[M] | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> M | None:
        """One exchange on a fresh stream: open it, send ``message``, read one ``reply`` (with
        ``reply=None`` nothing: a one-way message), close it. Whatever fails on the way (a
        timeout, a cancel, a malformed reply) resets the stream: it is never left half open."""
        stream = await self.open(peer_id, protocol, max_bytes)
        try:
            await stream.write(message)
            answer = None if reply is None else await stream.read(reply, timeout=timeout)
        except BaseException:
            await stream.reset()
            raise
        await stream.close()
        return answer

    def handle(self, protocol: str, handler: Handler, max_bytes: int) -> None:
        """Serve ``protocol`` with ``handler``; nothing a peer sends can make it raise."""

        async def wrapped(stream: INetStream) -> None:
            framed = FramedStream(stream, max_bytes)
            try:
                await handler(framed)
                await framed.close()
            except WireError as exc:
                log.info("dropped a %s message from %s: %s", protocol, _remote(stream), exc)
                self._on_reject(protocol, exc.reason)
                await framed.reset()
            except StreamFailed as exc:
                log.debug("%s stream from %s failed: %s", protocol, _remote(stream), exc)
                await framed.reset()
            except Exception:  # noqa: BLE001 - a handler bug must not take the host down
                log.exception("%s handler failed", protocol)
                await framed.reset()

        self._host.set_stream_handler(TProtocol(protocol), wrapped)


def _remote(stream: INetStream) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except AttributeError:
        return "?"

