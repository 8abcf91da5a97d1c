"""Run a node app in-process for tests: its own event loop in a thread, 127.0.0.1, a free port.

A thread (not the test's own loop) so that blocking clients — the official ``openai`` client,
httpx — can call it from the test thread; the engine and its runtime live on the server's loop.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from typing import Iterator

from aiohttp import web

from node.api.app import start_server

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
