"""RTP jitter buffer for one stream of fixed-ptime packets (VoIPBIN rtp ingress): a pure object.

Packets go in with `push(sequence, timestamp, payload, arrival)`; `pop(now)` gives the slots
that are due, in sequence order, one per ptime: a packet (`Slot.payload`), or a slot to conceal
(`Slot.lost`) for a packet that was not there in time. `next_due(now)` says when to ask again
(None: nothing to do until the next push), so a trio task can `sleep_until` it. No clock reads,
no trio: `arrival` and `now` are seconds on any monotonic clock (the tests pass a fake one).

Sequence numbers (RFC 3550 Appendix A.1). The 16-bit sequence number is extended with a count
of wrap-arounds (`cycles`): a packet less than MAX_DROPOUT ahead of the highest is in order
(with a gap when more than 1 ahead; passing 65535 → 0 adds a cycle); one up to MAX_MISORDER
behind is a reordered, duplicate or late packet of the same cycle (or of the previous one,
when it is numerically above the highest); anything else is a jump. A jump is held back on
probation: when the next packet follows it (seq + 1), the sender restarted its sequence and
the buffer restarts on those two (A.1 drops the first; we keep it); otherwise it is discarded.
A new SSRC (when the caller passes it) restarts at once. A restart first plays out what is held.

Duplicates: a packet whose extended sequence number was received before (held, played, or
late), among the last RECENT_PACKETS, is dropped and counted `duplicates`.

Interarrival jitter (RFC 3550 §6.4.1): for consecutive packets in arrival order,
D = (R_j - R_i) - (S_j - S_i) and J += (|D| - J) / 16, with R the arrival time and S the
packet's media time. The media clock is the RTP timestamp (8 kHz) while it advances by exactly
`samples` per sequence step; the first pair that does not (VoIPBIN "may grow by bytes, not
samples": 320 per slin packet) switches it to the sequence number × ptime for good
(`stats.clock`). The slot grid below is always the sequence number × ptime: every packet is
one ptime of audio (the VoIPBIN spec fixes 20 ms per message).

Timeline and depth. Packet n is due at `offset + n × ptime`. Its transit is
z(n) = arrival - n × ptime; over the last WINDOW packets, `zmin` is the fastest path, and the
depth (what the buffer holds back) is `offset - zmin`: how long the fastest recent packet
waits. The first packet anchors the timeline with START_DEPTH_MS (at most `max_ms`). The
target depth is max(JITTER_FACTOR × J, zmax - zmin) + MARGIN_MS, at most `max_ms`: enough for
the slowest recent packet, and for a few times the RFC 3550 jitter.
- Grows quickly: when a slot is due and the target exceeds the depth by more than
  GROW_HYST_MS, one slot is inserted (`Slot.inserted`, to conceal: the sequence waits one
  ptime, so the output stays one frame per ptime and the packet gets 20 ms more to arrive);
  near `max_ms`, where a whole slot does not fit, the timeline moves by what is left (a
  fraction of a ptime, which the route's own `jitter_ms` wait absorbs).
- Shrinks slowly: while the depth is above the target it falls by at most SHRINK_MS_PER_S
  (the due times come slightly earlier; nothing is dropped or skipped here: the route wins
  the time back in pauses).
- Never more than `max_ms`: a packet that would wait longer (it came early: a burst after a
  stall) moves the timeline earlier at once, so what is held is due sooner. A packet so far
  ahead that more than IDLE_AFTER slots would fall due at once (the sender skipped sequence
  numbers) re-anchors the timeline on it instead; the slots in between are skipped.

Loss and lateness. A slot whose packet is missing at its due time is output lost (counted
`lost`). A packet that arrives out of order but in time is put back in place (`reordered`).
A packet that comes after its slot was concealed is late. When a packet after it was played
already, it is dropped and counted `late` (never out of order). Otherwise (only concealed
slots since the last packet played: a stall of the sender, of the network or of our own loop,
a sender that paused without advancing the sequence number, telephone-events sent slower than
one per ptime; and no packet after it is waiting, which would then wait beyond `max_ms`) the
timeline re-anchors on it, at most IDLE_AFTER slots behind, and it plays,
and so do the packets after it: what was concealed counts as slots inserted, the latency it
added shrinks back like any excess, and no speech is lost to a stall (the route's own rule:
speech is never cut to win back latency). RESYNC_AFTER_LATE is how many such late packets in a
row it takes (1: the first). After IDLE_AFTER slots concealed in a row with nothing held, the buffer
goes idle (`next_due` is None; the route fills the silence): the next packet re-anchors the
timeline on itself, whatever its sequence number (a sender that paused, a long stall), and the
skipped slots are not output.

`max_ms = 0` turns the buffer off: every packet is due on arrival, in arrival order (a
reordered packet plays when it comes, counted `reordered`); duplicates are still dropped; a
gap ahead gives lost slots before the packet (at most DIRECT_MAX_GAP), as the adapter did
before there was a buffer.

Bounded: held packets are at most `max_ms` of audio (plus what the caller has not popped),
the duplicate memory is RECENT_PACKETS sequence numbers, the transit window WINDOW packets.
"""

