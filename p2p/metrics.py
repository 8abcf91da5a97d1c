"""Prometheus series of the p2p layer, registered in the node's own registry (so they appear on
its ``/metrics``, and several nodes in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class P2PMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.rejected = Counter("proofmesh_p2p_rejected_messages", "Messages dropped: malformed, oversized, "
                                "unsigned or badly signed, by protocol", ["protocol", "reason"], registry=registry)
        self.forwarded = Counter("proofmesh_p2p_forwarded_requests", "Requests forwarded to a peer, by outcome",
                                 ["outcome"], registry=registry)
        self.failures = Counter("proofmesh_p2p_task_failures", "Failures contained in the p2p thread (discovery "
                                "rounds, exchanges) that would otherwise have ended it", ["task"], registry=registry)
        self.peers = Gauge("proofmesh_p2p_known_peers", "Peers with a live capability record", registry=registry)

    def reject(self, protocol: str, reason: str) -> None:
        self.rejected.labels(protocol, reason).inc()
