"""Blocking work off the event loop, through one door.

A durable SQLite commit (``synchronous=FULL``: an fsync, milliseconds on a busy disk), an Ed25519
signature and zlib over an answer file all hold the thread they run on. Run inside a coroutine
they stall every stream and every ``/health`` probe of the process, so the node and the sidecar
send every evidence-store and ledger call, and every seal, through :func:`off_loop`.

One small pool, not the default executor: the stores serialise writers on their own lock anyway,
and a bounded pool keeps a burst of sealed answers from taking every worker thread the process
has (``bench/bench_loop_lag.py`` measures the loop's lag with 16 streams and the sidecar auditing
every answer).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

BLOCKING_WORKERS = 4
"""Enough for a commit, a signature and two evidence reads at once; more would only queue on the
stores' locks."""

_pool = ThreadPoolExecutor(max_workers=BLOCKING_WORKERS, thread_name_prefix="proofmesh-blocking")


async def off_loop(work: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(*args, **kwargs)`` on a worker thread; the loop runs on while it blocks."""
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(work, *args, **kwargs))