from __future__ import annotations

import collections
import enum
from typing import Any

import attrs

__all__ = [
    "DEFAULT_MAX_MS",
    "JitterBuffer",
    "JitterStats",
    "Slot",
    "Verdict",
]

RTP_SEQ_MOD = 1 << 16  # sequence numbers are 16-bit (RFC 3550 §5.1)
RTP_TS_MOD = 1 << 32  # timestamps are 32-bit
MAX_DROPOUT = 3000  # packets ahead of the highest still taken as in order (RFC 3550 A.1; 60 s at 20 ms)
MAX_MISORDER = 100  # packets behind the highest still taken as the same stream (RFC 3550 A.1)
DEFAULT_MAX_MS = 60  # ms: the most the buffer holds back, by default
START_DEPTH_MS = 40.0  # ms: depth at the first packet (room for one swapped pair), at most max_ms
MARGIN_MS = 5.0  # ms added to the measured spread (and to JITTER_FACTOR x J) in the target
JITTER_FACTOR = 3.0  # target >= this x RFC 3550 jitter
GROW_HYST_MS = 5.0  # ms the target must exceed the depth by before a slot is inserted
SHRINK_MS_PER_S = 5.0  # ms per second the depth may fall in calm (60 -> 20 ms takes 8 s)
WINDOW = 50  # packets (1 s at 20 ms) over which the transit spread and zmin are measured
IDLE_AFTER = 10  # slots concealed in a row, with nothing held, after which the buffer goes idle
RESYNC_AFTER_LATE = 1  # late packets in a row (none played after them) after which the timeline follows them
DIRECT_MAX_GAP = 50  # max_ms = 0: lost slots output for one sequence gap, at most (1 s)
RECENT_PACKETS = 512  # sequence numbers remembered for duplicate detection (10 s at 20 ms)
_EPS = 1e-9  # seconds: due-time comparison slack (float rounding)
_MISSING = object()


class Verdict(enum.Enum):
    """What `push` did with a packet."""

    QUEUED = "queued"  #: held for its slot (or, with max_ms = 0, due at once)
    DUPLICATE = "duplicate"  #: received before: dropped
    LATE = "late"  #: its slot was already output (concealed): dropped
    PROBATION = "probation"  #: a sequence jump, held back until the next packet confirms a restart


@attrs.frozen(slots=True)
class Slot:
    """One ptime of output, in order."""

    sequence: int | None
    """Extended sequence number (RFC 3550 A.1: 16-bit number + 65536 x wrap-arounds, counted
    from the stream's first packet, which may make it negative for packets from before it);
    None for a slot inserted to grow the depth."""
    payload: Any
    """What was pushed for that packet (opaque to the buffer: bytes, decoded PCM...); None when
    the slot must be concealed (the packet was lost or late, or the slot was inserted)."""

    @property
    def lost(self) -> bool:
        """True when there is no packet to play: conceal this slot."""
        return self.payload is None

    @property
    def inserted(self) -> bool:
        """True for a slot that belongs to no packet (the depth grew by one ptime)."""
        return self.sequence is None


