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

from aiohttp import web

IPV6_CLIENT_PREFIX = 64  # one subscriber's block (RFC 6177 allocates at least a /64 a site)

CLIENT = web.RequestKey("client", str)
"""Set on every request by ``node.api.errors.require_api_key``: ``client_identity`` of it."""


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
