"""gateway/mediaclock.py: timed waits without a cancel scope per wait (MockClock: exact times)."""

from __future__ import annotations

import math

import pytest
import trio

from gateway.mediaclock import Waker


async def test_a_wait_ends_at_its_deadline_or_at_wake_whichever_is_first(autojump_clock):
    waker = Waker()
    t0 = trio.current_time()
    assert await waker.wait(t0 + 0.020) is False
    assert trio.current_time() == pytest.approx(t0 + 0.020, abs=1e-9)

    async def wake_at(t):
        await trio.sleep_until(t)
        waker.wake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake_at, t0 + 0.025)
        assert await waker.wait(t0 + 0.040) is True
        assert trio.current_time() == pytest.approx(t0 + 0.025, abs=1e-9)
    # the abandoned deadline (t0 + 40 ms) wakes nobody: the next wait ends at its own
    assert await waker.wait(t0 + 0.060) is False
    assert trio.current_time() == pytest.approx(t0 + 0.060, abs=1e-9)


async def test_many_waiters_each_wake_at_their_own_deadline_in_order(autojump_clock):
    t0 = trio.current_time()
    woke: list[tuple[int, float]] = []
    deadlines = [0.050, 0.010, 0.030, 0.020, 0.040, 0.010]

    async def one(i, d):
        assert await Waker().wait(t0 + d) is False
        woke.append((i, trio.current_time() - t0))

    async with trio.open_nursery() as nursery:
        for i, d in enumerate(deadlines):
            nursery.start_soon(one, i, d)
        await trio.sleep(0.001)

        async def late_early():  # added later with the earliest deadline: the server re-arms
            assert await Waker().wait(t0 + 0.005) is False
            woke.append((99, trio.current_time() - t0))

        nursery.start_soon(late_early)
    times = dict(woke)
    assert times[99] == pytest.approx(0.005, abs=1e-9)
    for i, d in enumerate(deadlines):
        assert times[i] == pytest.approx(d, abs=1e-9)
    assert [t for _, t in woke] == sorted(t for _, t in woke)


async def test_a_cancelled_wait_raises_and_leaves_the_waker_usable(autojump_clock):
    waker = Waker()
    with trio.move_on_after(0.010) as scope:
        await waker.wait(math.inf)
    assert scope.cancelled_caught and not waker.waiting
    waker.wake()  # nothing waits: no effect
    t = trio.current_time()
    assert await waker.wait(t + 0.005) is False


async def test_a_past_deadline_returns_at_once_but_still_checkpoints(autojump_clock):
    waker = Waker()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await waker.wait(trio.current_time() - 1)


async def test_one_waker_serves_one_task():
    waker = Waker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waker.wait, math.inf)
        await trio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already has a waiting task"):
            await waker.wait(math.inf)
        waker.wake()


async def test_a_waiter_runs_after_a_trio_timer_due_at_the_same_instant(autojump_clock):
    """A pacer on the heap and a source on trio.sleep_until (a file, a test's caller), both
    due at t: the source's frame is there when the pacer looks, whichever way trio orders its
    batch (it reverses half of them), in every one of 200 instants. The heap's waiters run one
    pass after its server, which trio wakes with the source: a heap served from trio's
    after_io_wait hook, waiters woken in that same pass, failed this (bench/README.md, seventh
    measurement: a silence slot after a stall, in CI)."""
    t0 = trio.current_time()
    order: list[str] = []

    async def source():
        for k in range(1, 201):
            await trio.sleep_until(t0 + 0.020 * k)
            order.append("source")

    async def pacer():
        waker = Waker()
        for k in range(1, 201):
            await waker.wait(t0 + 0.020 * k)
            order.append("pacer")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pacer)
        nursery.start_soon(source)
    assert order == ["source", "pacer"] * 200