@attrs.define
class JitterStats:
    """Counters and gauges of one `JitterBuffer`."""

    received: int = 0
    """Packets pushed (every one, duplicates included)."""
    played: int = 0
    """Packets output in their slot."""
    reordered: int = 0
    """Packets that arrived after a higher sequence number, in time: put back in order."""
    duplicates: int = 0
    """Packets received before (same extended sequence number): dropped."""
    late: int = 0
    """Packets that arrived after their slot was output as lost: dropped."""
    lost: int = 0
    """Slots output lost: their packet was not there at its due time."""
    inserted: int = 0
    """Slots inserted to grow the depth (to conceal too)."""
    restarts: int = 0
    """Sequence restarts (RFC 3550 A.1 jump confirmed, new SSRC), re-anchors after idle or a
    jump ahead."""
    jitter_ms: float = 0.0
    """Gauge: RFC 3550 §6.4.1 interarrival jitter J, in ms."""
    depth_ms: float = 0.0
    """Gauge: current depth (how long the fastest recent packet waits), ms."""
    target_ms: float = 0.0
    """Gauge: the depth the buffer steers to, ms."""
    clock: str = "timestamp"
    """Media clock of the jitter estimate: "timestamp" until a pair of packets shows the RTP
    timestamps do not advance by `samples` per packet, then "sequence" (number x ptime)."""

    @property
    def concealed(self) -> int:
        """Slots output without a packet: `lost` + `inserted`."""
        return self.lost + self.inserted


