"""The ``proofmesh`` command line: parse arguments, call the library, print. Nothing else.

    proofmesh pull [MODEL]                  fetch a registry model into the store
    proofmesh compile [MODEL] [--device D]  build (or find) the library for this machine
    proofmesh generate PROMPT [--chat] ...  stream a continuation to stdout
    proofmesh verify FILE [--model M]       re-check an answer file; exit 0 pass, 1 fraud
    proofmesh run [--model M ...] [--port P] serve the OpenAI-style HTTP API until SIGINT/SIGTERM
        [--p2p-listen MULTIADDR] [--bootstrap MULTIADDR ...]   ... and join the p2p network
    proofmesh peers [--node URL]            list the peers a running node knows
    proofmesh posp --reward R --cost C --penalty S   the least audit rate that makes cheating not pay
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from compiled_models.registry import DEFAULT_MODEL, REGISTRY
from node.errors import ProofMeshNodeError
from node.compiler.devices import DEVICE_CHOICES
from verify.audit_policy import VERIFY_COST_RATIO

if TYPE_CHECKING:
    from verify.identity import NodeKey

log = logging.getLogger("proofmesh")

EXIT_CODES = """exit status:
  0    success; verify: the answer passes (a fraud proof: not upheld)
  1    verify: fraud, or the answer is not the request's (a fraud proof: upheld)
  2    an expected failure, said in one line: bad options or input, a model that cannot be
       loaded, an address in use; verify: an unusable answer file (malformed, unattributable)
  130  interrupted (Ctrl-C)"""


def _progress(message: str) -> None:
    print(f"[proofmesh] {message}", file=sys.stderr, flush=True)


def _cmd_pull(args: argparse.Namespace) -> int:
    from node.runtime import model_store

    if args.model not in REGISTRY:
        raise ProofMeshNodeError(f"unknown registry model {args.model!r}; known: {', '.join(REGISTRY)}")
    path = model_store.pull(REGISTRY[args.model], progress=_progress)
    print(path)
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from node.runtime import model_store
    from node.compiler.build import compile_model
    from node.runtime.loading import load_checkpoint_cached, manifest_of, model_parameters
    from node.compiler.targets import DeviceTarget, cpu_target, cuda_target_for_arch, detect

    root = model_store.store_root()
    path = model_store.resolve(args.model, root, _progress)
    if args.quantize:
        path = _quantize_folder(path, args.quantize.upper(), root)
    ckpt = load_checkpoint_cached(path, root, _progress, keep_quantized=args.weights == "native")
    if args.target == "cuda":  # cross-compile: no GPU needed to build
        target = DeviceTarget("cuda", cuda_target_for_arch(args.cuda_arch))
    elif args.target == "generic-cpu":
        target = DeviceTarget("cpu", cpu_target("x86-64"))
    else:
        target = detect(args.device)
    _progress(f"model_id {manifest_of(ckpt).model_id}")
    _progress(f"compiling for {target.description} (cached after the first time) ...")
    _, layout = model_parameters(ckpt)
    library = compile_model(ckpt.config, target.target, root, layout=layout, force=args.force)
    print(library.path)
    return 0


def _quantize_folder(source: Path, ggml_type: str, root: Path) -> Path:
    """Quantize a Hugging Face folder into ``<store>/models/<name>-<type>`` (a new model_id)."""
    from node.models.llama.load import load_checkpoint
    from node.models.llama.hf_loader import save_quantized

    if not source.is_dir():
        raise ProofMeshNodeError(f"--quantize takes a Hugging Face checkpoint folder; {source} is not one "
                                 "(a GGUF file is quantized already: serve it as it is)")
    out = root / "models" / f"{source.name}-{ggml_type.lower()}"
    _progress(f"quantizing {source.name} to {ggml_type} blocks -> {out} ...")
    save_quantized(load_checkpoint(source), source, out, ggml_type)
    print(out)
    return out


async def _generate(args: argparse.Namespace) -> int:
    from node.runtime.engine import Engine, GenerationRequest
    from node.runtime.loading import load_model
    from verify.sampling import SamplingParams

    seed = args.seed if args.seed is not None else secrets.randbits(63)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=seed)  # before the load: bad options fail at once
    model = load_model(args.model, device=args.device, weights=args.weights, progress=_progress)
    tok = model.tokenizer
    if args.chat:
        prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode_prompt(args.prompt)
    async with Engine(model.runtime, tok, model.model_id, max_context=model.max_context) as engine:
        request = GenerationRequest(tuple(prompt_ids), params, "client" if args.seed is not None else "node")
        async for event in engine.generate(request):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.result is not None:
                r = event.result
                sys.stdout.write("\n")
                _progress(
                    f"{len(r.output_ids)} tokens, finish={r.finish_reason}, seed={seed}, "
                    f"{len(r.output_ids) / max(r.duration, 1e-9):.1f} tokens/s, first token {r.time_to_first_token * 1000:.0f} ms"
                )
    return 0


def _node_key(path: str | Path | None, default_name: str = "node_key.pem") -> tuple[NodeKey, Path]:
    """An identity key (``<store>/<default_name>`` unless given), created on first use. The
    verifier's default is its own file, never the node's: one key per party."""
    from node.runtime import model_store
    from verify.errors import IdentityError
    from verify.identity import NodeKey

    key_path = Path(path) if path else model_store.store_root() / default_name
    try:
        return NodeKey.load_or_create(key_path), key_path
    except (IdentityError, OSError) as exc:
        raise ProofMeshNodeError(f"cannot use the key file {key_path}: {exc}") from exc


def _read_response(path: str) -> dict | list[dict]:
    """A response as the client received it: one JSON document, or a stream's SSE text."""
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
        if text.lstrip().startswith("data:"):
            return [json.loads(line[5:]) for line in text.splitlines()
                    if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]")]
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise ProofMeshNodeError(f"cannot read the response {path}: {exc}") from exc


