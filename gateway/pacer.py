"""The route's pacer as pure objects: one `SourcePlayout` per source of a sink, one `SinkClock`
per sink (or lane). No trio, no sockets, no clock reads: the driver (`Route._pace`) hands in
each frame with the time it arrived and follows the clock's steps; tests drive them with
made-up times (`simulate`).

Playout rules, per sink (DESIGN.md, "Route"). Speech is never cut to win back latency:
- Audio that arrives before the sink's pacer runs (the sink still coming up, e.g. an Argon
  side waiting for `ready`) waits in the sink's queue, bounded by duration (STARTUP_BUFFER_MS,
  whatever the frame size; beyond it the newest frames are dropped and counted `dropped`).
- The clock anchors when the first whole packet of audio is buffered, so the first packet goes
  out at once and the gateway adds no waiting of its own. A start-up backlog plays from its
  first sample; what a live source has buffered beyond one packet (or one of its frames) is
  excess latency from then on.
- At each deadline a source that is short waits up to `jitter_ms` for its audio; then its slot
  is filled with silence (counted `late`). The late audio plays when it arrives, a slot later
  than planned (excess latency, won back like any other).
- A source that plays out on its own clock (`Endpoint.clocked`: VoIPBIN rtp, whose jitter
  buffer already absorbed the network's jitter) and is a sink's only source sets that sink's
  clock: each packet goes out as soon as it is whole (up to `jitter_ms` after the deadline)
  and the next deadline follows it, so there is one clock per path, not two (no added wait,
  one wake-up per packet). A source frame longer than the sink's ptime (20 ms frames into a
  10 ms sink) goes out whole as it arrives: every packet cut from it at once, none waits for
  a deadline when its samples are there; the deadlines keep the frames' pace. A backlog it
  hands over at once (several frames) still waits for its deadline, and a packet whole within
  half a ptime of the last from a later frame waits until half a ptime after it (the clock
  then follows it: a late packet does not leave the clock late): never a burst of frames.
- A source short for `IDLE_AFTER` packets in a row is idle: no more waiting for it; silence
  flows. When every source was idle, the clock re-anchors on the next audio, and what has
  queued by then (a stalled source's backlog, sent at once) is excess.
- A stalled loop (more than two ptimes behind) re-anchors rather than bursting; what queued
  meanwhile is excess (up to `max_delay_ms`: an overloaded gateway gets no allowance). A stall
  that hits while the clock waits for a deadline counts the same: it re-anchors and takes in
  what queued before it fills a slot (audio that was there is not replaced by silence), and a
  short source gets its allowance again from the new anchor.
  In the window after a stall, a packet of excess held as a phase (each packet arrives just
  after the one before it went, then waits for its deadline: a source that stalled with the
  sink) is won back at once: after STEP_AFTER packets in a row each waited half a ptime or
  more, the clock moves earlier by their least wait, at most half a ptime.
- Latency control, per live source. Excess is also measured every `ADJUST_EVERY` packets: the
  least audio left buffered after a pop over the window (audio that waited through all of it).
  Excess is won back only in pauses: a packet is skipped (counted `skipped`) when it is a pause
  (`_Pauses`: its level is close to the background or far below the recent speech, or below
  PAUSE_FLOOR_DBFS), at least MIN_PAUSE_MS of that pause has been played, the packet after it is
  buffered and a pause too (so the packet before speech always plays), and a whole packet of
  excess is left. A packet of speech is never skipped for latency. What is left, less than a
  packet, goes when every packet of a window waited for its deadline: the clock moves earlier
  by the least wait. So the latency the gateway adds returns to "processing only" after a start-
  up backlog, a stall or late audio pushed it up, at the speed the pauses allow.
- Audio buffered beyond `max_delay_ms` is dropped oldest first (bounded latency, bounded
  memory). For a live source that bound is raised by its start-up allowance: all of
  STARTUP_BUFFER_MS while the source is idle (it starts idle) and through the first window
  after it is back, then at each window's end no more than what is still buffered, and none once
  no excess is left: the allowance shrinks as the backlog is worked off, and a backlog is never
  cut by `max_delay_ms`. Bursty sources (`Endpoint.bursty`) are queued up to their own
  `burst_buffer_ms` and played at real time, never latency-controlled.
- When a source ends, what it buffered is played out (the last packet padded), then the clock
  ends (`SinkClock.steps` returns).
- Barge-in (`SinkClock.clear(slot)`): what one source has buffered is dropped at once (not
  counted `dropped`: it was asked for); the clock goes on with the others and with what that
  source sends next.
- Marks (`PlayoutMark`, accepted in a source's place in the stream like a frame): a mark is due
  once every sample the source sent before it has left its playout (played, or dropped, skipped
  or cleared); `SinkClock.due` collects the due marks, in order, for the driver to report once
  it has sent the packet that held the last of those samples.

The driver's contract (`SinkClock.steps`, a generator):
- `Wait(until, done)`: take in arriving frames (`SinkClock.accept(slot, frame, now)`) until
  `done()` is true (checked before waiting, and after each frame) or the time is `until` (a
  frame that arrives at `until` or later is the next step's), then send the time.
- `DRAIN`: take in every frame already queued, without waiting, then send the time.
- `Send(frame)`: encode and send the mixed packet (or drop it: a muted sink), then send the time.
The generator returns when every source ended and was played out.
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Generator, Protocol, Sequence

import attrs
import numpy as np

from gateway.codecs import Reframer
from gateway.codecs.formats import AudioFormat, AudioFrame

STARTUP_BUFFER_MS = 5000  # audio kept for a sink before its pacer runs, or when an idle source returns
MIN_PAUSE_MS = 80  # of every pause at least this much is played before any of it is skipped
PAUSE_FLOOR_DBFS = -55.0  # the background is taken to be at least this loud (digital silence, hiss)
PAUSE_ABOVE_NOISE_DB = 6.0  # a packet within this of the background level is a pause...
PAUSE_BELOW_SPEECH_DB = 18.0  # ...and so is one this far below the recent speech level
NOISE_RISE_DB_PER_S = 0.5  # how fast the background estimate creeps up (through speech)...
NOISE_SEEK_DB_PER_S = 5.0  # ...and rises once no packet came near it for NOISE_SEEK_AFTER_S
NOISE_SEEK_AFTER_S = 1.5  # (a louder background, or a noisy line at the start)
NOISE_NEAR_DB = 3.0  # a packet within this of the background estimate confirms it
PRIME_MS = 500  # a start-up backlog at least this long gives the first background estimate
SPEECH_FALL_DB_PER_S = 0.5  # how fast the speech level estimate decays between words
SPEECH_START_DBFS = -20.0  # speech level assumed before any speech was heard (a 20 ms peak)
IDLE_AFTER = 5  # consecutive short packets after which a source counts as idle
ADJUST_EVERY = 50  # packets per latency-control window (1 s at 20 ms)
STEP_AFTER = 5  # after a stall: packets in a row, each whole half a ptime or more before its deadline, move the clock
_NEVER = 1 << 62
_NEVER_S = float("inf")
_CARRIED = object()  # the next packet was already whole at the last pop


class Source(Protocol):
    """What a playout reads of its source endpoint (`gateway.endpoint.Endpoint`)."""

    bursty: bool
    burst_buffer_ms: int


class Histogram(Protocol):
    def observe(self, value: float) -> None: ...


class Stats(Protocol):
    """The sink's counters the pacer keeps (`gateway.endpoint.EndpointStats`)."""

    late: int
    dropped: int
    skipped: int
    level_dbfs: float
    buffered_ms: int

    @property
    def latency(self) -> Histogram: ...