@attrs.define(eq=False, repr=False)
class JitterBuffer:
    """One RTP stream's jitter buffer (module docstring): `push` packets as they arrive, `pop`
    the slots due at `now`, sleep until `next_due(now)`, `flush` at the end of the stream.

    `max_ms` (ms, >= 0): the most it holds back; 0 turns it off (arrival order, duplicates
    dropped). `ptime_ms` and `rate` (Hz) give the slot: `samples` = rate x ptime_ms / 1000.
    Raises ValueError for a negative `max_ms` or a ptime of no whole sample.
    """

    max_ms: float = DEFAULT_MAX_MS
    ptime_ms: int = attrs.field(default=20, kw_only=True)
    rate: int = attrs.field(default=8000, kw_only=True)
    start_ms: float = attrs.field(default=START_DEPTH_MS, kw_only=True)
    """Depth at the first packet (and after a restart), ms; at most `max_ms`."""
    stats: JitterStats = attrs.field(factory=JitterStats, init=False)
    samples: int = attrs.field(init=False)
    """Samples per packet (per slot) at `rate`."""
    _ptime: float = attrs.field(init=False)
    _max: float = attrs.field(init=False)
    _start: float = attrs.field(init=False)
    _direct: bool = attrs.field(init=False)
    # sequence tracking (RFC 3550 A.1)
    _max_seq: int | None = attrs.field(default=None, init=False)
    _cycles: int = attrs.field(default=0, init=False)
    _ssrc: int | None = attrs.field(default=None, init=False)
    _probation: tuple[int, int | None, Any, float] | None = attrs.field(default=None, init=False)
    _highest: int | None = attrs.field(default=None, init=False)
    _seen: set[int] = attrs.field(factory=set, init=False)
    _seen_order: collections.deque[int] = attrs.field(factory=collections.deque, init=False)
    # jitter (RFC 3550 §6.4.1) and transit window
    _jitter: float = attrs.field(default=0.0, init=False)
    _last_arrival: float | None = attrs.field(default=None, init=False)
    _last_ext: int = attrs.field(default=0, init=False)
    _last_ts: int | None = attrs.field(default=None, init=False)
    _transits: collections.deque[float] = attrs.field(init=False)
    _zmin: float = attrs.field(default=0.0, init=False)
    _zmax: float = attrs.field(default=0.0, init=False)
    # timeline
    _held: dict[int, Any] = attrs.field(factory=dict, init=False)
    _ready: list[Slot] = attrs.field(factory=list, init=False)
    _next: int | None = attrs.field(default=None, init=False)
    _offset: float = attrs.field(default=0.0, init=False)
    _emitted: bool = attrs.field(default=False, init=False)
    _run: int = attrs.field(default=0, init=False)
    _idle: bool = attrs.field(default=False, init=False)
    _idle_depth: float = attrs.field(default=0.0, init=False)
    _late: tuple[int, int] | None = attrs.field(default=None, init=False)  # (last late ext, late in a row)
    _played: int | None = attrs.field(default=None, init=False)  # highest ext output as a packet
    _steered_at: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_ms < 0:
            raise ValueError(f"jitter buffer max_ms must be >= 0, got {self.max_ms}")
        self.samples = self.rate * self.ptime_ms // 1000
        if self.samples <= 0:
            raise ValueError(f"ptime {self.ptime_ms} ms gives no whole sample at {self.rate} Hz")
        self._ptime = self.samples / self.rate
        self._max = self.max_ms / 1000
        self._start = min(self.start_ms, self.max_ms) / 1000
        self._direct = self.max_ms == 0
        self._transits = collections.deque(maxlen=WINDOW)

    # ------------------------------------------------------------------------------ input
    def push(self, sequence: int, timestamp: int | None, payload: Any, arrival: float,
             ssrc: int | None = None) -> Verdict:
        """Take one packet: its RTP `sequence` number (0-65535), RTP `timestamp` (None when
        unknown: not used for the jitter estimate), `payload` (anything but None; handed back
        in its `Slot`), `arrival` time (seconds) and, optionally, its SSRC (a change restarts
        the stream). Returns what became of it. Raises ValueError for a sequence number out
        of range or a None payload (a caller's bug, never the peer's)."""
        if not 0 <= sequence < RTP_SEQ_MOD:
            raise ValueError(f"RTP sequence number out of range: {sequence}")
        if payload is None:
            raise ValueError("payload must not be None (None marks a slot to conceal)")
        self.stats.received += 1
        return self._push(sequence, timestamp, payload, arrival, ssrc)

    def _push(self, sequence: int, timestamp: int | None, payload: Any, arrival: float, ssrc: int | None) -> Verdict:
        if self._max_seq is not None and ssrc is not None and self._ssrc is not None and ssrc != self._ssrc:
            self._restart()  # a new synchronization source: a new stream
        if self._max_seq is None:
            self._max_seq, self._cycles, self._ssrc = sequence, 0, ssrc
            return self._accept(sequence, timestamp, payload, arrival)
        udelta = (sequence - self._max_seq) % RTP_SEQ_MOD
        if udelta < MAX_DROPOUT:  # in order, with a permissible gap
            if sequence < self._max_seq:
                self._cycles += RTP_SEQ_MOD  # wrapped around
            self._max_seq = sequence
            self._probation = None
            return self._accept(self._cycles + sequence, timestamp, payload, arrival)
        if udelta <= RTP_SEQ_MOD - MAX_MISORDER:  # a jump: a restart only if the next follows it
            held = self._probation
            if held is not None and sequence == (held[0] + 1) % RTP_SEQ_MOD:
                self._restart()
                self._push(*held, ssrc)
                return self._push(sequence, timestamp, payload, arrival, ssrc)
            self._probation = (sequence, timestamp, payload, arrival)
            return Verdict.PROBATION
        # behind the highest: reordered, duplicate or late (of the previous cycle when above it)
        ext = self._cycles + sequence - (RTP_SEQ_MOD if sequence > self._max_seq else 0)
        return self._accept(ext, timestamp, payload, arrival)

    def _accept(self, ext: int, timestamp: int | None, payload: Any, arrival: float) -> Verdict:
        stats = self.stats
        if ext in self._seen:
            stats.duplicates += 1
            return Verdict.DUPLICATE
        self._seen.add(ext)
        self._seen_order.append(ext)
        if len(self._seen_order) > RECENT_PACKETS:
            self._seen.discard(self._seen_order.popleft())
        resume = self._next is not None and self._idle
        if resume:  # a new timeline: no D across the pause, a fresh transit window
            self._last_arrival = None
            self._transits.clear()
        self._measure(ext, timestamp, arrival)
        if self._direct:
            return self._accept_direct(ext, payload)
        if self._next is None:
            self._anchor(ext, arrival, self._start)
        elif self._played is not None and ext <= self._played:
            stats.late += 1  # behind a packet already played: never out of order
            return Verdict.LATE
        elif resume:
            self._anchor(ext, arrival, self._idle_depth)
            stats.restarts += 1
        elif ext < self._next:
            if not self._emitted:
                self._next = ext  # nothing output yet: an earlier packet becomes the head
            elif not self._follow(ext, arrival):
                stats.late += 1
                return Verdict.LATE
        self._late = None
        if self._highest is None or ext > self._highest:
            self._highest = ext
        elif ext < self._highest:
            stats.reordered += 1
        self._held[ext] = payload
        self._steer(arrival)
        self._cap(ext, arrival)
        return Verdict.QUEUED

    def _follow(self, ext: int, arrival: float) -> bool:
        """A late packet with no packet played after it: True when it is the
        RESYNC_AFTER_LATE-th late one in a row, in sequence, at most IDLE_AFTER slots behind:
        the sender's timeline moved (a stall, a pause that did not advance the sequence
        numbers, telephone-events sent slower than one per ptime). The timeline then
        re-anchors on it, so it and what follows play."""
        assert self._next is not None  # only called once the timeline is anchored (_accept)
        run = self._late
        self._late = (ext, run[1] + 1) if run is not None and ext == run[0] + 1 else (ext, 1)
        if self._late[1] < RESYNC_AFTER_LATE or self._next - ext > IDLE_AFTER:
            return False
        if any(k > ext for k in self._held):
            return False  # packets after it are waiting: they would wait beyond max_ms for it
        held = list(self._held)
        self._anchor(ext, arrival, self._target())
        self._highest = max([ext, *held])
        self.stats.restarts += 1
        return True

    def _accept_direct(self, ext: int, payload: Any) -> Verdict:
        stats = self.stats
        if self._highest is None or ext > self._highest:
            if self._highest is not None:
                for k in range(min(ext - self._highest - 1, DIRECT_MAX_GAP)):
                    self._ready.append(Slot(self._highest + 1 + k, None))
                    stats.lost += 1
            self._highest = ext
        else:
            stats.reordered += 1
        self._ready.append(Slot(ext, payload))
        stats.played += 1
        return Verdict.QUEUED

    def _measure(self, ext: int, timestamp: int | None, arrival: float) -> None:
        """RFC 3550 §6.4.1 jitter, the media clock check and the transit window."""
        stats = self.stats
        if self._last_arrival is not None:
            steps = ext - self._last_ext
            media = steps * self._ptime
            if stats.clock == "timestamp" and timestamp is not None and self._last_ts is not None:
                advance = (timestamp - self._last_ts + RTP_TS_MOD // 2) % RTP_TS_MOD - RTP_TS_MOD // 2
                if advance != steps * self.samples:
                    stats.clock = "sequence"  # the timestamps do not count samples: for good
            d = (arrival - self._last_arrival) - media
            self._jitter += (abs(d) - self._jitter) / 16
            stats.jitter_ms = self._jitter * 1000
        self._last_arrival, self._last_ext, self._last_ts = arrival, ext, timestamp
        self._transits.append(arrival - ext * self._ptime)
        self._zmin, self._zmax = min(self._transits), max(self._transits)

    # ----------------------------------------------------------------------------- timeline
    def _anchor(self, ext: int, arrival: float, depth: float) -> None:
        """Start a timeline on packet `ext`: it is due `depth` seconds after its arrival."""
        self._next = self._highest = ext
        self._offset = arrival - ext * self._ptime + depth
        self._transits.clear()
        self._transits.append(arrival - ext * self._ptime)
        self._zmin = self._zmax = self._transits[0]
        self._emitted = False
        self._run = 0
        self._idle = False
        self._steered_at = arrival
        self._gauges()

    def _depth(self) -> float:
        return self._offset - self._zmin

    def _target(self) -> float:
        spread = self._zmax - self._zmin
        return min(self._max, max(JITTER_FACTOR * self._jitter, spread) + MARGIN_MS / 1000)

    def _gauges(self) -> None:
        self.stats.depth_ms = round(self._depth() * 1000, 3)
        self.stats.target_ms = round(self._target() * 1000, 3)

    def _steer(self, now: float) -> None:
        """Shrink: the depth falls towards the target by at most SHRINK_MS_PER_S."""
        last, self._steered_at = self._steered_at, now
        if last is None or now <= last:
            return
        excess = self._depth() - self._target()
        if excess > 0:
            self._offset -= min(excess, SHRINK_MS_PER_S / 1000 * (now - last))
            self.stats.depth_ms = round(self._depth() * 1000, 3)

    def _cap(self, ext: int, arrival: float) -> None:
        """Never more than max_ms: a packet that would wait longer moves the timeline earlier
        (or, when far ahead, re-anchors it)."""
        shift = self._offset + ext * self._ptime - arrival - self._max
        if shift <= _EPS:
            return
        if shift > IDLE_AFTER * self._ptime:  # the sender skipped numbers: skip with it
            self._ready.extend(self._drain(upto=ext))
            self._anchor(ext, arrival, min(self._target(), self._max))
            self._emitted = True  # what is behind it was output (or skipped): late now
            self.stats.restarts += 1
        else:
            self._offset -= shift
        self._gauges()

    def _drain(self, upto: int | None = None) -> list[Slot]:
        """Every held packet (below `upto`) as slots, in order, gaps as lost slots."""
        out: list[Slot] = []
        keys = [k for k in self._held if upto is None or k < upto]
        if self._next is None or not keys:
            return out
        for ext in range(self._next, max(keys) + 1):
            payload = self._held.pop(ext, _MISSING)
            if payload is _MISSING:
                out.append(Slot(ext, None))
                self.stats.lost += 1
            else:
                out.append(Slot(ext, payload))
                self.stats.played += 1
                self._played = ext
        self._next = max(keys) + 1
        self._emitted = True
        return out

    def _restart(self) -> None:
        """The sender restarted its stream: play out what is held, forget the old numbering."""
        self._ready.extend(self._drain())
        self._held.clear()
        self._next = None
        self._played = None
        self._max_seq = None
        self._probation = None
        self._highest = None
        self._seen.clear()
        self._seen_order.clear()
        self._last_arrival = None
        self._transits.clear()
        self._idle = False
        self.stats.restarts += 1

    # ------------------------------------------------------------------------------ output
    def pop(self, now: float) -> list[Slot]:
        """The slots due at `now` (seconds), in order: packets, lost slots for packets that
        are not there in time, inserted slots where the depth grows. Call it at `next_due`
        (any time later is fine: everything due by then comes out)."""
        out, self._ready = self._ready, []
        if self._direct or self._next is None or self._idle:
            return out
        self._steer(now)
        stats = self.stats
        ptime = self._ptime
        while True:
            if self._offset + self._next * ptime > now + _EPS:
                break
            present = self._next in self._held
            if not present and not self._held and self._run >= IDLE_AFTER:
                self._idle = True  # nothing came for IDLE_AFTER slots: stop until the next packet
                self._idle_depth = min(max(self._depth(), self._start), self._max)
                break
            depth = self._depth()
            if self._target() - depth > GROW_HYST_MS / 1000:
                room = self._max - depth
                if room >= ptime - _EPS:  # grow by one slot: the sequence waits one ptime
                    out.append(Slot(None, None))
                    stats.inserted += 1
                    self._offset += ptime
                    self._run += 1
                    self._emitted = True
                    continue
                if room > _EPS:  # the last fraction of a slot up to max_ms
                    self._offset += room
                    continue
            if present:
                out.append(Slot(self._next, self._held.pop(self._next)))
                stats.played += 1
                self._played = self._next
                self._run = 0
            else:
                out.append(Slot(self._next, None))
                stats.lost += 1
                self._run += 1
            self._next += 1
            self._emitted = True
        self._gauges()
        return out

    def next_due(self, now: float) -> float | None:
        """When `pop` next has something to give (seconds; `now` or earlier: at once), or None
        while there is nothing to do until the next `push` (before the first packet, while
        idle, and always with max_ms = 0 once popped)."""
        if self._ready:
            return now
        if self._direct or self._next is None or self._idle:
            return None
        self._steer(now)
        return self._offset + self._next * self._ptime

    def flush(self) -> list[Slot]:
        """The stream ended: every held packet now, in order, gaps between them as lost slots."""
        out, self._ready = self._ready, []
        out.extend(self._drain())
        return out

    @property
    def held(self) -> int:
        """Packets waiting for their slot."""
        return len(self._held)

    @property
    def idle(self) -> bool:
        """True while nothing is due until the next packet (after IDLE_AFTER concealed slots)."""
        return self._idle
