"""The HTTP layer: OpenAI wire models (``protocol``), errors and their one mapping to statuses
(``errors``), what every route shares (``service``: models, signing, evidence), the OpenAI routes
(``routes``), the app with receipts, health and metrics (``app``), the socket layer it and the
sidecar serve through (``server``), who may read an answer file (``evidence_tokens``), and the
node's side of the p2p network (``peering``); the operator's HTML status page, which the sidecar
renders too, and the node's tables on it (``status_page``). Requests go HTTP ->
``service.Node.answers`` -> ``runtime.engine``."""
