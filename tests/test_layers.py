"""The house's import seams: which layer may load what, and no import circles anywhere.

- verify/ is the trust core a client uses alone: it loads neither node/ nor p2p/ (nor TVM, libp2p);
- the HTTP layer's wire models and errors, the verifier sidecar and the CLI's ``--help`` and
  ``posp`` load no TVM and no libp2p (a proxy and a calculator need neither); the node's app
  loads libp2p only when it joins a network;
- p2p/ never imports node/ (nor aiohttp: its one bridge to asyncio is its own);
- no module imports itself back through others (walked from the source, lazy imports included),
  and no package of node/ imports itself back through another package (the layers run one way).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "verify", "p2p", "compiled_models")


def _loaded_after(code: str) -> set[str]:
    """Top-level package names loaded by running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("code, forbidden", [
    ("import verify, verify.binding, verify.fraud, verify.ledger, verify.attestation, verify.evidence_store, "
     "verify.recheck, verify.sse, verify.durable, verify.finish",
     {"node", "p2p", "tvm", "libp2p"}),
    ("import node.api.protocol, node.api.errors", {"tvm", "libp2p", "trio"}),
    ("import node.sidecar.app", {"tvm", "libp2p", "trio"}),
    ("import node.api.app", {"libp2p", "trio"}),  # a node without a network loads no p2p code
    ("from node.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass", {"tvm", "libp2p"}),
    ("from node.cli import main\nmain(['posp', '--reward', '1', '--cost', '0.5', '--penalty', '10'])", {"tvm", "libp2p"}),
    ("import p2p, p2p.network, p2p.wire, p2p.protocols", {"node", "aiohttp"}),
])
def test_a_layer_loads_only_what_it_needs(code, forbidden):
    assert not _loaded_after(code) & forbidden


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of this repository that ``path`` imports, anywhere in it (lazy imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "pkg.mod.Name" -> "pkg.mod"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _import_graph() -> dict[str, set[str]]:
    """Every module of the repository and the repository modules it imports."""
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    # A package's __init__ that only hands names on ties nothing: drop package -> own submodule edges.
    return {m: {t for t in deps if not t.startswith(m + ".")} for m, deps in graph.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles a depth-first walk of ``graph`` meets (each as the trail that closes it)."""
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                circles.append(trail[trail.index(dep):] + [dep] if dep in trail else [module, dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circles():
    assert not (circles := _circles(_import_graph())), circles


def _node_unit(module: str) -> str:
    """The layer a node module belongs to: ``node.X`` for everything under ``node/X/``
    (subpackages such as ``node.models.quant`` roll up into ``node.models``: a package's parts
    share its place in the order), and each top-level module (``node.errors``) its own."""
    return ".".join(module.split(".")[:2])


def test_no_package_circles_inside_node():
    """Module circles are not the only kind: ``node.models.quant`` once read constants from
    ``node.compiler`` while the compiler imports the models it compiles, with no module circle
    but two packages each needing the other. Between node's packages imports run one way."""
    units: dict[str, set[str]] = {}
    for module, deps in _import_graph().items():
        if module.startswith("node."):
            unit = units.setdefault(_node_unit(module), set())
            unit.update(_node_unit(d) for d in deps if d.startswith("node.") and _node_unit(d) != _node_unit(module))
    assert {"node.models", "node.compiler", "node.runtime", "node.api", "node.sidecar"} <= set(units)
    assert not (circles := _circles(units)), circles
