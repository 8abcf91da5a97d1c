"""ProofMesh's peer-to-peer layer on py-libp2p: identity, discovery, routing, re-checks.

    bridge.py     the asyncio <-> trio bridge (libp2p runs on trio in its own thread)
    host.py       the libp2p host: the node's Ed25519 key, Noise only, yamux
    wire.py       protocol ids, size-capped varint frames, pydantic messages, signed records
    peers.py      the peer table: records, liveness, latency, choosing a peer
    protocols.py  /proofmesh/caps/1, /infer/1, /verify/1, /evidence/1, /fraud/1, both sides
    discovery.py  the trio loop of capability exchanges that keeps the peer table current
    network.py    ``PeerNetwork``: what the node calls (start, forward with failover, verify, evidence)
    errors.py     the exception tree; metrics.py its Prometheus series

It never imports node/ (a test checks it): the node plugs in through ``LocalNode``
(``node/api/peering.py`` implements it).
"""

from p2p.errors import (
    BadSignature,
    MalformedMessage,
    MessageTooLarge,
    NoPeerAvailable,
    P2PError,
    RemoteError,
    StreamEnded,
    StreamFailed,
    StreamTimeout,
    WireError,
)
from p2p.network import Forwarded, NetworkConfig, PeerNetwork
from p2p.protocols import LocalNode

__all__ = [
    "BadSignature",
    "Forwarded",
    "LocalNode",
    "MalformedMessage",
    "MessageTooLarge",
    "NetworkConfig",
    "NoPeerAvailable",
    "P2PError",
    "PeerNetwork",
    "RemoteError",
    "StreamEnded",
    "StreamFailed",
    "StreamTimeout",
    "WireError",
]
