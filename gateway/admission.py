"""Admission: past its capacity the gateway degrades no call, it refuses new ones (issue 12).

Two limits decide whether a new session may start:

- **The media clock** (`MediaClock`, `server.admission_lag_ms`): while media flows, a task
  ticks every 20 ms on absolute deadlines (`trio.sleep_until`, like a route's pacer) and records
  how late each wake-up is. When the event loop has more work than time, every pacer's
  deadlines slip alike; the ticker sees it first-hand. Time the OS kept the gateway's thread
  runnable but not running (another process had the cores: Linux `/proc/thread-self/schedstat`)
  is left out: admission judges the gateway's own load, not a neighbour's spike. The clock is
  *behind* while the 90th percentile of the last second's wake-up lags is over the threshold
  (at least one wake-up in ten later than that: a sustained load, not one garbage collection
  or one slow set-up), and catches up again only once that reading has stayed at or under it
  for `CALM_S` (hysteresis: admission does not flap).
- **A session cap** (`server.max_sessions`, default none): at most that many sessions at
  once, where a session is one WebSocket media connection on `server.media` (or one *seat*:
  see below), one running dial route, or one answered incoming call.
- **A CPU budget** (`server.admission_cpu_percent`, default 0: off): the event loop's thread
  may use at most that share of one core, *projected*: what it used over the last second
  (`MediaClock.busy`, the thread's CPU time from `time.thread_time()` read at each tick) plus,
  for every session started within the last `STARTING_S` (its cost is not in that reading
  yet) and for the one asking, the cost of one session (the reading divided by the sessions
  that were already up, or `SESSION_COST_GUESS` before any was measured). Why, beside the
  media clock: lateness is a saturation signal. The pacers' deadlines slip only once the
  loop has no idle time left, and at that point the calls already admitted lose audio (issue
  12, 30 routes on one core: the clock closed admission with 3 speech frames lost and p99
  97 ms). The CPU share rises in proportion to the calls, so it can stop a ramp *before*
  the loop is full; the projection lets a crowd of dial routes starting at boot (when
  nothing has been measured yet) in by batches of what fits, one reading apart. Until the
  first reading only half the budget (`BLIND_SHARE`) may be filled, like TCP's slow start:
  the cost per session is a guess then, and the machine budget cannot see yet what the
  neighbours (the services the calls talk to among them) add per call. Measured with
  `bench/bench_two_way.py --routes 100 --admission-machine-cpu 60` (two workers and the
  bench's peer on 2 cores): filling the whole budget blind let in 24 calls, after which the
  machine was 88 % busy (the peer's share had grown with them) and 734-2,734 of their
  packets were late; with the slow start 15-16 got in, with no speech frame lost and 20-42
  packets of 7,500-8,000 late (bench/README.md, fifteenth measurement). It is off
  by default because the right share depends on what else the machine runs. Measured with
  `bench/bench_routes.py --routes 300 --admission-cpu N --workers 1` on 2 cores shared with
  the bench's peer: at 60 the 46 admitted calls kept every packet on time (p99 26.5 ms beyond
  the codec's delay) while 254 routes were held; at 80, 66 were admitted and 1,581 of their
  packets were late (p99 60 ms): latency rises well before the loop's core is full, since
  the loop also waits its turn for the cores and serves its wake-ups in bursts.

- **A machine budget** (`server.admission_machine_cpu_percent`, default 0: off): the same
  projection over the whole machine. The reading is the share of all its cores that was busy
  over the last second, for every process: the gateway's workers, and the services beside it
  (`/proc/stat`; `steal`, time the hypervisor gave to others, counts as busy). Each session
  costs the measured per-session cost above, divided by the number of CPUs. Why: the loop
  budget judges one worker's thread. It cannot see the other workers or a neighbour that
  shares the cores. On the bench's 2-core machine, with two workers and the peer, the loop
  budget admitted calls that then waited for a core (bench/README.md, sixth measurement).
  The machine budget is the one for a shared machine. `/proc/stat` is read at most every
  `MACHINE_READ_S`: the kernel renders the whole file for each read.

**When the clock ticks.** Only while something streams: `Admission.streaming` counts the
sessions that are up (an admitted media upgrade while its handler runs, a dial route once
`Route.run` reported started, an answered incoming call once its route is up), each held by
`Admission.stream()`. The ticker starts when that count leaves 0 and stops when it comes back
to 0; stopping forgets the readings (`MediaClock.reset`: not behind, no lag, the next start is
a fresh start-up window), a forced lag excepted. Why: the clock exists to protect calls in
progress, and with none there is nothing whose deadlines could slip; the lateness of an idle
loop is no measure of its capacity for media. And an idle gateway then has no periodic task
at all: a 20 ms ticker running forever kept trio's MockClock from ever auto-jumping (its
`autojump_threshold` waits for the loop to be idle), so tests waiting out a 60 s rate-limit
window in virtual time took minutes of real time. (The alternative, judging the routes'
pacers' own lateness, would need one rule per pacer kind and misses the media connections
whose pacing is their client's; one ticker, gated on the streaming count, is simpler.) A
gateway past its capacity has sessions streaming, so the clock runs exactly when it can tell.
The cost: after an idle spell the first second of ticks is not judged (start-up), so a crowd
arriving at an idle gateway is held back by the session cap and the set-up pacer
(`gateway.server.SetupPacer`), not by the media clock, during that second.

**Seats.** A listen protocol may carry one session over several connections: an Argon bot's
session is its identity in one room, and a second connection with the same grant (a bot that
opens a new socket before it closes the old, a reconnect while the dropped socket has not
timed out yet) replaces the first in the room. Such a connection names its seat
(`MediaServer.add(..., seat=)`, `HttpServer.add(..., seat=)`: for Argon, the room and the
identity of the verified token); while a seat holds a slot, more connections (and StreamToken
calls) of that seat share it and pass admission: they are not a new session, and refusing
them would cut off a call already admitted.

While either limit refuses, new listen sessions get `503` with `Retry-After` (the media
upgrade, and the REST calls that hand out a session: Argon StreamToken, VideoSDK ingest
sessions, the agent token), and dial routes that are not running wait (`held`). Sessions
already admitted are never touched. Each closed spell is logged once when it starts and once
when it ends (with how many were refused meanwhile), never per refusal.

`MediaClock` is pure (every method takes `now`); `Admission` holds the counters and the trio
glue (`run`, `wait_open`, `stream`) around it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
from typing import Hashable, Iterator

import attrs
import trio

from gateway.mediaclock import Waker

log = logging.getLogger("gateway.admission")

TICK_S = 0.020  # seconds between media clock ticks: one 20 ms frame, the pacers' usual ptime
WINDOW_S = 1.0  # seconds of ticks the lag percentile is read over (50 slots)
PERCENTILE = 0.90  # the lag reading: 1 wake-up in 10 over the last second later than this
CALM_S = 3.0  # seconds the reading must stay at or under the threshold before admission reopens
ADMISSION_LAG_MS = 20  # default threshold: one 20 ms frame (and the routes' default jitter_ms): a slot served
# later than that is served when the next one is due already, the media clock is a frame behind
OVERLOAD_RETRY_S = 3  # Retry-After while the media clock is behind (it reopens CALM_S after calm)
CAPACITY_RETRY_S = 1  # Retry-After at the session cap (a slot frees whenever a call ends)
SESSION_COST_GUESS = 0.05  # share of a core one session is assumed to cost until one is measured
# (bench/README.md: 4.7 % per phone -> channel route at 10 routes, one worker)
STARTING_S = 1.5  # seconds a new session counts as starting: its cost is not (fully) in the last second's reading
BLIND_SHARE = 0.5  # share of a CPU budget that may be filled before its reading exists (slow start)
MACHINE_READ_S = 0.1  # seconds between two reads of /proc/stat while the machine budget is on


class MediaClock:
    """How far behind the event loop serves 20 ms slots: pure, driven by `now` (seconds on
    any monotonic clock; trio's in the gateway).

    `tick(now)` is called by a task that slept until `next_deadline`; the wake-up's lag
    (`now - next_deadline`) is recorded, and the slots it missed are skipped, not replayed (one
    stall is one late wake-up: a single pause is not a lack of capacity). `lag` is the 90th
    percentile over the last `window` seconds; nothing is judged before the ticker has run for
    one window (start-up). `behind` turns True when `lag` exceeds `threshold` and False once it
    has stayed at or under it for `calm` seconds. `reset()` when the ticker stops: the next
    `start` is a start-up again."""

    def __init__(self, threshold: float, *, period: float = TICK_S, window: float = WINDOW_S,
                 calm: float = CALM_S, percentile: float = PERCENTILE) -> None:
        if threshold < 0 or period <= 0 or window < period or calm < 0 or not 0 < percentile <= 1:
            raise ValueError("a media clock needs threshold >= 0, period > 0, window >= period, calm >= 0, 0 < percentile <= 1")
        self.threshold = threshold
        """Seconds of lag (the percentile) beyond which the clock is behind; 0: never behind."""
        self.period = period
        self.window = window
        self.calm = calm
        self.percentile = percentile
        self.next_deadline: float | None = None
        """When the ticker should wake next (None: before the first tick)."""
        self.behind = False
        self.behind_since: float | None = None
        """`now` of the tick that found the clock behind (None while it is not)."""
        self.episodes = 0
        """Times the clock fell behind."""
        self.worst = 0.0
        """Highest `lag` reading of the current (or last) episode, seconds."""
        self.forced: float | None = None
        """Set by `force`: the lag the clock reports instead of what it measures."""
        self.ticks = 0
        """Wake-ups recorded since the clock was made (it ticks only while sessions stream)."""
        self._wakes: collections.deque[tuple[float, float]] = collections.deque()  # (now, lag)
        self._cpu: collections.deque[tuple[float, float]] = collections.deque()  # (now, thread CPU seconds)
        self.busy: float | None = None
        """Share of one core the ticking thread used over the last `window` (its CPU seconds
        per second, from the `cpu` the ticks pass; None until half a window is measured)."""
        self._machine: collections.deque[tuple[float, float, float]] = collections.deque()  # (now, busy, total)
        self.machine_busy: float | None = None
        """Share of all the machine's cores busy over the last `window` (from the `machine`
        counters the ticks pass; None until half a window is measured)."""
        self._started: float | None = None
        self._measured = 0.0
        self._calm_since: float | None = None

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 or self.forced is not None

    @property
    def lag(self) -> float:
        """The current reading, seconds: the `percentile` of the wake-up lags of the last `window`."""
        return self.forced if self.forced is not None else self._measured

    def start(self, now: float) -> float:
        """Begin ticking at `now`; returns the first deadline."""
        self._started = now
        self.next_deadline = now + self.period
        return self.next_deadline

    def tick(self, now: float, waited: float = 0.0, cpu: float | None = None,
             machine: tuple[float, float] | None = None) -> float:
        """The ticker woke at `now` for `next_deadline`: record its lag, update `behind`, and
        return the next deadline (the first slot after `now`: missed slots are not replayed).
        `waited`: seconds since the previous tick the OS kept the thread runnable but gave the
        core to another process; that much of the lag is not the gateway's and is left out.
        `cpu`: the thread's CPU time now, seconds (`time.thread_time()`), for `busy`.
        `machine`: the machine's (busy, total) CPU time counters now, any unit (`MachineCpu`),
        for `machine_busy`."""
        if cpu is not None:
            self._measure_cpu(now, cpu)
        if machine is not None:
            self._measure_machine(now, machine)
        deadline = self.next_deadline
        if deadline is None:
            return self.start(now)
        if now >= deadline:
            self.ticks += 1
            self._wakes.append((now, max(0.0, now - deadline - waited)))
            self.next_deadline = deadline = deadline + (int((now - deadline) // self.period) + 1) * self.period
        # else: woke early (a clock that jumped back): nothing due yet
        horizon = now - self.window
        while self._wakes and self._wakes[0][0] < horizon:
            self._wakes.popleft()
        self._measured = self._percentile()
        if self._started is not None and now - self._started >= self.window:  # not during start-up
            self._update(now)
        return deadline

    def _measure_cpu(self, now: float, cpu: float) -> None:
        samples = self._cpu
        samples.append((now, cpu))
        horizon = now - self.window
        while len(samples) > 2 and samples[1][0] <= horizon:  # keep one sample at or before the horizon
            samples.popleft()
        then, used = samples[0]
        if now - then >= self.window / 2:
            self.busy = max(0.0, cpu - used) / (now - then)

    def _measure_machine(self, now: float, machine: tuple[float, float]) -> None:
        samples = self._machine
        samples.append((now, *machine))
        horizon = now - self.window
        while len(samples) > 2 and samples[1][0] <= horizon:
            samples.popleft()
        then, busy, total = samples[0]
        if now - then >= self.window / 2 and machine[1] > total:
            self.machine_busy = min(1.0, max(0.0, machine[0] - busy) / (machine[1] - total))

    def reset(self) -> None:
        """The ticker stopped (nothing streams): forget the readings. Not behind (unless
        forced), no lag, no busy share, no deadline; the next `start` begins with a start-up
        window again. `episodes` and `worst` are kept: they are history."""
        self.next_deadline = None
        self._started = None
        self._wakes.clear()
        self._cpu.clear()
        self.busy = None
        self._machine.clear()
        self.machine_busy = None
        self._measured = 0.0
        self._calm_since = None
        if self.forced is None:
            self.behind, self.behind_since = False, None

    def force(self, lag: float | None, now: float) -> None:
        """Report the clock `lag` seconds behind (behind at once, whatever the threshold) until
        `force(None, now)`, which goes back to measuring and reopens at once. For tests and
        drills: the public way to close admission without loading the machine."""
        self.forced = lag
        if lag is None:  # a measured lag over the threshold puts it behind again at the next tick
            self.behind, self.behind_since, self._calm_since = False, None, None
            return
        if not self.behind:
            self._fall_behind(now)
        self.worst = max(self.worst, lag)

    def _percentile(self) -> float:
        if not self._wakes:
            return 0.0
        lags = sorted(lag for _, lag in self._wakes)
        return lags[min(len(lags) - 1, math.ceil(self.percentile * len(lags)) - 1)]

    def _fall_behind(self, now: float) -> None:
        self.behind, self.behind_since, self._calm_since = True, now, None
        self.episodes += 1
        self.worst = self.lag

    def _update(self, now: float) -> None:
        if self.forced is not None:
            return
        if self.threshold <= 0:
            self.behind = False
            return
        reading = self._measured
        if not self.behind:
            if reading > self.threshold:
                self._fall_behind(now)
            return
        self.worst = max(self.worst, reading)
        if reading > self.threshold:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        if self._calm_since is not None and now - self._calm_since >= self.calm:
            self.behind, self.behind_since, self._calm_since = False, None, None


@attrs.frozen
class Refusal:
    """Why a new session may not start now."""

    reason: str
    """"overload" (the media clock is behind) or "capacity" (`server.max_sessions` reached):
    the `reason` label of `gateway_sessions_refused_total`."""
    detail: str
    """For people: `gateway at capacity (media clock 34 ms behind)`."""
    retry_after: int
    """Seconds a client should wait before it tries again (`Retry-After`)."""


class Admission:
    """The gateway's admission state: one per runtime (`Runtime.admission`).

    `check()` says whether a new session may start; `slot()` holds one for a session's
    lifetime (counted against `max_sessions`; the connections of one seat share one);
    `stream()` marks a session up (the media clock ticks while any is); `wait_open()` waits
    until `check()` passes; `run()` is the media clock's ticker (started by `Gateway.run`)."""

    def __init__(self, lag_threshold: float = ADMISSION_LAG_MS / 1000, max_sessions: int | None = None,
                 cpu_limit: float = 0.0, machine_limit: float = 0.0, *, cpus: int | None = None,
                 workers: int = 1) -> None:
        self.clock = MediaClock(lag_threshold)
        self.max_sessions = max_sessions
        """Sessions at once at most (None: no cap)."""
        self.cpu_limit = cpu_limit
        """Share of one core the loop may use, projected (module doc); 0: no CPU budget."""
        self.machine_limit = machine_limit
        """Share of all the machine's cores that may be busy, projected (module doc); 0: no machine budget."""
        self.cpus = cpus or os.cpu_count() or 1
        """CPUs of the machine: a session's cost (a share of one core) over all of them."""
        self.workers = max(1, workers)
        """Worker processes judging the same machine (`gateway run --workers`): each counts its
        starting sessions that many times over, as the others may be starting as many."""
        self._starts: collections.deque[float] = collections.deque()  # when recent sessions took their slot
        self.sessions = 0
        """Sessions holding a `slot()` now (a seat counts once, however many connections it has)."""
        self.streaming = 0
        """Sessions up now (inside `stream()`): the media clock ticks while this is above 0."""
        self._seats: dict[Hashable, int] = {}  # seat -> connections holding its slot
        self._ticker: trio.CancelScope | None = None  # the ticking spell of `run`, while it ticks
        self.refused: dict[str, int] = {"overload": 0, "load": 0, "capacity": 0}
        """Sessions refused, by `Refusal.reason`."""
        self.held = 0
        """Dial route starts that had to wait (counted once per wait)."""
        self.machine_unreadable = False
        """/proc/stat could not be read (`MachineCpu.missing`): the machine budget is judged
        on the loop's own reading."""
        self._changed = trio.Event()
        self._closed: Refusal | None = None  # the current closed spell, once logged
        self._closed_at = 0.0
        self._refused_in_spell = 0
        self._held_in_spell = 0

    # ----------------------------------------------------------------------------- state
    def refusal(self) -> Refusal | None:
        """Why a new session may not start now, or None (no counting, no logging)."""
        clock = self.clock
        if clock.behind:
            return Refusal("overload", f"gateway at capacity (media clock {clock.lag * 1000:.0f} ms behind)",
                           OVERLOAD_RETRY_S)
        if self.max_sessions is not None and self.sessions >= self.max_sessions:
            return Refusal("capacity", f"gateway at capacity ({self.sessions} of server.max_sessions "
                                       f"{self.max_sessions} sessions)", CAPACITY_RETRY_S)
        if self.cpu_limit > 0:
            busy, starting, projected = self.projected_load()
            limit, blind = self._limit(self.cpu_limit, clock.busy, starting)
            if projected > limit + 1e-9:  # 12 x 5 % is 60 %, not a hair over it
                return Refusal("load", f"gateway at capacity (loop {busy * 100:.0f} % of a core, {starting} session(s) "
                                       f"starting, {projected * 100:.0f} % projected with one more; "
                                       f"server.admission_cpu_percent {self.cpu_limit * 100:.0f}{blind})",
                               OVERLOAD_RETRY_S)
        if self.machine_limit > 0:
            machine, starting, projected = self.projected_machine_load()
            reading = clock.busy if self.machine_unreadable else clock.machine_busy
            limit, blind = self._limit(self.machine_limit, reading, starting)
            if projected > limit + 1e-9:
                return Refusal("load", f"machine at capacity ({self.cpus} CPU(s) {machine * 100:.0f} % busy, {starting} "
                                       f"session(s) starting, {projected * 100:.0f} % projected with one more; "
                                       f"server.admission_machine_cpu_percent {self.machine_limit * 100:.0f}{blind})",
                               OVERLOAD_RETRY_S)
        return None

    def _limit(self, budget: float, reading: float | None, starting: int) -> tuple[float, str]:
        """(the share a projection may reach now, what the refusal adds about it). Before the
        budget's `reading` exists (None: nothing has streamed for half a second), only
        `BLIND_SHARE` of it: the session cost is a guess and the neighbours' load unseen (slow
        start). With no session starting, the next one always fits: a budget below one guess
        still admits one at a time, and only streaming sessions produce the reading."""
        if reading is not None:
            return budget, ""
        if not starting:
            return math.inf, ""
        return budget * BLIND_SHARE, f", {BLIND_SHARE * 100:.0f} % of it until it is measured"

    def projected_machine_load(self, now: float | None = None) -> tuple[float, int, float]:
        """(busy, starting, projected) over the whole machine: the share of all its cores busy
        over the last second (0 before it is measured), the sessions starting, and the share
        projected with those and one more, each at this loop's measured cost per session (as
        in `projected_load`) spread over `cpus`, and counted once per worker: the workers read
        the same machine and decide at the same time, and each must leave room for the
        others' starts."""
        loop, starting, loop_projected = self.projected_load(now)
        machine = self.clock.machine_busy or 0.0
        return machine, starting, machine + (loop_projected - loop) * self.workers / self.cpus

    def projected_load(self, now: float | None = None) -> tuple[float, int, float]:
        """(busy, starting, projected): the loop's share of a core over the last second (0
        before it is measured), the sessions started within `STARTING_S`, and the share
        projected with those and one more session at the measured cost per session (the
        reading over the sessions that held their slot before them; `SESSION_COST_GUESS` when
        none did)."""
        if now is None:
            try:
                now = trio.current_time()
            except RuntimeError:  # read outside the gateway's trio thread: count every recorded start
                now = -math.inf
        starts = self._starts
        while starts and starts[0] < now - STARTING_S:
            starts.popleft()
        starting = min(len(starts), self.sessions)  # a session that ended while starting costs nothing
        measured = self.clock.busy
        busy = measured or 0.0
        settled = self.sessions - starting  # slots held for longer than STARTING_S: their cost is read
        cost = busy / settled if measured is not None and settled > 0 else SESSION_COST_GUESS
        return busy, starting, busy + cost * (starting + 1)

    @property
    def open(self) -> bool:
        return self.refusal() is None

    def check(self, what: str = "session") -> Refusal | None:
        """`refusal()`, counted and logged (once per closed spell) when it refuses `what`."""
        refusal = self.refusal()
        if refusal is not None:
            self.refused[refusal.reason] += 1
            self._enter_spell(refusal, what)
            self._refused_in_spell += 1
        return refusal

    @contextlib.contextmanager
    def slot(self, seat: Hashable | None = None) -> Iterator[None]:
        """Hold one session slot for the duration of the block. With a `seat` (a key naming
        the session a connection belongs to: an Argon room and identity), the blocks of one
        seat share a single slot, held until the last of them ends."""
        key: Hashable = seat if seat is not None else object()
        held = self._seats.get(key, 0)
        self._seats[key] = held + 1
        if not held:
            self.sessions += 1
            if self.budgeted:
                self._starts.append(trio.current_time())  # its cost is not in the reading yet
        try:
            yield
        finally:
            left = self._seats[key] - 1
            if left:
                self._seats[key] = left
            else:
                del self._seats[key]
                self.sessions -= 1
                self._notify()

    def seated(self, seat: Hashable | None) -> bool:
        """`seat` holds a slot already: another connection of it is no new session."""
        return seat is not None and seat in self._seats

    def try_slot(self, what: str = "session", seat: Hashable | None = None) -> Refusal | contextlib.AbstractContextManager[None]:
        """A `slot(seat)` when the seat holds one already or `check(what)` passes (taken at
        once, entered before the next checkpoint: nothing can slip in between), else the
        refusal."""
        refusal = None if self.seated(seat) else self.check(what)
        return refusal if refusal is not None else self.slot(seat)

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """A session is up for the duration of the block: media flows, so the media clock
        ticks (`run`) while at least one such block is open. When the last one closes, the
        ticker stops and the clock forgets its readings (`MediaClock.reset`)."""
        self.streaming += 1
        if self.streaming == 1:
            self._notify()  # wakes the ticker
        try:
            yield
        finally:
            self.streaming -= 1
            if self.streaming == 0:
                self._stop_ticking()

    @property
    def ticking(self) -> bool:
        """Whether the media clock should tick now: a threshold or a CPU budget is set and
        something streams."""
        return (self.clock.threshold > 0 or self.budgeted) and self.streaming > 0

    @property
    def budgeted(self) -> bool:
        """A CPU budget is set (the loop's or the machine's): sessions' costs are measured."""
        return self.cpu_limit > 0 or self.machine_limit > 0

    def _stop_ticking(self) -> None:
        """Stop the ticker (at its next checkpoint) and reset the clock: not behind any more."""
        if self._ticker is not None:
            self._ticker.cancel()
        was = self.clock.behind
        self.clock.reset()
        if self.clock.behind != was:
            self._notify()

    def configure(self, lag_threshold: float, max_sessions: int | None, cpu_limit: float = 0.0,
                  machine_limit: float = 0.0) -> None:
        """New limits (a reload): the sessions in progress keep their slots, the clock its
        readings; a lower cap refuses only new sessions."""
        self.clock.threshold = lag_threshold
        self.cpu_limit = cpu_limit
        self.machine_limit = machine_limit
        if not self.ticking:
            self._stop_ticking()
        self.max_sessions = max_sessions
        self._notify()

    def force_behind(self, lag: float | None) -> None:
        """Hold the media clock `lag` seconds behind (None: measure again): `MediaClock.force`."""
        self.clock.force(lag, trio.current_time())
        refusal = self.refusal()
        if refusal is not None:
            self._enter_spell(refusal)
        self._notify()

    # ------------------------------------------------------------------------------ waiting
    async def wait_open(self, on_hold=None) -> None:
        """Return once a new session may start. When it may not at first, `on_hold(refusal)`
        is called (again whenever the reason's text changes) and the wait is counted."""
        refusal = self.refusal()
        if refusal is None:
            return
        self.held += 1
        self._enter_spell(refusal, "dial route start")
        self._held_in_spell += 1
        shown = None
        while refusal is not None:
            if on_hold is not None and refusal.detail != shown:
                on_hold(refusal)
                shown = refusal.detail
            changed = self._changed
            with trio.move_on_after(1.0):  # the lag in the text moves: refresh it now and then
                await changed.wait()
            refusal = self.refusal()

    def _notify(self) -> None:
        """Something that decides admission changed: wake the waiters, close the log spell."""
        self._changed.set()
        self._changed = trio.Event()
        if self._closed is not None and self.refusal() is None:
            took = trio.current_time() - self._closed_at
            log.info("admission open again after %.1f s: %d session(s) refused, %d dial route start(s) held meanwhile",
                     took, self._refused_in_spell, self._held_in_spell)
            self._closed = None

    def _enter_spell(self, refusal: Refusal, what: str | None = None) -> None:
        if self._closed is not None and self._closed.reason == refusal.reason:
            return
        self._closed, self._closed_at = refusal, trio.current_time()
        self._refused_in_spell = self._held_in_spell = 0
        first = f" (first refused: a {what})" if what else ""
        if refusal.reason == "overload":
            log.warning("admission closed: %s, over server.admission_lag_ms %g (90th percentile of the last "
                        "second's 20 ms ticks): new sessions get 503, dial routes wait; running calls are "
                        "untouched%s", refusal.detail, self.clock.threshold * 1000, first)
        else:
            log.warning("admission closed: %s: new sessions get 503, dial routes wait; running calls are "
                        "untouched%s", refusal.detail, first)

    # ------------------------------------------------------------------------------- ticker
    async def run(self) -> None:
        """For as long as the gateway runs: tick the media clock every 20 ms on absolute
        deadlines while `ticking` (sessions stream and `server.admission_lag_ms` is not 0; a
        reload may change it), else wait without any timer until it is."""
        clock = self.clock
        while True:
            while not self.ticking:
                await self._changed.wait()
            waits = _RunQueueWait()
            machine = MachineCpu()
            try:
                with trio.CancelScope() as self._ticker:  # cancelled by _stop_ticking
                    deadline = clock.start(trio.current_time())
                    waits.read()
                    timer = Waker()  # gateway.mediaclock: a tick without a cancellation
                    cpu_time = time.thread_time
                    next_machine_read = -math.inf
                    while True:
                        await timer.wait(deadline)
                        if not self.ticking:  # stopped while this wake-up was already due
                            break
                        was = clock.behind
                        now = trio.current_time()
                        counters = None
                        if self.machine_limit > 0 and now >= next_machine_read:
                            counters, next_machine_read = machine.read(), now + MACHINE_READ_S
                            self.machine_unreadable = machine.missing
                        deadline = clock.tick(now, waits.read(), cpu_time() if self.budgeted else None, counters)
                        if clock.behind != was:
                            refusal = self.refusal()
                            if clock.behind and refusal is not None:  # logged now, not at the first refusal
                                self._enter_spell(refusal)
                            self._notify()
                        elif self._closed is not None and self._closed.reason == "load" and self.refusal() is None:
                            self._notify()  # the budget has room again: wake the held routes, log the spell's end
            finally:
                self._ticker = None
                waits.close()
                machine.close()


