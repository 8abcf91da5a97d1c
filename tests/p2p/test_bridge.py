"""The asyncio <-> trio bridge: calls, streams, errors and cancellation in both directions."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from p2p.bridge import TrioThread
from p2p.errors import StreamFailed


async def _with_bridge(body) -> None:
    bridge = TrioThread()
    await bridge.start()
    try:
        await body(bridge)
    finally:
        await bridge.stop()


def test_calls_and_streams_both_ways():
    async def body(bridge: TrioThread) -> None:
        async def in_trio(x: int) -> tuple[int, str]:
            trio.lowlevel.current_trio_token()  # raises outside trio
            await trio.sleep(0)
            return x * 2, threading.current_thread().name

        assert await bridge.call(in_trio, 21) == (42, "proofmesh-p2p")

        async def count(n: int):
            for i in range(n):
                await trio.sleep(0)
                yield i

        assert [i async for i in bridge.iterate(count, 5)] == [0, 1, 2, 3, 4]

        async def words():
            for w in ("a", "b"):
                await asyncio.sleep(0)
                yield w

        async def from_trio() -> list[str]:
            one = await bridge.call_asyncio(asyncio.sleep, 0, "slept")
            return [one] + [w async for w in bridge.iterate_asyncio(words)]

        assert await bridge.call(from_trio) == ["slept", "a", "b"]

    asyncio.run(_with_bridge(body))


def test_errors_cross_and_cancellation_reaches_trio():
    async def body(bridge: TrioThread) -> None:
        async def fails() -> None:
            raise ValueError("trio side")

        with pytest.raises(ValueError, match="trio side"):
            await bridge.call(fails)

        cancelled = threading.Event()

        async def forever() -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        task = asyncio.create_task(bridge.call(forever))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(cancelled.wait, 5)

        async def asyncio_fails() -> None:
            raise KeyError("asyncio side")

        async def relay() -> None:
            await bridge.call_asyncio(asyncio_fails)

        with pytest.raises(KeyError):
            await bridge.call(relay)

    asyncio.run(_with_bridge(body))


def test_stopped_bridge_refuses_work():
    async def body() -> None:
        bridge = TrioThread()
        await bridge.start()
        await bridge.stop()
        with pytest.raises(StreamFailed):
            await bridge.call(trio.sleep, 0)

    asyncio.run(body())
