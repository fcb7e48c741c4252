"""Timed waits for the media path without a cancel scope per wait.

A trio timeout is a cancellation: when `move_on_at(t)` (or `sleep_until(t)`) expires, trio
recalculates the scope's cancel status, raises `Cancelled` into the waiting task and unwinds
it to the scope. That costs more than the rest of a 20 ms frame's bookkeeping: a py-spy
profile of one phone → channel call (bench/README.md, issue 12) had a quarter of the gateway's
busy time in `Deadlines.expire` and its callees, for the playout's and the pacers' per-frame
waits.

Here a task parks (`trio.lowlevel.wait_task_rescheduled`) on a `Waker` until its deadline or
until someone calls `wake()` (a packet arrived, a frame was queued), whichever comes first. The
deadlines of every waiter in the trio run are kept in one heap, served by one system task that
reschedules what is due: one wake-up of that task per distinct deadline instead of a
cancellation per wait, and nothing for a wait ended by `wake()`.

The server parks in a cancel scope whose deadline is the heap's earliest, so that trio's I/O
wait ends in time (and MockClock's autojump stops there). It is woken without a cancellation:
a trio instrument's `after_io_wait` hook, which trio calls after each I/O wait and before it
expires its own deadlines, reschedules the server when the earliest deadline is due and lifts
the scope's deadline. So the server runs in the same batch as the tasks that trio's timers and
I/O woke in that pass, and the waiters it reschedules run in the next one: a waiter due at the
same instant as a trio timer runs after that timer's task (`tests/test_mediaclock.py`). Waking
the waiters from the hook itself would put them in that batch, in random order (bench/README,
the fourteenth measurement). Should trio's clock pass the deadline between the hook and the
expiry, the scope expires as an ordinary trio deadline and the server serves the heap the
same way.

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


class _Timers:
    """The run's timer heap of [deadline, seq, waker] entries and the system task serving it
    (module doc)."""

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None  # the server's, while it is parked in it
        self._task: trio.lowlevel.Task | None = None  # the server, while parked

    def add(self, deadline: float, waker: Waker) -> list:
        entry = [deadline, next(self._seq), waker]
        heap = self._heap
        heapq.heappush(heap, entry)
        if heap[0] is entry and self._scope is not None:  # a new earliest: the I/O wait ends by it
            self._scope.deadline = deadline
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

    def poke(self, now: float) -> None:
        """After an I/O wait (`_Poke`): when the earliest deadline is due by trio time `now`,
        reschedule the parked server at once, and lift its scope's deadline so that trio does
        not also cancel it in this pass."""
        heap, task = self._heap, self._task
        if task is not None and heap and heap[0][0] <= now:
            self._task = None
            assert self._scope is not None
            self._scope.deadline = math.inf
            trio.lowlevel.reschedule(task)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _fire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            waker = heapq.heappop(heap)[2]
            if waker is not None:
                waker._expire()
        while heap and heap[0][2] is None:
            heapq.heappop(heap)

    async def serve(self) -> None:
        heap, me = self._heap, trio.lowlevel.current_task()
        while True:
            with trio.CancelScope() as scope:  # one per expiry: a cancelled scope stays cancelled
                self._scope = scope
                while True:
                    scope.deadline = heap[0][0] if heap else math.inf
                    self._task = me
                    await trio.lowlevel.wait_task_rescheduled(self._abort)  # poke(), or Cancelled
                    self._fire(trio.current_time())
            self._scope = None
            self._fire(trio.current_time())


class _Poke(trio.abc.Instrument):
    """After each of trio's I/O waits, wakes the timer server when its deadline is due (module doc)."""

    def __init__(self, timers: _Timers) -> None:
        self._poke = timers.poke
        self._clock = trio.lowlevel.current_clock()

    def after_io_wait(self, timeout: float) -> None:
        self._poke(self._clock.current_time())


_TIMERS: trio.lowlevel.RunVar[_Timers] = trio.lowlevel.RunVar("gateway_media_timers")


def _timers() -> _Timers:
    try:
        return _TIMERS.get()
    except LookupError:
        timers = _Timers()
        _TIMERS.set(timers)
        trio.lowlevel.spawn_system_task(timers.serve, name="gateway media timers")
        trio.lowlevel.add_instrument(_Poke(timers))
        return timers