@attrs.frozen
class Wait:
    """Take in frames until `done()` or trio time `until` (seconds)."""

    until: float
    done: Callable[[], bool]


@attrs.frozen
class Send:
    """Send `frame` (the mixed packet, PCM at the clock's format, one ptime) to the sink."""

    frame: AudioFrame


DRAIN = "drain"
"""Take in every frame already queued, without waiting."""

Step = Wait | Send | str


@attrs.define(eq=False)
class PlayoutMark:
    """A point in one source's stream (the module doc, "Marks"): `token` is the driver's (the
    route's pending mark), passed back untouched in `SinkClock.due`. No samples: a queue that
    bounds its frames by duration counts it as nothing."""

    token: object
    samples = 0
    rate = 1


def _never() -> bool:
    return False


def _dbfs(pcm: np.ndarray) -> float:
    """RMS level of int16 PCM in dBFS (full-scale sine: -3 dB; digital silence: -120)."""
    x = pcm.astype(np.float32).ravel()
    mean_square = float(np.dot(x, x)) / max(1, x.size)
    return max(-120.0, 10 * math.log10(mean_square / (32768.0 * 32768.0))) if mean_square > 0 else -120.0


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum two int16 (samples, channels) blocks with saturation."""
    mixed: np.ndarray = np.clip(a.astype(np.int32) + b, -32768, 32767).astype(np.int16)
    return mixed


class _Pauses:
    """Tells a pause (silence, breath, low background) from speech by a packet's level, for one
    live source of one pacer. It keeps two estimates, updated with each packet it is shown:

    - `noise`, the background: down at once to a quieter packet, never below PAUSE_FLOOR_DBFS
      (so digital silence does not make hiss look like speech); up by NOISE_RISE_DB_PER_S, or
      by NOISE_SEEK_DB_PER_S once no packet came within NOISE_NEAR_DB of it for
      NOISE_SEEK_AFTER_S (the background got louder: speech alone keeps dipping to it);
    - `speech`, the recent speech level: up at once to a louder packet, down by
      SPEECH_FALL_DB_PER_S.

    A packet is a pause when its level (RMS dBFS of the packet, `_dbfs`) is below
    max(PAUSE_FLOOR_DBFS, min(noise + PAUSE_ABOVE_NOISE_DB, speech - PAUSE_BELOW_SPEECH_DB)):
    close to the background and, on a noisy line, well below the speech; always when quieter
    than the floor. Per packet: a few float operations (the level is one float32 dot product).
    """

    __slots__ = ("noise", "speech", "_unseen", "_rise", "_seek", "_seek_after", "_fall")

    def __init__(self, ptime_ms: float) -> None:
        self.noise = PAUSE_FLOOR_DBFS
        self.speech = SPEECH_START_DBFS
        self._unseen = 0  # packets since one came near the background estimate
        self._rise = NOISE_RISE_DB_PER_S * ptime_ms / 1000
        self._seek = NOISE_SEEK_DB_PER_S * ptime_ms / 1000
        self._seek_after = NOISE_SEEK_AFTER_S * 1000 / ptime_ms
        self._fall = SPEECH_FALL_DB_PER_S * ptime_ms / 1000

    def threshold(self) -> float:
        """The level (dBFS) below which a packet is a pause, as the estimates stand."""
        return max(PAUSE_FLOOR_DBFS, min(self.noise + PAUSE_ABOVE_NOISE_DB, self.speech - PAUSE_BELOW_SPEECH_DB))

    def prime(self, backlog: np.ndarray, n: int) -> None:
        """Before its first packet: start the background estimate at the quietest packet (of
        `n` samples) of a start-up backlog of int16 PCM (the pacer passes one of PRIME_MS or
        more: long enough to hold a gap between words), so its pauses are found at once, on a
        noisy line too. One vectorized pass, once."""
        packets = len(backlog) // n
        if packets == 0:
            return
        x = backlog[: packets * n].astype(np.float32).reshape(packets, -1)
        mean_square = np.einsum("ij,ij->i", x, x) / x.shape[1] / (32768.0 * 32768.0)
        levels = 10 * np.log10(mean_square[mean_square > 0])
        levels = levels[levels > PAUSE_FLOOR_DBFS]
        if levels.size:
            self.noise = float(levels.min())

    def observe(self, level: float) -> bool:
        """Take the level of the source's next packet into the estimates; True: a pause.
        (`threshold` inlined: this runs for every packet of every live source.)"""
        noise = self.noise
        self._unseen = unseen = 0 if level < noise + NOISE_NEAR_DB else self._unseen + 1
        noise += self._seek if unseen > self._seek_after else self._rise
        self.noise = noise = max(PAUSE_FLOOR_DBFS, min(level, noise))
        self.speech = speech = level if level > self.speech else self.speech - self._fall
        return level < max(PAUSE_FLOOR_DBFS, min(noise + PAUSE_ABOVE_NOISE_DB, speech - PAUSE_BELOW_SPEECH_DB))


class SourcePlayout:
    """One source's playout buffer in one sink's pacer: PCM at the clock's format, popped one
    packet (`n` samples) at a time, with the source's latency control (see the module doc).

    Counters go to the sink's `stats` (late, dropped, skipped, latency in seconds)."""

    def __init__(self, source: Source, fmt: AudioFormat, ptime_ms: int, max_delay_ms: int, stats: Stats,
                 due: list[PlayoutMark] | None = None) -> None:
        self.source = source
        self.marks: collections.deque[tuple[int, PlayoutMark]] = collections.deque()
        """Marks waiting: (the `consumed` count at which each is due, the mark)."""
        self.due: list[PlayoutMark] = [] if due is None else due
        """Where marks go once due (the clock's `due`)."""
        self.n = n = fmt.samples(ptime_ms)
        self.fmt = fmt
        self.buffer = Reframer(fmt, ptime_ms)
        self.stats = stats
        self._max_buffer = max(fmt.samples(max_delay_ms), 2 * n)
        self.live = not source.bursty
        """Latency-controlled (a live source); bursty sources (an agent's text-to-speech) queue:
        played at real time without drops, up to their own bound."""
        self.limit = self._limit()
        self.startup = fmt.samples(STARTUP_BUFFER_MS)
        self.extra = self.startup
        """The start-up allowance beyond `limit` (module doc: max_delay_ms)."""
        self.short_run = IDLE_AFTER
        """Consecutive short packets (it starts idle)."""
        self.ended = False
        self.largest = 0
        """The largest frame the source has sent (samples)."""
        self.excess = 0
        """Samples buffered beyond what playout needs, won back in pauses."""
        self.pauses = _Pauses(ptime_ms)
        self.paused = 0
        """How much of the current pause was played (samples)."""
        self._ahead = (-1, 0.0)  # (consumed count when it is next, its level): a peeked packet
        self._min_pause = fmt.samples(MIN_PAUSE_MS)
        self.floor = _NEVER
        """The least audio left after a pop this window (audio that waited through it)."""
        self.peak = 0
        """The most audio left after a pop this window."""
        self.complete_at: float | object | None = None
        """When the next packet became whole (None: not yet; _CARRIED: at the last pop)."""
        # Added latency (stats.latency): when each pushed frame arrived, keyed by the running
        # count of samples pushed; `consumed` counts samples popped or dropped, so the arrival
        # of a popped packet's last sample is the first entry at or past it.
        self.arrivals: collections.deque[tuple[int, float]] = collections.deque()
        self.pushed = 0
        self.consumed = 0

    def _limit(self) -> int:
        if self.live:
            return self._max_buffer
        return max(self.fmt.samples(self.source.burst_buffer_ms), 2 * self.n)

    @property
    def whole(self) -> bool:
        """A whole packet is buffered."""
        return self.buffer.buffered >= self.n

    @property
    def ready(self) -> bool:
        """Its next packet can be taken (whole, or the source ended: padded)."""
        return self.buffer.buffered >= self.n or self.ended

    @property
    def active(self) -> bool:
        """Not idle: the clock waits (up to `jitter_ms`) for its audio."""
        return self.short_run < IDLE_AFTER

    @property
    def drained(self) -> bool:
        """Ended and played out."""
        return self.ended and self.buffer.buffered == 0

    def push(self, frame: AudioFrame | PlayoutMark | None, now: float) -> None:
        """Queue `frame` (None: the source ended; a `PlayoutMark`: a mark after what it sent), which arrived at `now` (seconds); audio
        beyond the bound is dropped oldest first (counted in whole packets, `dropped`)."""
        if frame is None:
            self.ended = True
            return
        if isinstance(frame, PlayoutMark):
            self.marks.append((self.consumed + self.buffer.buffered, frame))
            if not self.buffer.buffered:
                self._settle_marks()
            return
        if self.source.bursty == self.live:  # the source found out it is bursty (or not)
            self.live = not self.source.bursty
            self.limit = self._limit()
        buf = self.buffer
        buf.push(frame)
        if self.live:  # bursty sources are queued by design: their latency is not observed
            self.pushed += frame.samples
            self.arrivals.append((self.pushed, now))
        if frame.samples > self.largest:
            self.largest = frame.samples
        if self.complete_at is None and buf.buffered >= self.n:
            self.complete_at = now
        bound = self.limit + self.extra if self.live else self.limit
        if buf.buffered > bound:
            dropped = buf.drop(buf.buffered - bound)
            self.consumed += dropped
            self.stats.dropped += math.ceil(dropped / self.n)

    def clear(self) -> int:
        """Barge-in: drop everything buffered (samples dropped); the marks in it are due."""
        dropped = self.buffer.drop(self.buffer.buffered)
        self.consumed += dropped
        self.arrivals.clear()
        self.excess = 0
        self.complete_at = None
        self._ahead = (-1, 0.0)
        self._settle_marks()
        return dropped

    def _settle_marks(self) -> None:
        marks, consumed = self.marks, self.consumed
        while marks and marks[0][0] <= consumed:
            self.due.append(marks.popleft()[1])

    def rebase(self) -> None:
        """At a (re-)anchor: what a live source has buffered beyond one packet (or one of its
        frames) is excess from now on; the latency-control window starts over."""
        self.excess = max(0, self.buffer.buffered - max(self.n, self.largest)) if self.live else 0
        self.floor = _NEVER
        self.peak = 0

    def prime(self) -> None:
        """At the first anchor: a start-up backlog of PRIME_MS or more seeds the pause
        detector's background estimate."""
        buf = self.buffer
        if self.live and buf.buffered >= self.fmt.samples(PRIME_MS):
            backlog = buf.peek(buf.buffered)
            assert backlog is not None  # all of it is there
            self.pauses.prime(backlog, self.n)

    def next_in_same_frame(self) -> bool:
        """The next packet's samples all came in the source frame that held the last sample
        popped (a frame longer than the ptime): it was whole as soon as the last packet was."""
        arrivals = self.arrivals
        return bool(arrivals) and self.consumed > 0 and arrivals[0][0] >= self.consumed + self.n

    def take(self, now: float, deadline: float) -> tuple[AudioFrame | None, float | None, float | None]:
        """Pop the packet for the slot at `deadline`, at time `now`: (the packet or None if the
        source is short, its level in dBFS for a live source's packet, how long it was whole
        before the deadline (s), or None when it was whole before the last pop)."""
        buf, n, stats = self.buffer, self.n, self.stats
        frame = buf.pop()
        if frame is None and self.ended and buf.buffered:
            frame = buf.flush()[0]
        if frame is None:
            self.floor = 0
            self.complete_at = None
            if self.short_run < IDLE_AFTER and not self.ended and self.live:
                stats.late += 1  # late: silence in this slot; the audio plays when it comes
            self.short_run = min(self.short_run + 1, IDLE_AFTER)
            if self.short_run >= IDLE_AFTER:
                self.extra = self.startup  # idle: what it sends when it returns is kept too
            if self.marks:
                self._settle_marks()  # what was dropped before a mark is gone too
            return None, None, None
        self.short_run = 0
        done_at = self.complete_at
        level: float | None = None
        if self.live:
            ahead = self._ahead
            level = ahead[1] if ahead[0] == self.consumed else _dbfs(frame.pcm)
            pauses = self.pauses
            pause = pauses.observe(level)
            # Excess latency is won back in pauses only: this packet is skipped when it is a
            # pause, MIN_PAUSE_MS of the pause was played, and the packet after it is buffered
            # and a pause too (so the last packet of a pause, before speech, always plays),
            # while there is a packet of excess.
            while pause and self.excess >= n and self.paused >= self._min_pause:
                after = buf.peek(n)
                if after is None:
                    break
                after_level = _dbfs(after)
                if after_level >= pauses.threshold():
                    self._ahead = (self.consumed + frame.samples, after_level)
                    break
                self.consumed += frame.samples
                self.excess -= frame.samples
                stats.skipped += 1
                frame = buf.pop()
                assert frame is not None  # peek(n) found a whole packet
                level = after_level
                pause = pauses.observe(level)
                done_at = _CARRIED
            self.paused = self.paused + frame.samples if pause else 0
        self.consumed += frame.samples
        if self.live:
            pending = self.arrivals
            while len(pending) > 1 and pending[0][0] < self.consumed:
                pending.popleft()
            if pending:
                stats.latency.observe(max(0.0, now - pending[0][1]))
        waited = deadline - done_at if done_at is not None and done_at is not _CARRIED else None  # type: ignore[operator]
        # a packet already whole after this pop is excess, measured by `floor`
        self.complete_at = _CARRIED if buf.buffered >= n else None
        if buf.buffered < self.floor:
            self.floor = buf.buffered
        if buf.buffered > self.peak:
            self.peak = buf.buffered
        if self.marks:
            self._settle_marks()
        return frame, level, waited

    def end_window(self) -> None:
        """Every ADJUST_EVERY packets: the window's floor is the excess; the start-up allowance
        covers the backlog still there, none once no audio waited through a whole window."""
        if self.live and not self.ended and self.short_run < IDLE_AFTER:
            self.excess = self.floor if self.floor < _NEVER else 0
            self.extra = min(self.extra, self.peak) if self.excess else 0
        self.floor = _NEVER
        self.peak = 0