def _cmd_verify(args: argparse.Namespace) -> int:
    """Re-check an answer file (exit 0 pass, 1 fraud or not the request's answer, 2 unusable) or a
    fraud proof (exit 1 upheld, 0 not)."""
    import json

    from pydantic import BaseModel

    from node.runtime.loading import load_model
    from verify.binding import asked_of, bind_answers
    from verify.evidence import AnswerFile
    from verify.fraud import FraudProof, check_fraud_proof, make_fraud_proof
    from verify.grammar import GrammarError
    from verify.verifier import WrongModelError, verify_answer

    if (args.request is None) != (args.response is None):
        raise ProofMeshNodeError("--request and --response go together: the client's request body and what it received")
    try:
        raw = open(args.file, "rb").read()
        request = json.loads(Path(args.request).read_text(encoding="utf-8")) if args.request else None
    except (OSError, ValueError) as exc:
        raise ProofMeshNodeError(f"cannot read the input: {exc}") from exc
    response = _read_response(args.response) if args.response else None
    document: BaseModel | None = None
    problems = []
    for schema in (AnswerFile, FraudProof):
        try:
            document = schema.model_validate_json(raw)
            break
        except ValidationError as exc:
            problems.append(f"{exc.error_count()} problems as {schema.__name__}, first: {exc.errors()[0]['msg']}")
    if document is None:
        raise ProofMeshNodeError(f"{args.file} is not a valid answer file or fraud proof ({'; '.join(problems)})")
    model = load_model(args.model, device=args.device, weights=args.weights, progress=_progress)

    if isinstance(document, FraudProof):
        check = check_fraud_proof(document, model)
        print(check.model_dump_json(indent=1))
        return 1 if check.upheld else 0
    try:
        verdict = verify_answer(document, model)
    except WrongModelError as exc:
        raise ProofMeshNodeError(str(exc)) from None
    print(verdict.model_dump_json(indent=1))
    code = {"pass": 0, "fraud": 1}.get(verdict.verdict, 2)
    if code == 2:
        _progress(f"unusable answer file ({verdict.verdict}): {'; '.join(verdict.reasons)}")
    if verdict.verdict == "fraud" and args.proof_out:
        key, _ = _node_key(args.key)
        Path(args.proof_out).write_text(make_fraud_proof(document, verdict, key).model_dump_json())
        _progress(f"fraud proof signed by {key.node_id} written to {args.proof_out}")
    if request is not None:
        if not isinstance(request, dict) or not isinstance(response, (dict, list)):
            raise ProofMeshNodeError("--request must hold a JSON object, --response a JSON object or an SSE stream")
        endpoint = "chat" if "messages" in request else "completions"
        try:
            asked = asked_of(endpoint, request, model.tokenizer, model.max_context)
        except GrammarError as exc:  # no honest node serves such a request
            bound, problems, summary = False, {-1: [f"the request's output format cannot be enforced: {exc}"]}, str(exc)
        else:
            report = bind_answers(asked, response, {document.receipt.receipt_id: document}, model.tokenizer,
                                  require_client_seed=args.require_client_seed)
            bound, problems, summary = report.ok, report.problems, report.summary()
        print(json.dumps({"bound": bound, "problems": problems}, indent=1))
        if not bound:
            _progress(f"the answer is not the request's: {summary}")
            code = max(code, 1)
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from node.runtime import model_store
    from node.runtime.loading import load_model
    from node.api.app import make_app, serve_until_signalled
    from node.api.service import NODE
    from node.runtime.engine import DEFAULT_MAX_QUEUE
    from verify.evidence_store import EvidenceStore
    from verify.ledger import Ledger

    if args.max_queue is not None and args.max_queue < 1:
        raise ProofMeshNodeError(f"--max-queue must be at least 1, got {args.max_queue}")
    root = model_store.store_root()
    key, key_path = _node_key(args.key)
    _progress(f"node id {key.node_id} (key {key_path})")
    names = [] if args.model == ["none"] else args.model or [DEFAULT_MODEL]  # none: a gateway
    models = [load_model(name, device=args.device, weights=args.weights, progress=_progress) for name in names]
    store = EvidenceStore(root / "evidence.sqlite")
    api_keys = list(args.api_key or [])
    network = _network_config(args)
    ledger = Ledger(root / "node-ledger.sqlite") if network is not None else None  # convictions and their proofs

    def ready(url: str) -> None:
        served = ", ".join(m.name for m in models) or "no model (gateway)"
        auth = (f", {len(api_keys)} API key(s) required" if api_keys else "") + (", operator key set" if args.operator_key else "")
        if network is not None:
            node = app[NODE]
            _progress(f"p2p peer id {node.network.peer_id}")
            for addr in node.network.addrs:
                _progress(f"p2p listening on {addr}")
        _progress(f"serving {served} on {url}/v1 (Ctrl-C to stop{auth})")

    try:
        app = make_app(models, key, store, api_keys=api_keys, operator_keys=args.operator_key or (), max_queue=DEFAULT_MAX_QUEUE if args.max_queue is None else args.max_queue,
                       network=network, ledger=ledger, fraud_quorum=args.fraud_quorum)
        asyncio.run(serve_until_signalled(app, args.host, args.port, ready))
    except OSError as exc:  # the address is taken or cannot be bound
        raise ProofMeshNodeError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    finally:
        store.close()
        if ledger is not None:
            ledger.close()
    _progress("stopped")
    return 0


