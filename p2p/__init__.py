"""ProofMesh's peer-to-peer layer (py-libp2p): identity, discovery, routing, verdict gossip.

Not built yet: see the network issue. It must not import node/'s HTTP layer (DESIGN.md).
"""