class SinkClock:
    """One sink's media clock over its sources' playouts: deadlines `anchor + k·ptime`, mixing
    (mix-minus: the sink is never among its sources) and the rules of the module doc.

    fmt: the PCM format it mixes at (`Route.pacing_format`); ptime_ms: the sink's; jitter_ms:
    how long a deadline waits for a short source; clocked: the sink's only source plays out on
    its own clock (`Endpoint.clocked`), which then sets this one's."""

    def __init__(self, sources: Sequence[Source], fmt: AudioFormat, ptime_ms: int, *, stats: Stats,
                 jitter_ms: int = 20, max_delay_ms: int = 200, clocked: bool = False) -> None:
        self.fmt = fmt
        self.n = fmt.samples(ptime_ms)
        self.ptime = ptime_ms / 1000
        self.grace = jitter_ms / 1000
        self.stats = stats
        self.due: list[PlayoutMark] = []
        """Marks due (module doc, "Marks"), in order: the driver reports them once the packet
        taken with them is sent, and empties the list."""
        self.playouts = [SourcePlayout(s, fmt, ptime_ms, max_delay_ms, stats, self.due) for s in sources]
        self.clocked = clocked and len(self.playouts) == 1 and self.playouts[0].live
        self.accepted = 0
        """Frames taken in so far (end markers included)."""

    def accept(self, slot: int, frame: AudioFrame | PlayoutMark | None, now: float) -> None:
        """Take in source `slot`'s frame (None: that source ended; a `PlayoutMark`: a point in
        its stream), arrived at `now` (s)."""
        self.accepted += 1
        self.playouts[slot].push(frame, now)

    def clear(self, slot: int) -> int:
        """Barge-in: drop what source `slot` has buffered (samples dropped; module doc)."""
        return self.playouts[slot].clear()

    def steps(self) -> Generator[Step, float, None]:
        """The clock's steps (module doc, "The driver's contract"); each yield gets the time."""
        playouts, n, ptime, grace, stats = self.playouts, self.n, self.ptime, self.grace, self.stats
        fmt = self.fmt
        first = playouts[0] if playouts else None  # the clocked source (`clocked`: the only one)
        anchor: float | None = None
        k = 0
        timestamp = 0
        earliest = _NEVER_S  # the least time a whole packet waited for its deadline this window
        window = 0
        last_sent = -_NEVER_S  # when the last packet was sent
        run, run_least = 0, _NEVER_S  # packets in a row that waited half a ptime or more; their least wait
        after_stall = 0  # packets left in which the phase step applies (a window after a stall)

        def rebase() -> None:
            nonlocal earliest, window, run, run_least, after_stall
            for p in playouts:
                p.rebase()
            earliest = _NEVER_S
            window = 0
            run, run_least, after_stall = 0, _NEVER_S, 0

        now = 0.0
        while True:
            if anchor is None:
                start = self.accepted
                now = yield Wait(_NEVER_S, lambda: self.accepted > start)
                now = yield DRAIN  # what queued before this pacer ran (its sink coming up) is kept
                if any(p.whole for p in playouts) or all(p.ended for p in playouts):
                    anchor, k = now, 0
                    rebase()
                    for p in playouts:
                        p.prime()
                continue
            deadline = anchor + k * ptime
            if now > deadline + 2 * ptime:
                # We fell behind (stalled loop): re-anchor rather than burst; what queued
                # meanwhile is excess, won back in pauses.
                anchor = now - k * ptime
                deadline = now
                now = yield DRAIN
                rebase()
                after_stall = ADJUST_EVERY
            if self.clocked and first is not None and first.active and not first.ready:
                # One clocked source: its packet goes out as soon as it is whole, up to
                # `jitter_ms` after the deadline, and the clock follows it. Never a burst: a
                # backlog (audio that was there when the last packet went) goes one packet
                # per deadline, and a packet that came after it but within half a ptime of it
                # waits until half a ptime after it. The clock follows that one too: it is the
                # source's clock back after a late packet (which moved this clock later), or
                # a source running ahead. Held to the deadline instead, it would keep this
                # clock on the late packet's phase, every packet after it waiting up to a
                # ptime, for as long as one packet a window was late.
                now = yield Wait(deadline + grace, lambda: first.ready)
                if first.whole:
                    now = yield DRAIN
                    if now < deadline - ptime / 2:
                        whole_at = first.complete_at
                        if not isinstance(whole_at, float) or whole_at <= last_sent:  # or _CARRIED
                            now = yield Wait(deadline, _never)  # a backlog: one per deadline
                        else:
                            now = yield Wait(deadline - ptime / 2, _never)
                            deadline, anchor = now, now - k * ptime
                    else:
                        deadline, anchor = now, now - k * ptime
            elif self.clocked and first is not None and first.active and first.next_in_same_frame():
                # The rest of a source frame longer than the ptime: its samples are all here,
                # so it goes now; the clock keeps the frame's pace (the next frame's first
                # packet is due a frame after this one's), so a backlog is no faster for it.
                pass
            else:
                now = yield Wait(deadline, _never)
                waiting = [p for p in playouts if p.active and not p.ready]
                if waiting:
                    now = yield Wait(deadline + grace, lambda: all(p.ready for p in waiting))
            if now > deadline + 2 * ptime and any(p.active and not p.ready for p in playouts):
                continue  # stalled in a wait: re-anchor and take in what queued before any silence
            # Take one ptime from each source; mix-minus (the sink is never among them).
            mixed: np.ndarray | None = None
            contributors = 0
            single: float | None = None  # the level of the packet, when it is one live source's
            least: float | None = _NEVER_S  # the least wait of its sources' packets (None: one was not whole before)
            for p in playouts:
                frame, level, waited = p.take(now, deadline)
                if frame is None:
                    continue
                contributors += 1
                single = level
                if waited is None:
                    least = None
                else:
                    if waited < earliest:
                        earliest = waited
                    if least is not None and waited < least:
                        least = waited
                mixed = frame.pcm if mixed is None else _mix(mixed, frame.pcm)
            if mixed is None and all(p.ended for p in playouts):
                return  # every source ended and was played out
            if mixed is None:
                mixed = np.zeros((n, fmt.channels), dtype=np.int16)
            if contributors == 1 and single is not None:
                stats.level_dbfs = single  # already measured (the pause detector's level)
            else:
                stats.level_dbfs = _dbfs(mixed) if contributors else -120.0
            last_sent = now
            now = yield Send(AudioFrame(mixed, fmt.rate, timestamp))
            timestamp += n
            k += 1
            stats.buffered_ms = sum(p.buffer.buffered for p in playouts) * 1000 // fmt.rate
            if after_stall:
                after_stall -= 1
            if after_stall and contributors and least is not None and least >= ptime / 2:
                # The phase step, in the window after a stall: STEP_AFTER packets in a row
                # each waited half a ptime or more for its deadline. That is a packet of excess
                # held as a phase, not as buffered audio (each packet comes just after the pop
                # of the one before: a source that stalled with this sink, such as another
                # route of this process, handed over one packet too many). The excess is the
                # stall's, not a cushion the source's jitter calls for, so the clock moves
                # earlier at once by their least wait, at most half a ptime (never a burst),
                # instead of at the end of a window, which the packet before the shift spoils
                # (it did not wait): up to 2 s of a ptime's added latency.
                run += 1
                run_least = min(run_least, least)
                if run == STEP_AFTER:
                    shift = min(run_least, ptime / 2)
                    anchor -= shift
                    earliest -= shift  # the window's waits, against the new deadlines
                    run, run_least = 0, _NEVER_S
            elif run:
                run, run_least = 0, _NEVER_S
            window += 1
            if window == ADJUST_EVERY:
                for p in playouts:
                    p.end_window()
                if contributors and 0.001 < earliest < _NEVER_S:
                    anchor -= earliest
                    run, run_least = 0, _NEVER_S
                earliest = _NEVER_S
                window = 0
            if all(p.drained for p in playouts):
                return
            if contributors == 0 and not any(p.active for p in playouts):
                # Everyone idle: silence keeps flowing; when audio comes back the clock
                # re-anchors on it, so it goes out at once instead of up to a ptime later.
                now = yield Wait(anchor + k * ptime, lambda: any(p.whole for p in playouts))
                if any(p.whole for p in playouts):
                    anchor = now - k * ptime
                    now = yield DRAIN  # a source that stalled may send its backlog at once
                    rebase()