def _network_config(args: argparse.Namespace):
    """The p2p settings of ``run`` (None: no p2p network; a gateway needs one)."""
    from p2p.network import NetworkConfig

    if not args.p2p_listen:
        if args.bootstrap or args.model == ["none"]:
            raise ProofMeshNodeError("--bootstrap and --model none need --p2p-listen MULTIADDR")
        return None
    # --api-key guards work over p2p too: then only the peers named in --peer-allow get any.
    allow = args.peer_allow if args.peer_allow is not None else ([] if args.api_key else None)
    return NetworkConfig(listen=args.p2p_listen, bootstrap=args.bootstrap or [], announce=args.p2p_announce or [],
                         peer_allow=allow, allow_private=args.p2p_allow_private)


def _cmd_peers(args: argparse.Namespace) -> int:
    """Print the peers a running node knows (its GET /v1/peers)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{args.node.rstrip('/')}/v1/peers", timeout=10) as response:
            body = json.load(response)
    except (OSError, ValueError) as exc:
        raise ProofMeshNodeError(f"cannot read {args.node}/v1/peers: {exc}") from exc
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    print(f"node {body['peer_id']}: {len(body['data'])} peer(s)")
    for p in body["data"]:
        models = ", ".join(m["name"] for m in p["models"]) or "-"
        print(f"{p['peer_id']}  load {p['load']}  latency {p['latency_ms']} ms  last seen "
              f"{time.time() - p['last_seen']:.1f} s ago  models: {models}")
    return 0


def _upstream_models(args: argparse.Namespace) -> list:
    """The models the upstream nodes serve, loaded here as ``proofmesh run`` would (pulled when
    in the registry), each checked to be the same model_id; an error names what is missing."""
    import json
    import urllib.request

    from node.runtime.loading import load_model

    served: dict[str, str] = {}
    for url in args.upstream:
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
            model = load_model(name, device=args.device, weights=args.weights, progress=_progress)
        except ProofMeshNodeError as exc:
            raise ProofMeshNodeError(f"the upstream serves {name!r}, which this machine cannot load ({exc}); "
                                     "give its path with --model") from exc
        if model.model_id != model_id:
            raise ProofMeshNodeError(f"the upstream's {name!r} is model {model_id[:16]}…, the local one is "
                                     f"{model.model_id[:16]}…: give the matching model with --model")
        models.append(model)
    return models


def _cmd_verifier(args: argparse.Namespace) -> int:
    from node.runtime import model_store
    from node.runtime.loading import load_model
    from node.api.app import make_app, serve_until_signalled, start_server
    from node.sidecar.proxy import Sidecar, make_sidecar_app
    from p2p.network import NetworkConfig
    from verify.evidence_store import EvidenceStore
    from verify.ledger import Ledger

    if not 0.0 <= args.audit_rate <= 1.0:
        raise ProofMeshNodeError("--audit-rate is a probability in [0, 1]")
    if args.validators < 0:
        raise ProofMeshNodeError("--validators is a count of peers, 0 or more")
    if not args.upstream and not args.bootstrap:
        raise ProofMeshNodeError("give the nodes to proxy as --upstream URL ..., or join the network with --bootstrap MULTIADDR")
    if args.validators and not args.bootstrap:
        raise ProofMeshNodeError("--validators needs --bootstrap: validators are drawn from the verifier's own view of the "
                                 "network, never through a node it audits")
    if not args.model and not args.upstream:
        raise ProofMeshNodeError("give the model to verify with --model (with --bootstrap alone there is no upstream to ask)")
    key, key_path = _node_key(args.key, "verifier_key.pem")
    _progress(f"verifier id {key.node_id} (key {key_path})")
    if args.model:
        models = [load_model(name, device=args.device, weights=args.weights, progress=_progress) for name in args.model]
    else:
        models = _upstream_models(args)
    root = model_store.store_root()
    ledger = Ledger(Path(args.ledger) if args.ledger else root / "ledger.sqlite")
    gateway_store = EvidenceStore(root / "verifier-gateway.sqlite") if args.bootstrap else None

    async def serve() -> None:
        """With --bootstrap, a gateway node (no model, the verifier's key) joins the network on
        loopback and is the sidecar's one upstream: routing, validators and fraud gossip are its."""
        upstreams, gateway, gateway_url = list(args.upstream or []), None, None
        if args.bootstrap:
            config = NetworkConfig(listen=args.p2p_listen or ["/ip4/127.0.0.1/tcp/0"], bootstrap=args.bootstrap)
            gateway, port = await start_server(make_app([], key, gateway_store, network=config, ledger=ledger), "127.0.0.1", 0)
            gateway_url = f"http://127.0.0.1:{port}"
            upstreams = upstreams or [gateway_url]
        try:
            sidecar = Sidecar(upstreams, ledger, key, {m.model_id: m for m in models}, audit_rate=args.audit_rate,
                              validators=args.validators, validator_gateway=gateway_url, hold_streams=args.hold_streams)
        except ValueError as exc:
            raise ProofMeshNodeError(str(exc)) from None

        def ready(url: str) -> None:
            target = f"the network via {', '.join(args.bootstrap)}" if args.bootstrap else ", ".join(upstreams)
            _progress(f"proxying {url}/v1 -> {target}, auditing {args.audit_rate:.1%} of answers on "
                      f"{', '.join(m.name for m in models) or 'no local model'}"
                      f"{f' and {args.validators} peer(s)' if args.validators else ''} (Ctrl-C to stop)")

        try:
            await serve_until_signalled(make_sidecar_app(sidecar, args.api_key or (), args.operator_key or ()), args.host, args.port, ready)
        finally:
            if gateway is not None:
                await gateway.cleanup()

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise ProofMeshNodeError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    finally:
        ledger.close()
        if gateway_store is not None:
            gateway_store.close()
    _progress("stopped")
    return 0


def _cmd_posp(args: argparse.Namespace) -> int:
    from verify.audit_policy import GameParams, plan_audits

    game = GameParams(reward=args.reward, cost=args.cost, penalty=args.penalty, collusion=args.collusion,
                      validators=args.validators, detection=args.detection, verify_cost_ratio=args.verify_cost_ratio)
    plan = plan_audits(game)
    if args.json:
        print(plan.model_dump_json(indent=1))
        return 0
    print(f"catch probability per audit q = D (1 - r^k) = {plan.catch_probability:.4g}")
    if plan.min_audit_rate is None:
        print(f"no audit rate up to 1 makes cheating unprofitable: C = {game.cost:g} > q (R + S) = "
              f"{plan.catch_probability * (game.reward + game.penalty):.4g}; raise the stake or the validators")
        return 0
    print(f"least audit rate p = C / (q (R + S)) = {plan.min_audit_rate:.4g} ({plan.min_audit_rate:.2%} of answers)")
    print(f"audit overhead at that rate: {plan.audit_overhead:.3%} of all compute "
          f"({game.validators} validator(s), each re-check {game.verify_cost_ratio:g} of a generation)")
    return 0


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for TVM's pool (default: every core this "
                   "process may use, from its affinity mask; TVM_NUM_THREADS is honoured when set)")


