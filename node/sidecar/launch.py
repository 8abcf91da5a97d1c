"""Starting a verifier sidecar (``proofmesh verifier``): its options checked, its models loaded,
its ledger opened, and with ``bootstrap`` an embedded gateway node joined to the network; then
the sidecar served until a signal.

Unlike the sidecar's serving modules this one loads TVM (the audit models) and, with
``bootstrap``, libp2p (the gateway): only the CLI imports it, when it starts a verifier.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from node.api.app import make_app
from node.api.server import serve_until_signalled, start_server
from node.errors import ConfigError, ProofMeshNodeError
from node.runtime import model_store
from node.runtime.loading import LoadedModel, load_model
from node.runtime.model_store import ProgressFn
from node.sidecar.app import Sidecar, make_sidecar_app
from p2p.network import NetworkConfig
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

# Where the embedded gateway listens when no p2p_listen is given: loopback, any free port.
GATEWAY_LISTEN = "/ip4/127.0.0.1/tcp/0"


@dataclass(frozen=True)
class VerifierOptions:
    """A verifier's settings, named after ``proofmesh verifier``'s options (the errors name those)."""

    upstreams: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    p2p_listen: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # empty: the upstreams' own, loaded here
    device: str = "auto"
    weights: str = "native"
    audit_rate: float = 0.05
    validators: int = 0
    hold_streams: bool = False
    host: str = "127.0.0.1"
    port: int = 8100
    ledger: Path | None = None  # default: ledger.sqlite in the model store
    api_keys: list[str] = field(default_factory=list)
    operator_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.audit_rate <= 1.0:
            raise ConfigError("--audit-rate is a probability in [0, 1]")
        if self.validators < 0:
            raise ConfigError("--validators is a count of peers, 0 or more")
        if not self.upstreams and not self.bootstrap:
            raise ConfigError("give the nodes to proxy as --upstream URL ..., or join the network with --bootstrap MULTIADDR")
        if self.validators and not self.bootstrap:
            raise ConfigError("--validators needs --bootstrap: validators are drawn from the verifier's own view of the "
                              "network, never through a node it audits")
        if not self.models and not self.upstreams:
            raise ConfigError("give the model to verify with --model (with --bootstrap alone there is no upstream to ask)")


def upstream_models(options: VerifierOptions, progress: ProgressFn) -> list[LoadedModel]:
    """The models the upstream nodes serve, loaded here as ``proofmesh run`` would (pulled when
    in the registry), each checked to be the same model_id; an error names what is missing."""
    served: dict[str, str] = {}
    for url in options.upstreams:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=30) as response:
                served.update({m["id"]: m["model_id"] for m in json.load(response)["models"]})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProofMeshNodeError(f"cannot ask {url} which model it serves ({exc}); give it with --model") from exc
    if not served:
        raise ProofMeshNodeError("the upstream serves no model itself; give the model to verify with --model")
    models = []
    for name, model_id in sorted(served.items()):
        try:
            model = load_model(name, device=options.device, weights=options.weights, progress=progress)
        except ProofMeshNodeError as exc:
            raise ProofMeshNodeError(f"the upstream serves {name!r}, which this machine cannot load ({exc}); "
                                     "give its path with --model") from exc
        if model.model_id != model_id:
            raise ProofMeshNodeError(f"the upstream's {name!r} is model {model_id[:16]}…, the local one is "
                                     f"{model.model_id[:16]}…: give the matching model with --model")
        models.append(model)
    return models


def run_verifier(options: VerifierOptions, key: NodeKey, progress: ProgressFn) -> None:
    """Load the models, open the ledger and serve the sidecar until SIGINT/SIGTERM."""
    if options.models:
        models = [load_model(name, device=options.device, weights=options.weights, progress=progress) for name in options.models]
    else:
        models = upstream_models(options, progress)
    root = model_store.store_root()
    ledger = Ledger(options.ledger or root / "ledger.sqlite")
    gateway_store = EvidenceStore(root / "verifier-gateway.sqlite") if options.bootstrap else None

    async def serve() -> None:
        """With bootstrap, a gateway node (no model, the verifier's key) joins the network on
        loopback and is the sidecar's one upstream: routing, validators and fraud gossip are its."""
        upstreams, gateway, gateway_url = list(options.upstreams), None, None
        if options.bootstrap:
            config = NetworkConfig(listen=options.p2p_listen or [GATEWAY_LISTEN], bootstrap=options.bootstrap)
            gateway, port = await start_server(make_app([], key, gateway_store, network=config, ledger=ledger), "127.0.0.1", 0)
            gateway_url = f"http://127.0.0.1:{port}"
            upstreams = upstreams or [gateway_url]
        try:
            sidecar = Sidecar(upstreams, ledger, key, {m.model_id: m for m in models}, audit_rate=options.audit_rate,
                              validators=options.validators, validator_gateway=gateway_url, hold_streams=options.hold_streams)
        except ValueError as exc:
            raise ProofMeshNodeError(str(exc)) from None

        def ready(url: str) -> None:
            target = f"the network via {', '.join(options.bootstrap)}" if options.bootstrap else ", ".join(upstreams)
            progress(f"proxying {url}/v1 -> {target}, auditing {options.audit_rate:.1%} of answers on "
                     f"{', '.join(m.name for m in models) or 'no local model'}"
                     f"{f' and {options.validators} peer(s)' if options.validators else ''} (Ctrl-C to stop)")

        try:
            await serve_until_signalled(make_sidecar_app(sidecar, options.api_keys, options.operator_keys),
                                        options.host, options.port, ready)
        finally:
            if gateway is not None:
                await gateway.cleanup()

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise ProofMeshNodeError(f"cannot listen on {options.host}:{options.port}: {exc}") from exc
    finally:
        ledger.close()
        if gateway_store is not None:
            gateway_store.close()


__all__ = ["VerifierOptions", "run_verifier", "upstream_models"]
