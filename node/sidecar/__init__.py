"""The verifier sidecar: an OpenAI-compatible proxy that binds every answer to its request and
audits a share of them (``proxy``), and its status page (``status_page``). Loads neither TVM
nor libp2p: it reaches models through ``verify``'s protocols and the network through its own
gateway's HTTP routes."""