class MachineCpu:
    """The machine's CPU time counters (Linux `/proc/stat`, its first line, in clock ticks):
    `read()` -> (busy, total), or None where the file does not exist or cannot be parsed.
    Busy is everything but `idle` and `iowait` (so `steal` counts: a hypervisor's share is not
    ours to use). Opened at the first read, then read with pread."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self._path = path
        self._fd: int | None = None
        self.missing = False
        """The file could not be opened (not Linux, no /proc): every read is None."""

    def read(self) -> tuple[float, float] | None:
        if self._fd is None:
            if self.missing:
                return None
            try:
                self._fd = os.open(self._path, os.O_RDONLY)
            except OSError:
                self.missing = True
                log.warning("server.admission_machine_cpu_percent: cannot read %s: the machine budget counts "
                            "only the gateway's own sessions", self._path)
                return None
        try:
            fields = os.pread(self._fd, 512, 0).split(b"\n", 1)[0].split()
            if fields[0] != b"cpu":
                return None
            ticks = [int(f) for f in fields[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError, IndexError):
            return None
        total = sum(ticks)
        return float(total - ticks[3] - ticks[4]), float(total)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _RunQueueWait:
    """Seconds this thread spent runnable but waiting for a core since the last `read()`
    (Linux `/proc/thread-self/schedstat`, field 2, in ns; 0 where it does not exist). Opened
    once and read with pread: ~1 µs a tick."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._last: int | None = None

    def read(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            total = int(os.pread(self._fd, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return 0.0
        last, self._last = self._last, total
        return 0.0 if last is None else max(0, total - last) / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
