"""Errors raised by the node, one tree so callers (CLI, HTTP) translate them in one place.

    ProofMeshNodeError
    ├── ConfigError          bad or unsupported model configuration (names the key)
    ├── ModelLoadError       missing files, unsupported tensor types, shapes that do not match
    ├── ModelPullError       the default model could not be fetched or failed its checksum
    ├── CompileError         TVM could not build the library for the target
    ├── DeviceError          the requested device is not present on this machine
    └── RequestError         a generation request the engine cannot accept
        ├── ContextLengthError   prompt + max_tokens exceed the context
        └── EngineBusyError      admission limits reached (callers retry later)
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


class RequestError(ProofMeshNodeError, ValueError):
    pass


class ContextLengthError(RequestError):
    pass


class EngineBusyError(RequestError):
    pass
