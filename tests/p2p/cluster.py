"""Real ``proofmesh run`` nodes in subprocesses on 127.0.0.1, for network tests and benchmarks.

Every node gets its own store (its own evidence database) with the compiled libraries shared
through symlinks, so the tiny model compiles once; its own fixed key file, so peer ids are known
before it starts. ``Cluster`` ends every process it started (SIGKILL if SIGTERM is not enough),
whatever happens in the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.models_fixtures import home_sharing
from verify.identity import NodeKey

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
OPERATOR_KEY = "verifier-operator"  # what a test's `proofmesh verifier --operator-key` gets: it reads the audits
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


def tiny_cluster(tmp_path_factory, store: Path, name: str = "tiny") -> tuple["Cluster", Path]:
    """A cluster whose nodes share the session ``store``'s builds (the tiny shape compiles once a
    session, not once a cluster), serving a tiny model as ``name``; and that model's folder."""
    from tests.models_fixtures import make_tiny_hf_checkpoint

    model = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf") / name)
    warm_store(store, model)
    return Cluster(tmp_path_factory.mktemp("nodes"), store), model


def warm_store(home: Path, model: Path) -> None:
    """Compile ``model`` into ``home`` once (later nodes find the library there)."""
    env = {**os.environ, "PROOFMESH_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "node.cli", "compile", str(model), "--device", "cpu"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    log: Path
    key: NodeKey
    url: str = ""
    addrs: list[str] = field(default_factory=list)
    log_offset: int = 0  # where this run's lines start (a restarted node appends to its log)

    @property
    def peer_id(self) -> str:
        return self.key.node_id

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def stderr(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)


class Cluster:
    """Starts nodes and ends them all on ``close``."""

    def __init__(self, root: Path, warm_home: Path, *, echo_logs: bool = True):
        self.root, self.warm_home, self.echo_logs = root, warm_home, echo_logs
        self.nodes: list[NodeProcess] = []

    def start(self, name: str, models: list[str], *, bootstrap: list[str] = (), extra: list[str] = (),
              module: str = "node.cli") -> NodeProcess:
        """Start a node (``models`` empty: a gateway) with ``module``'s command line (a test's
        dishonest node wraps the real one); returns at once, see ``wait_ready``."""
        home = self.root / name
        if not home.exists():  # a node started again (after a kill) keeps its home: key, evidence, ledger
            home_sharing(home, self.warm_home)
        key_path = home / "node_key.pem"
        key = NodeKey.load_or_create(key_path)
        args = [sys.executable, "-m", module, "run", "--port", "0", "--device", "cpu", "--key", str(key_path),
                "--p2p-listen", LOOPBACK, *extra]
        for m in models or ["none"]:
            args += ["--model", m]
        if bootstrap:
            args += ["--bootstrap", *bootstrap]
        log = home / "node.log"
        env = {**os.environ, "PROOFMESH_HOME": str(home)}
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        node = NodeProcess(name, process, log, key, log_offset=offset)
        self.nodes.append(node)
        return node

    def wait_ready(self, node: NodeProcess, timeout: float = START_TIMEOUT_S) -> NodeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = node.stderr()
            if node.process.poll() is not None:
                raise AssertionError(f"{node.name} exited with {node.process.returncode}:\n{text[-3000:]}")
            found = re.search(r"serving .* on (http://[0-9.:]+)/v1", text)
            if found:
                node.url = found.group(1)
                node.addrs = re.findall(r"p2p listening on (\S+)", text)
                return node
            time.sleep(0.1)
        raise AssertionError(f"{node.name} did not start in {timeout} s:\n{node.stderr()[-3000:]}")

    def close(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill(signal.SIGKILL)
                node.process.wait()
        for node in self.nodes if self.echo_logs else ():  # pytest shows them when a test failed
            print(f"---- {node.name} {node.peer_id}\n{node.stderr()[-4000:]}")
