"""Timed waits for the media path without a cancel scope per wait.

A trio timeout is a cancellation: when `move_on_at(t)` (or `sleep_until(t)`) expires, trio
recalculates the scope's cancel status, raises `Cancelled` into the waiting task and unwinds
it to the scope. That costs more than the rest of a 20 ms frame's bookkeeping: a py-spy
profile of one phone → channel call (bench/README.md, issue 12) had a quarter of the gateway's
busy time in `Deadlines.expire` and its callees, for the playout's and the pacers' per-frame
waits.

Here a task parks (`trio.lowlevel.wait_task_rescheduled`) on a `Waker` until its deadline or
until someone calls `wake()` (a packet arrived, a frame was queued), whichever comes first. The
deadlines of every waiter in the trio run are kept in one heap, served by one system task: it
parks in a cancel scope whose deadline is the heap's earliest (so that trio's I/O wait ends in
time, and MockClock's autojump jumps to it) and wakes the waiters that are due.

What wakes that task is a trio instrument's `after_io_wait` hook. trio calls it in every pass
of its run loop, after the I/O wait and before it expires its own deadlines. When the heap's
earliest deadline is due, the hook lifts the scope's deadline and reschedules the task
directly. trio then has no cancellation to deliver: unwinding one cost a quarter of a call's
timer work before (bench/README.md, seventh measurement). The scope fires only when the hook
was a hair early (the clock moved past a deadline between the hook and trio's own expiry).

The waiters run one pass after the task, as they always did. That order matters. A pacer due
at the same instant as a source that emits on a trio timer (a file, a test's caller) or a
packet that has just arrived must see that frame, and it does: the frame's task runs in the
pass where the deadline was found, the pacer in the next. Woken in the same pass, in trio's
random order, the pacer missed the frame half of the time after a stall longer than its
grace, and sent silence in its slot. None of this costs a thing for a wait ended by `wake()`.
It works with any trio clock (MockClock and autojump in the tests).

- `Waker()`: one per waiting task (it is reused across waits).
- `await waker.wait(deadline)` -> True when woken by `wake()`, False at the deadline (trio
  time, seconds; math.inf waits for `wake()` only). A checkpoint: raises Cancelled like any
  trio wait when the task's scope is cancelled.
- `waker.wake()`: ends a wait in progress (no effect otherwise); never blocks; callable from
  any task of the run (not from other threads).
"""

from __future__ import annotations

import heapq
import itertools
import math

import outcome
import trio

__all__ = ["Waker"]


class Waker:
    """A task's parking place for `wait(deadline)`; see the module doc."""

    __slots__ = ("_task", "_deadline", "_entry")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._deadline = math.inf
        self._entry: list | None = None  # its entry in the timer heap while it waits with a deadline

    @property
    def waiting(self) -> bool:
        return self._task is not None

    async def wait(self, deadline: float) -> bool:
        """Park until `wake()` (True) or trio time `deadline` (False)."""
        if self._task is not None:
            raise RuntimeError("this Waker already has a waiting task")
        if deadline <= trio.current_time():
            await trio.lowlevel.checkpoint()
            return False
        self._task = trio.lowlevel.current_task()
        if deadline < math.inf:
            self._entry = _timers().add(deadline, self)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._clear()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        """End the current wait with True (no-op when nothing waits)."""
        task = self._task
        if task is not None:
            self._clear()
            trio.lowlevel.reschedule(task, outcome.Value(True))

    def _expire(self) -> None:
        task = self._task
        if task is not None:
            self._entry = None  # already off the heap
            self._task = None
            trio.lowlevel.reschedule(task, outcome.Value(False))

    def _clear(self) -> None:
        self._task = None
        entry, self._entry = self._entry, None
        if entry is not None:
            entry[2] = None  # lazily removed: the heap skips it
            _timers().cleared(entry)


class _Timers(trio.abc.Instrument):
    """The run's timer heap of [deadline, seq, waker] entries and the system task serving it,
    woken by the `after_io_wait` hook (an instrument of the run) or its own deadline (module doc)."""

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._parked: trio.lowlevel.Task | None = None  # the server, while it waits in its scope
        self.fallbacks = 0
        """Times the server's own deadline woke it (a cancellation) instead of the hook."""
        self._idle = trio.lowlevel.ParkingLot()

    def add(self, deadline: float, waker: Waker) -> list:
        entry = [deadline, next(self._seq), waker]
        heap = self._heap
        heapq.heappush(heap, entry)
        if heap[0] is entry:  # a new earliest deadline: the server sleeps to it
            if self._scope is not None:
                self._scope.deadline = deadline
            else:
                self._idle.unpark()
        return entry

    def cleared(self, entry: list) -> None:
        """A waiter left before its deadline: when it was the earliest, the server sleeps to
        the next one instead (no wake-up for nobody)."""
        heap = self._heap
        if heap and heap[0] is entry:
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
            if self._scope is not None:
                self._scope.deadline = heap[0][0] if heap else math.inf

    def after_io_wait(self, timeout: float) -> None:
        """trio's hook after each I/O wait: when the earliest deadline is due, wake the server
        without its scope's cancellation (the deadline is lifted first)."""
        heap = self._heap
        task = self._parked
        if task is not None and heap and heap[0][0] <= trio.current_time():
            self._parked = None
            if self._scope is not None:
                self._scope.deadline = math.inf
            trio.lowlevel.reschedule(task)

    def _expire_due(self) -> None:
        heap = self._heap
        now = trio.current_time()
        while heap and heap[0][0] <= now:
            waker = heapq.heappop(heap)[2]
            if waker is not None:
                waker._expire()
        while heap and heap[0][2] is None:
            heapq.heappop(heap)

    async def serve(self) -> None:
        heap = self._heap
        while True:
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
            if not heap:
                await self._idle.park()
                continue
            with trio.CancelScope(deadline=heap[0][0]) as scope:
                self._scope = scope
                self._parked = trio.lowlevel.current_task()

                def abort(_: object) -> trio.lowlevel.Abort:
                    self._parked = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)  # the hook, or the deadline (Cancelled)
            self._scope = None
            if scope.cancelled_caught:
                self.fallbacks += 1
            self._expire_due()


_TIMERS: trio.lowlevel.RunVar[_Timers] = trio.lowlevel.RunVar("gateway_media_timers")


def _timers() -> _Timers:
    try:
        return _TIMERS.get()
    except LookupError:
        timers = _Timers()
        _TIMERS.set(timers)
        trio.lowlevel.add_instrument(timers)
        trio.lowlevel.spawn_system_task(timers.serve, name="gateway media timers")
        return timers
