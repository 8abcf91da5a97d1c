"""The verifier sidecar: an OpenAI-compatible proxy in front of nodes. ``upstreams`` picks the
node that serves a request and fetches the evidence behind its answer; ``auditor`` binds every
answer to its request and audits a share; ``relay`` rebuilds what the client gets; ``app`` holds
the routes and the app factory; ``status_page`` the operator's page. Those load neither TVM nor
libp2p: they reach models through ``verify``'s protocols and the network through the sidecar's
own gateway's HTTP routes. ``launch`` (``proofmesh verifier``: the models loaded, the embedded
gateway joined) loads both, and only the CLI imports it."""
