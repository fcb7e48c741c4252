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


class _Passes(trio.abc.Instrument):
    """Counts the passes of trio's run loop (one I/O wait each)."""

    def __init__(self) -> None:
        self.n = 0

    def before_io_wait(self, timeout: float) -> None:
        self.n += 1


async def _timed_waits(count: int) -> tuple[int, list[float]]:
    """`count` waits on a 20 ms grid; (run loop passes they took, wake times from the start)."""
    waker = Waker()
    passes = _Passes()
    trio.lowlevel.add_instrument(passes)
    t0 = trio.current_time()
    woke = []
    for k in range(1, count + 1):
        assert await waker.wait(t0 + 0.020 * k) is False
        woke.append(trio.current_time() - t0)
    trio.lowlevel.remove_instrument(passes)
    return passes.n, woke


async def test_a_due_waiter_runs_in_the_pass_that_finds_it_due_with_no_cancellation(autojump_clock):
    """The heap is served from trio's after_io_wait hook: a timed wake takes the one pass in
    which the clock reaches it (two under autojump: the jump, then the pass at the new time),
    where the system task's cancelled sleep took two more (measured: 4 per wait)."""
    await Waker().wait(trio.current_time() + 0.001)  # the run's timer heap exists
    passes, woke = await _timed_waits(50)
    assert woke == pytest.approx([0.020 * k for k in range(1, 51)], abs=1e-9)
    assert passes <= 2 * 50 + 1, passes


async def test_without_the_hook_the_system_task_still_serves_the_heap(autojump_clock):
    from gateway.mediaclock import _timers

    await Waker().wait(trio.current_time() + 0.001)
    trio.lowlevel.remove_instrument(_timers())  # as trio does with an instrument that raised
    passes, woke = await _timed_waits(20)
    assert woke == pytest.approx([0.020 * k for k in range(1, 21)], abs=1e-9)
    assert passes > 3 * 20  # the slow path: a cancellation and a pass more per wait
