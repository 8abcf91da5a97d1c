"""The p2p layer's exceptions, one tree (as httpx's ``_exceptions.py``), so that callers in
node/ catch ``P2PError`` and never see a libp2p, trio or pydantic exception: those are
translated once, where a stream is read or opened (``p2p/wire.py``, ``p2p/host.py``).

    P2PError
    ├── WireError              a peer sent something that is not a valid message: dropped, counted
    │   ├── MessageTooLarge    its length prefix exceeds the protocol's cap
    │   ├── MalformedMessage   not a varint, not JSON, or not the schema
    │   ├── BadSignature       a signed record whose signature does not match its peer id
    │   ├── UntrustedRecord    a record that claims what no honest peer would (expiry years ahead)
    │   ├── RateLimited        a peer past its budget on a protocol (requests per second, at once)
    │   └── NotAllowed         a peer outside the node's allowlist asked for work
    ├── StreamFailed           the stream broke, timed out, or the peer could not be dialled
    │   ├── StreamTimeout      a read or write did not finish in time
    │   └── StreamEnded        the peer closed the stream cleanly, between two messages
    ├── RemoteError            the peer answered with an error of its own
    ├── Unavailable            this node cannot take a peer's work now (busy): the peer is told so
    └── NoPeerAvailable        no known peer serves the model (or every one failed)
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of every error the p2p layer raises."""


class WireError(P2PError):
    """A message that breaks the wire rules; the reason names the rule (a metrics label)."""

    reason = "malformed"


class MessageTooLarge(WireError):
    reason = "oversized"


class MalformedMessage(WireError):
    reason = "malformed"


class BadSignature(WireError):
    reason = "bad_signature"


class UntrustedRecord(WireError):
    reason = "untrusted_record"


class RateLimited(WireError):
    reason = "rate_limited"


class NotAllowed(WireError):
    reason = "not_allowed"


class StreamFailed(P2PError):
    """The stream or the connection failed (peer gone, reset, refused)."""


class StreamTimeout(StreamFailed):
    """A read or write ran past its deadline."""


class StreamEnded(StreamFailed):
    """The peer closed the stream where a new message could have started (a clean end)."""


class RemoteError(P2PError):
    """The remote peer replied with an error message."""


class Unavailable(P2PError):
    """The local node cannot take the work now (its queue of exclusive work is full)."""


class NoPeerAvailable(P2PError):
    """No peer can take the request."""