def _add_weights_option(p: argparse.ArgumentParser) -> None:
    _add_threads_option(p)
    p.add_argument("--weights", choices=["native", "fp32"], default="native",
                   help="native: keep a GGUF's Q4_0/Q4_1/Q8_0 weights quantized in memory and compute on them "
                   "(default); fp32: dequantize at load. Same model_id either way")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proofmesh", description="ProofMesh node: verifiable LLM inference",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a registry model into the model store")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("compile", help="compile a model for this machine ahead of time")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, GGUF file or HF folder")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--target", choices=["host", "generic-cpu", "cuda"], default="host",
                   help="host: this machine's device; generic-cpu: portable x86-64; cuda: cross-compile")
    p.add_argument("--cuda-arch", default="sm_90")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], help="first quantize a Hugging Face folder into "
                   "llama.cpp blocks (a new model in the store, with its own model_id), then compile it")
    _add_weights_option(p)
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("generate", help="generate a continuation and print it as it is produced")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    _add_weights_option(p)
    p.set_defaults(func=lambda a: asyncio.run(_generate(a)))

    p = sub.add_parser("verify", help="re-check an answer file (or a fraud proof) by teacher-forced re-execution")
    p.add_argument("file", help="answer file (JSON: receipt, signature, public key, evidence) or fraud proof; fetch an "
                   "answer file with its evidence token from the response's proofmesh object: "
                   "curl 'NODE/v1/receipts/RECEIPT_ID?token=EVIDENCE_TOKEN' > answer.json")
    p.add_argument("--proof-out", help="on a fraud verdict, write a fraud proof signed with this node's key here")
    p.add_argument("--request", help="the client's request body (JSON): also check that the answer is this request's "
                   "(prompt rendering, sampling parameters, text and finish received); needs --response")
    p.add_argument("--response", help="what the client received: the JSON response, or the stream's SSE text")
    p.add_argument("--require-client-seed", action="store_true", help="with --request: refuse an answer whose seed the "
                   "node chose (it could have drawn many and kept the one it liked)")
    p.add_argument("--key", type=Path, help="key file that signs fraud proofs (default <store>/node_key.pem)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model the answer claims, held locally")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    _add_weights_option(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("run", help="serve models over the OpenAI-style HTTP API (signed receipts on every answer)")
    p.add_argument("--model", action="append", help="registry name, GGUF file or HF folder (repeat to serve several; "
                   f"default {DEFAULT_MODEL}); 'none': serve no model, forward to peers")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--key", default=None, help="Ed25519 identity key file (default: node_key.pem in the model store; "
                   "created on first use)")
    p.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' on /v1 (repeatable)")
    p.add_argument("--operator-key", action="append", help="the operator's key (repeatable): 'Authorization: Bearer KEY' "
                   "reads any answer file without its evidence token and lists the signed receipts on the status page; "
                   "also an API key. Without one nobody does")
    p.add_argument("--max-queue", type=int, default=None, help="requests that may wait for a batch slot before "
                   "new ones get 429 (default 64)")
    p.add_argument("--p2p-listen", action="append", metavar="MULTIADDR",
                   help="join the p2p network, listening here (e.g. /ip4/0.0.0.0/tcp/4001; repeatable)")
    p.add_argument("--p2p-announce", action="append", metavar="MULTIADDR",
                   help="where peers should dial this node, when not where it listens (0.0.0.0, NAT; repeatable)")
    p.add_argument("--bootstrap", nargs="+", metavar="MULTIADDR", help="peers to join through (with /p2p/<peer id>)")
    p.add_argument("--peer-allow", nargs="*", metavar="PEER_ID", help="only these peers may ask this node for work "
                   "over p2p (inference, re-checks, evidence, fraud notices); with --api-key and no --peer-allow, none may")
    p.add_argument("--p2p-allow-private", action="store_true", help="dial private and loopback addresses learned from "
                   "peers' records (default: only when this node itself listens on such an address)")
    p.add_argument("--fraud-quorum", type=int, default=2, help="for a model this node does not serve: convict on a "
                   "fraud proof once this many peers whose service it has observed vouch for it (0: never; default 2). "
                   "For a model it serves it always re-checks the proof itself")
    _add_weights_option(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("peers", help="list the peers a running node knows")
    p.add_argument("--node", default="http://127.0.0.1:8000", help="the node's HTTP URL")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=_cmd_peers)

    p = sub.add_parser("verifier", help="an OpenAI-compatible proxy in front of a node that audits a share of its answers")
    p.add_argument("--upstream", action="append", help="a node's URL, e.g. http://127.0.0.1:8000 "
                   "(repeat for several: requests are routed by reputation, never to a convicted node)")
    p.add_argument("--bootstrap", nargs="+", metavar="MULTIADDR", help="join the p2p network through these peers: "
                   "an embedded gateway with the verifier's key draws validators and spreads fraud proofs, and is the "
                   "upstream when no --upstream is given")
    p.add_argument("--p2p-listen", action="append", metavar="MULTIADDR", help="with --bootstrap: where the embedded "
                   "gateway listens (default /ip4/127.0.0.1/tcp/0)")
    p.add_argument("--audit-rate", type=float, default=0.05, help="share of answers re-executed (default 0.05; "
                   "see proofmesh posp)")
    p.add_argument("--model", action="append", help="model(s) to re-execute audits on, held locally (repeatable; "
                   "default: the model(s) the upstream serves, pulled and loaded here)")
    p.add_argument("--validators", type=int, default=0, help="also re-check each audit on this many peers, drawn at random by "
                   "the verifier's own gateway (needs --bootstrap); their verdicts are held to the outcome")
    p.add_argument("--hold-streams", action="store_true", help="show a streamed answer only once it is bound to its "
                   "request (default: its text as it is rebuilt from the node's token ids, the finish once bound)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--key", default=None, help="key that signs verdicts (default: verifier_key.pem in the model store, "
                   "apart from the node's key)")
    p.add_argument("--ledger", default=None, help="SQLite ledger (default: ledger.sqlite in the model store)")
    p.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' on /v1 (repeatable); "
                   "clients' keys are passed on to the upstream")
    p.add_argument("--operator-key", action="append", help="the operator's key (repeatable): 'Authorization: Bearer KEY' "
                   "reads the audits (GET /v1/audits, the status page's list); also an API key. Without one nobody does")
    _add_weights_option(p)
    p.set_defaults(func=_cmd_verifier)

    p = sub.add_parser("posp", help="proof-of-sampling: the least audit rate at which cheating does not pay")
    p.add_argument("--reward", type=float, required=True, help="R: paid per answer, forfeited when caught")
    p.add_argument("--cost", type=float, required=True, help="C: compute cost of an answer (what cheating saves)")
    p.add_argument("--penalty", type=float, required=True, help="S: stake slashed when caught")
    p.add_argument("--collusion", type=float, default=0.0, help="r: share of validators colluding with cheaters")
    p.add_argument("--validators", type=int, default=1, help="k: validators per audit (default 1)")
    p.add_argument("--detection", type=float, default=1.0, help="D: chance a re-execution flags a cheat (default 1)")
    p.add_argument("--verify-cost-ratio", type=float, default=VERIFY_COST_RATIO, help="one re-check's cost against "
                   f"generation (default: {VERIFY_COST_RATIO}, measured on the default model)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_posp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[proofmesh] %(message)s", stream=sys.stderr)
    try:
        if hasattr(args, "threads"):  # commands that run TVM: size its pool before any work
            from node.compiler.targets import configure_threads
            from node.runtime.allocator import keep_freed_memory

            _progress(f"{configure_threads(args.threads)} CPU threads for TVM")
            keep_freed_memory()
        return args.func(args)
    except ProofMeshNodeError as exc:
        print(f"proofmesh: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # an option's value the library refuses (--temperature 3, --seed -1)
        from node.api.errors import describe_validation_error

        print(f"proofmesh: error: {describe_validation_error(exc, as_options=True)[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
