"""Errors raised by the node, one tree so callers (CLI, HTTP) translate them in one place.

    ProofMeshNodeError
    ├── ConfigError          bad or unsupported model configuration (names the key)
    ├── ModelLoadError       missing files, unsupported tensor types, shapes that do not match
    ├── ModelPullError       a registry model could not be fetched or failed a checksum
    ├── CompileError         TVM could not build the library for the target
    ├── DeviceError          the requested device is not present on this machine
    ├── RuntimeFault         a broken invariant of the runtime or scheduler: the node's bug (HTTP 500)
    └── RequestError         a generation request the engine cannot accept (the client's: HTTP 4xx)
        ├── ContextLengthError   prompt + max_tokens exceed the context
        ├── NoChatTemplateError  a chat request to a base model (no chat template): raw completions only
        └── EngineBusyError      admission limits reached (callers retry later)
            └── ClientShareError     this client holds its share already (others are still served)

Over HTTP (``node/api/errors.py``): RequestError is the client's fault (4xx); ConfigError,
RuntimeFault and anything unexpected are the server's (500, logged with an error id).
"""


class ProofMeshNodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(ProofMeshNodeError, ValueError):
    pass


class ModelLoadError(ProofMeshNodeError):
    pass


class ModelPullError(ProofMeshNodeError):
    pass


class CompileError(ProofMeshNodeError):
    pass


class DeviceError(ProofMeshNodeError):
    pass


class RuntimeFault(ProofMeshNodeError):
    """Raised where the runtime is asked something its caller (the engine) must never ask: a
    second sequence with one id, more sequences than the cache holds, an empty prefill."""


class RequestError(ProofMeshNodeError, ValueError):
    pass


class ContextLengthError(RequestError):
    pass


class NoChatTemplateError(RequestError):
    """A chat asked of a model that defines no chat template (a base model such as Gemma 3 270M).
    Refused rather than rendered with a made-up template: its ids would not be the model's format,
    and the receipt would commit a prompt the model was never trained to read."""


class EngineBusyError(RequestError):
    pass


class ClientShareError(EngineBusyError):
    """One client's share of what every client shares (queue places, evidence, connections) is
    taken: that client waits while the others are served (HTTP 429, ``client_share_exceeded``)."""
