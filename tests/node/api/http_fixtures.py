"""Run a node app in-process for tests: its own event loop in a thread, 127.0.0.1, a free port.

A thread (not the test's own loop) so that blocking clients — the official ``openai`` client,
httpx — can call it from the test thread; the engine and its runtime live on the server's loop.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

from aiohttp import web

from node.api.app import make_app
from node.api.server import start_server
from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from node.sidecar.app import Sidecar, make_sidecar_app
from verify.evidence_store import EvidenceStore
from verify.identity import NodeKey
from verify.ledger import Ledger

START_TIMEOUT_S = 60


@contextmanager
def serving(app: web.Application, **server_options) -> Iterator[str]:
    """Serve ``app`` until the block ends (then shut it down and join the thread); yields its URL.
    ``server_options``: ``start_server``'s (a connection cap, say)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-node", daemon=True)
    thread.start()
    try:
        runner, port = asyncio.run_coroutine_threadsafe(start_server(app, "127.0.0.1", 0, **server_options), loop).result(START_TIMEOUT_S)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()


@contextmanager
def audited_node(folder: Path, store: Path, workdir: Path, *, limits: CacheLimits, node_operator_keys: Sequence[str] = (),
                 sidecar_api_keys: Sequence[str] = (), sidecar_operator_keys: Sequence[str] = ()) -> Iterator[SimpleNamespace]:
    """A node serving the model in ``folder`` and a sidecar in front of it that audits every
    answer on its own copy of the model; yields their URLs, the node's key and model, the
    sidecar and its ledger."""
    served, auditor = (load_model(str(folder), device="cpu", limits=limits, root=store) for _ in range(2))
    node_key = NodeKey.generate()
    evidence = EvidenceStore(workdir / "evidence.sqlite")
    ledger = Ledger(workdir / "ledger.sqlite")
    try:
        with serving(make_app([served], node_key, evidence, operator_keys=node_operator_keys)) as node_url:
            sidecar = Sidecar([node_url], ledger, NodeKey.generate(), {auditor.model_id: auditor}, audit_rate=1.0)
            with serving(make_sidecar_app(sidecar, api_keys=sidecar_api_keys, operator_keys=sidecar_operator_keys)) as sidecar_url:
                yield SimpleNamespace(node_url=node_url, sidecar_url=sidecar_url, node_key=node_key, model=served,
                                      sidecar=sidecar, ledger=ledger)
    finally:
        evidence.close()
        ledger.close()