def simulate(clock: SinkClock, arrivals: Sequence[tuple[float, int, AudioFrame | PlayoutMark | None]],
             start: float = 0.0, *, send_time: float = 0.0,
             marks: list[tuple[float, object]] | None = None,
             stalls: Sequence[tuple[float, float]] = ()) -> list[tuple[float, AudioFrame]]:
    """Run `clock` without an event loop over `arrivals` ((time s, slot, frame, a mark or None
    for the end), in time order, each handed over at its time as the route's queue would), from
    time `start`; `send_time`: seconds each send takes. Returns (send time, packet) in order;
    `marks` gets (send time, token) for each mark due, as the driver would report it.
    `stalls`: (from s, seconds) in which the driver is off the CPU (a busy host, a long GC): a
    step that would end inside one ends at its end, and a wait whose `until` passed meanwhile
    ends without taking in what queued, as `Route._pace`'s queue does."""
    pending = collections.deque(sorted(arrivals, key=lambda a: a[0]))
    sent: list[tuple[float, AudioFrame]] = []
    now = start

    def resumed(t: float) -> float:
        for at, seconds in stalls:
            if at <= t < at + seconds:
                return at + seconds
        return t

    steps = clock.steps()
    try:
        step = next(steps)
        while True:
            if isinstance(step, Wait):
                while not step.done():
                    if pending and pending[0][0] < step.until and resumed(max(now, pending[0][0])) < step.until:
                        at, slot, frame = pending.popleft()
                        now = resumed(max(now, at))
                        clock.accept(slot, frame, now)
                    else:
                        if step.until == _NEVER_S:
                            return sent  # nothing more will come
                        now = resumed(max(now, step.until))
                        break
            elif isinstance(step, Send):
                sent.append((now, step.frame))
                if marks is not None:
                    marks.extend((now, mark.token) for mark in clock.due)
                    clock.due.clear()
                now = resumed(now + send_time)
            else:  # DRAIN
                while pending and pending[0][0] <= now:
                    _, slot, frame = pending.popleft()
                    clock.accept(slot, frame, now)
            step = steps.send(now)
    except StopIteration:
        return sent
