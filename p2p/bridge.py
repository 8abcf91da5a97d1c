"""The one bridge between the node's asyncio loop (aiohttp, the engine) and libp2p's trio loop.

py-libp2p runs only on trio; aiohttp only on asyncio. Trio runs in its own thread
(``TrioThread``) and the two loops hand each other work through their thread-safe entry
points only: ``TrioToken.run_sync_soon`` into trio, ``loop.call_soon_threadsafe`` /
``asyncio.run_coroutine_threadsafe`` into asyncio (measured the simplest and fastest of the
options, DESIGN.md "Network"). Nothing polls: each side sleeps in its own loop until the other
posts, so an idle node costs no CPU.

Both directions come in two shapes, a call and a stream of items; a call is a stream of one.
Cancellation crosses too: an asyncio caller that is cancelled (an HTTP client gone) cancels the
trio task it started, and the other way round. Items are handed over without a bound: the
streams here carry tokens of one answer, never more than a model produces.
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import Future
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import trio

from p2p.errors import StreamFailed

T = TypeVar("T")
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _End:
    """The stream ended normally."""


@dataclass(frozen=True)
class _Failed:
    error: BaseException


async def _drain(get: Callable[[], Awaitable[Any]]) -> AsyncIterator[Any]:
    """The items another thread posts, through ``get`` (either loop's queue), until it posts
    ``_End``; a posted ``_Failed`` raises its error here."""
    while True:
        item = await get()
        if isinstance(item, _End):
            return
        if isinstance(item, _Failed):
            raise item.error
        yield item


class TrioThread:
    """A trio event loop in a daemon thread, with a nursery that tasks from asyncio run in."""

    def __init__(self, name: str = "proofmesh-p2p"):
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle (asyncio side) ----------------------------------------------------------
    async def start(self) -> None:
        """Start the trio thread and bind it to the running asyncio loop."""
        self._loop = asyncio.get_running_loop()
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        self._thread = threading.Thread(target=trio.run, args=(main,), name=self._name, daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(ready.wait, START_TIMEOUT_S):
            raise StreamFailed("the trio thread did not start")

    async def stop(self) -> None:
        """Cancel every trio task and wait for the thread to end."""
        if self._thread is None:
            return
        try:
            self._token.run_sync_soon(self._stop.set)
        except trio.RunFinishedError:
            pass  # already over
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def start_service(self, fn: Callable[..., Awaitable[None]]) -> None:
        """Start the long-lived trio task ``fn(task_status=...)`` (it runs until ``stop``);
        returns once it reports ready with ``task_status.started()``, raises if it fails first."""
        await self.call(self._nursery.start, fn)

    # -- asyncio -> trio -------------------------------------------------------------------
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run the trio coroutine function ``fn(*args)`` in the trio thread; await its result."""

        async def once() -> AsyncIterator[T]:
            yield await fn(*args)

        async for result in self.iterate(once):
            return result
        raise StreamFailed("the trio task ended without a result")  # unreachable: ``once`` yields

    async def iterate(self, agen_fn: Callable[..., AsyncIterator[T]], *args: Any) -> AsyncIterator[T]:
        """Iterate the trio async generator ``agen_fn(*args)`` from asyncio. Leaving the loop
        early (or being cancelled) cancels the trio side."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        scope = trio.CancelScope()

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass  # the asyncio loop is closed: nobody is waiting any more

        async def runner() -> None:
            outcome: Any = _Failed(StreamFailed("the p2p thread stopped"))
            try:
                with scope:
                    async with aclosing(agen_fn(*args)) as agen:
                        async for item in agen:
                            post(item)
                    outcome = _End()
            except Exception as exc:  # noqa: BLE001 - handed over to the asyncio side, which raises it
                outcome = _Failed(exc)
            finally:
                post(outcome)

        self._into_trio(self._start_task, runner, post)
        try:
            async for item in _drain(queue.get):
                yield item
        finally:
            self._into_trio(scope.cancel, quiet=True)

    def _start_task(self, fn: Callable[[], Awaitable[None]], post: Callable[[Any], None]) -> None:
        """In the trio thread (an exception here would crash trio: report it instead)."""
        try:
            self._nursery.start_soon(fn)
        except RuntimeError:  # the nursery is closing: the thread is stopping
            post(_Failed(StreamFailed("the p2p thread is stopping")))

    def _into_trio(self, fn: Callable[..., Any], *args: Any, quiet: bool = False) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except (trio.RunFinishedError, AttributeError) as exc:  # AttributeError: never started
            if not quiet:
                raise StreamFailed("the p2p thread is not running") from exc

    # -- trio -> asyncio -------------------------------------------------------------------
    async def call_asyncio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From trio: run the asyncio coroutine function ``fn(*args)`` on the node's loop."""

        async def once() -> AsyncIterator[T]:
            yield await fn(*args)

        async for result in self.iterate_asyncio(once):
            return result
        raise StreamFailed("the asyncio task ended without a result")  # unreachable

    async def iterate_asyncio(self, agen_fn: Callable[..., AsyncIterator[T]], *args: Any) -> AsyncIterator[T]:
        """From trio: iterate the asyncio async generator ``agen_fn(*args)``; leaving early (or
        being cancelled) cancels the asyncio side."""
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel(math.inf)

        def deliver(item: Any) -> None:  # in the trio thread: must not raise
            try:
                send.send_nowait(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the trio side left early

        def post(item: Any) -> None:
            try:
                token.run_sync_soon(deliver, item)
            except trio.RunFinishedError:
                pass  # trio is gone: nobody is waiting any more

        async def pump() -> None:
            outcome: Any = _End()
            try:
                async with aclosing(agen_fn(*args)) as agen:
                    async for item in agen:
                        post(item)
            except asyncio.CancelledError:
                outcome = _Failed(StreamFailed("cancelled"))
                raise
            except Exception as exc:  # noqa: BLE001 - handed over to the trio side, which raises it
                outcome = _Failed(exc)
            finally:
                post(outcome)

        future: Future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            async with receive:
                async for item in _drain(receive.receive):
                    yield item
        finally:
            future.cancel()  # thread-safe; a no-op once the pump is done
