"""ShardHost.compute: one engine call at a time in a worker thread; a caller that is cancelled returns at
once, and the engine stays taken until the call it left behind ends (then the next call runs)."""

from __future__ import annotations

import threading

import pytest
import trio

from p2pinfer.serve.shards import ShardHost


def _host() -> ShardHost:
    return ShardHost(None, lambda: None)


def test_a_call_returns_its_value_or_raises_and_frees_the_engine():
    async def main():
        host = _host()
        assert await host.compute(lambda a, b: a + b, 2, 3) == 5
        assert not host.engine_busy()
        with pytest.raises(ValueError, match="boom"):
            await host.compute(lambda: (_ for _ in ()).throw(ValueError("boom")))
        assert not host.engine_busy()

    trio.run(main)


def test_a_cancelled_caller_leaves_at_once_and_the_engine_waits_for_its_call():
    async def main():
        host = _host()
        release, started, order = threading.Event(), threading.Event(), []

        def slow():
            started.set()
            release.wait(10)
            order.append("slow")

        with trio.move_on_after(0.2) as scope:
            await host.compute(slow)
        assert scope.cancelled_caught and started.is_set()
        assert host.engine_busy()  # the call runs on, holding the engine

        async def next_call():
            await host.compute(order.append, "next")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(next_call)
            await trio.sleep(0.2)
            assert order == []  # the next call waits for the abandoned one
            release.set()
        assert order == ["slow", "next"] and not host.engine_busy()

    trio.run(main)


def test_a_call_cancelled_before_it_started_never_runs():
    async def main():
        host = _host()
        release, ran = threading.Event(), []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.compute, lambda: release.wait(10))
            await trio.sleep(0.1)
            with trio.move_on_after(0.1):
                await host.compute(ran.append, 1)  # waits for the engine, then is cancelled
            release.set()
        await host.compute(lambda: None)
        assert ran == [] and not host.engine_busy()

    trio.run(main)
