"""The node: model runtime and generation engine (``runtime``), the models (``models``) and their
compiler (``compiler``), the OpenAI HTTP API (``api``), the verifier sidecar (``sidecar``), the CLI."""
