"""Playout (jitter) buffer for Opus packets that carry no sequence number and no timestamp.

What hearing an Argon participant gives us (shared/protocols/argon-voice-ws.md, "Hearing"): one
Opus packet per WebSocket message, any frame size (2.5-120 ms, read from the TOC, RFC 6716
§3.1), mono or stereo, in order (TCP), with packets lost upstream simply missing and DTX
thinning the stream out to nothing during silence. `OpusPlayout` rebuilds a steady stream of
PCM16 48 kHz `AudioFrame`s, with continuous timestamps, from arrival times alone. It is a pure
object: no clock reads, no trio; `now` (seconds, any monotonic clock) is passed in.

Timeline. Packet k is expected at e(k) = e(k-1) + duration(k-1); its playout deadline is
e(k) + delay. Internally that is kept as sample positions: `p`, the packet's place in the
sender's stream (sum of the durations before it, lost slots included), and the output position
(samples emitted since the anchor). A packet's transit `z = arrival - p / 48 kHz` is what the
network did to it; the spread of z over the last second is the jitter the buffer must absorb,
and `lead = anchor + (output position - p) / 48 kHz - min z` is the delay the buffer currently
applies (how long the fastest recent packet waits before it plays).

Delay target. RFC 3550 §6.4.1 jitter J += (|D| - J) / 16, with D the difference between two
consecutive packets' arrival spacing and the previous one's duration (lost slots removed). The
target is max(JITTER_FACTOR * J, spread of z over WINDOW_S) + MARGIN_MS, within [min_delay_ms,
max_delay_ms]. It rises at once (a late packet raises the spread the moment it is pushed) and
falls by at most SHRINK_MS_PER_S.

Steering the applied delay to the target, without touching speech:
- late packet (its slot was already concealed): it plays next; the timeline moves later by
  what was concealed, i.e. the lead grew at once, by exactly the lateness rounded to a slot;
- lead above target + DROP_HYST_MS: decoded frames whose level is below LOW_LEVEL_DBFS (pauses)
  are shortened or skipped, spliced with a SPLICE crossfade, never below the target and never
  more than what is queued behind; every packet is still decoded, so the decoder state stays
  whole. This also absorbs a sender clock that runs fast;
- lead below target - INSERT_HYST_MS (a slow sender clock, a raised target): libopus PLC of up
  to INSERT_MAX in a pause (after a low-level frame), which libopus joins to the next packet;
- beyond MAX_EXCESS_MS above target (a burst after a stall), the excess over that bound is
  trimmed whatever the level (bounded latency and memory), crossfaded, counted `trimmed_ms`.

Loss and FEC. With no sequence numbers a loss can only be read from timing. Once the jitter
is measured (JITTER_WARMUP pairs) and small against the packet duration s (8 J < s), a packet
whose arrival spacing exceeds the previous packet's duration by m whole slots (within s/4) is
taken to follow m lost packets: those slots are concealed before it (so the timeline stays
whole, and a packet that arrives right at the missing slot's deadline does not jump into it),
and the last one is decoded from the packet's in-band FEC (LBRR, decode_fec=1) when it
carries LBRR (`packet_has_lbrr`), the slot is at least one of its frames long and the packet
decoded before the loss was not CELT-only (libopus's own conditions; else it is PLC, which is
what libopus would fall back to). `stats.fec` counts only the slots really rebuilt so.

FEC needs the packet after a loss in hand when the lost slot's deadline comes, i.e. a lead of
at least one packet plus the transit spread. At the default 20 ms floor and 20 ms packets the
next packet comes right at that deadline, so a little jitter makes it miss. When it does (a
loss was inferred, its slots were already concealed with PLC, and the packet carries LBRR),
the delay target covers one more packet (target + s) for FEC_HOLD_S after that miss, so the
next loss is rebuilt from FEC: ~s more latency, only while losses repairable by FEC happen,
grown in a pause as any raise of the target.

A TCP stall looks different: the delayed packet is followed at once by the ones TCP held
back, so a packet bunched (< s/2) right behind one read as "after a loss" undoes that reading
(it was a late packet: counted `late`, no FEC). What timing cannot tell apart is a delay that
steps up by exactly m slots and stays; then a slot is filled that did not need to be (FEC then
replays the previous packet's content, much as PLC would) and the slot of latency is won back
in the next pause. With more jitter no inference is made: gaps are concealed as their
deadlines come and late packets play next.

Tolerance, and a loaded event loop. A slot is concealed only when its deadline passes with no
packet for it: the tolerance for a late packet is the applied delay (the target, >= 20 ms). The
arrival time is stamped when our reader task takes the message, so a loop that was busy
delivers late in exactly the way a jittery network does: the lateness counts in the spread and
J, and the target rises to cover it (at once, up to max_delay_ms); a packet later than that
still plays (next, counted `late`), never dropped, and the latency it added is won back in
pauses. What it costs is the PLC of one slot, never a loss of audio. The loss inference above
takes a far stricter view (low J, whole slots, undone by a bunch), so a loaded loop does not
make it shift the timeline or decode FEC for a packet that was merely late.

Senders are taken to be paced by their packets' durations (the reference bot sends a packet
and waits its TOC duration), hence e(k) = e(k-1) + duration(k-1); a sender that sends each
packet when its audio is captured differs only when the frame size changes, which then looks
like one late packet.

Gaps, DTX and idle. A slot with no packet at its deadline is concealed in chunks of the last
packet's duration (at most 20 ms, so a late packet slips in soon); packets of <= 2 bytes
(DTX, TOC only) are PLC for their TOC duration; malformed packets (framing rejected by
`packet_samples`, or refused by libopus at decode time) are counted and concealed for the
previous packet's duration. After the last decoded audio, PLC plays at full level for
PLC_FULL_MS, fades linearly to silence by FADE_END_MS, and at IDLE_AFTER_MS the stream stops
(`next_deadline()` is None). The next packet restarts it on a new anchor; timestamps continue
where they stopped; the decoder keeps its state and the first audio fades in over FADE_IN, so
the join has no click. While idle, packets that carry nothing are not a restart: DTX packets,
and packets that decode to near silence (below SILENT_DBFS: libopus's 400 ms DTX updates, a
bot's F8 FF FE): they are decoded (decoder state) and dropped, since an idle source already
plays as silence in the route. (A TOC-only packet is what libopus itself decodes as PLC.)

Why the fade is ours: libopus 1.3's PLC does fade, but not to silence, and not alike for its
modes. Measured here on speech (20 ms packets, level per concealed frame against the last
decoded one): after CELT packets it holds ~0 to -10 dB for 100 ms, then turns to shaped noise
falling ~2-3 dB per 20 ms (-20 dB at 200 ms, -48 dB at 400 ms); after SILK / hybrid packets it
falls to -48 dB by 100 ms and stays there as a noise floor (~-56 dB). So PLC_FULL_MS of
libopus's own concealment, then our linear fade to digital silence by FADE_END_MS.

`concealment=False` (a benchmark baseline, "silence fill"): every slot that PLC or FEC would
fill (lost, late, DTX, malformed, the tail) is digital silence instead, and the pause
insertions that grow the delay are silence too; the timeline, the delay control and the
counters are the same.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
import numpy as np

from gateway.codecs.formats import AudioFrame, EncodedFrame
from gateway.codecs.opus import (
    MAX_FRAME_SAMPLES,
    OPUS_RATE,
    PLC_GRANULE,
    OpusDecoder,
    packet_frame_samples,
    packet_has_lbrr,
    packet_samples,
)
from gateway.errors import RemoteProtocolError

__all__ = ["OpusPlayout", "PlayoutStats"]

RATE = OPUS_RATE  # Hz, every Opus packet decodes at 48 kHz
GRANULE = PLC_GRANULE  # 120 samples = 2.5 ms: the unit of PLC and of drops
_MS = RATE // 1000  # samples per ms

CONCEAL_CHUNK = 20 * _MS  # samples: longest PLC frame for a slot with no packet yet
PLC_FULL_MS = 100  # ms of PLC at full level after the last decoded audio
FADE_END_MS = 150  # ms after the last decoded audio when the fade reaches silence
IDLE_AFTER_MS = 200  # ms after the last decoded audio when the stream stops (idle)
FADE_IN = 5 * _MS  # samples: fade-in of the first audio after a fade or an idle stretch
SPLICE = GRANULE  # samples: crossfade where audio was dropped
WINDOW_S = 1.0  # seconds of arrivals the transit spread and the lead are measured over
JITTER_WARMUP = 16  # packet pairs measured before gaps are read as losses
JITTER_FACTOR = 3.0  # target >= this x RFC 3550 jitter
MARGIN_MS = 5.0  # ms added to the measured spread (and to 3 J)
SHRINK_MS_PER_S = 2.0  # ms per second the target may fall in calm
DROP_HYST_MS = 5.0  # ms above target before pause audio is dropped (back down to the target)
INSERT_HYST_MS = 2.5  # ms below target before PLC is inserted in a pause
INSERT_MAX = 10 * _MS  # samples: longest single insertion
MAX_EXCESS_MS = 120.0  # ms above target beyond which audio is trimmed whatever its level
LOW_LEVEL_DBFS = -45.0  # frames quieter than this (RMS) are a pause: they may be dropped
SILENT_DBFS = -65.0  # while idle, packets quieter than this do not restart the stream
FEC_HOLD_S = 10.0  # s after a loss that FEC could have repaired but PLC filled: the target covers one more packet
_EPS = 1e-6  # seconds: deadline comparison slack (float rounding of the clock)

_MARGIN = MARGIN_MS / 1000  # s
_SHRINK = SHRINK_MS_PER_S / 1000  # s per s
_FULL = PLC_FULL_MS * _MS
_FADE_END = FADE_END_MS * _MS
_IDLE = IDLE_AFTER_MS * _MS


def _mean_square(dbfs: float) -> float:
    return (32768.0 * 10 ** (dbfs / 20)) ** 2


_LOW_MS = _mean_square(LOW_LEVEL_DBFS)
_SILENT_MS = _mean_square(SILENT_DBFS)
_FADE_IN_RAMP = (np.arange(1, FADE_IN + 1, dtype=np.float32) / FADE_IN)[:, None]
_SPLICE_RAMP = ((np.arange(SPLICE, dtype=np.float32) + 0.5) / SPLICE)[:, None]

# queue entry kinds
_NORMAL, _DTX, _MALFORMED, _DECODED = 0, 1, 2, 3
_Queued = tuple[int, int, int, int, Any, float]
"""A queue entry: (position, samples, kind, samples missing before it, data, arrival). `data`
is the packet (bytes), or for _DECODED the AudioFrame decoded at a restart: its type follows
`kind`, which a type checker cannot narrow on, hence Any."""


def _level(pcm: np.ndarray) -> float:
    """Mean square of int16 PCM (numpy, no Python loop over samples)."""
    x = pcm.reshape(-1).astype(np.float32)
    return float(np.dot(x, x)) / x.size


@attrs.define
class PlayoutStats:
    """Counters and gauges of one `OpusPlayout`."""

    received: int = 0
    """Packets pushed (every kind)."""
    decoded: int = 0
    """Packets decoded by libopus (played, dropped in a pause, or silent while idle)."""
    concealed: int = 0
    """Frames filled in by PLC/FEC: lost or late slots, DTX and malformed packets, fades."""
    fec: int = 0
    """Concealed frames rebuilt from the next packet's in-band FEC (LBRR) data (RFC 6716
    §2.1.7): counted only where libopus uses it (the packet carries LBRR, the slot is at least
    one of its frames, the packet before the loss was not CELT-only)."""
    fec_missed: int = 0
    """Losses whose next packet carried LBRR but came after the lost slot was concealed with
    PLC (each raises the delay target by a packet for FEC_HOLD_S)."""
    dtx: int = 0
    """Packets of <= 2 bytes (DTX, no data)."""
    late: int = 0
    """Packets that arrived after their slot was concealed (they play next)."""
    malformed: int = 0
    """Packets refused (framing, or libopus at decode time): concealed, never raised."""
    dropped_ms: float = 0.0
    """Pause audio (below LOW_LEVEL_DBFS) dropped to win back latency."""
    inserted_ms: float = 0.0
    """PLC inserted in pauses to grow the delay (slow sender clock, higher target)."""
    trimmed_ms: float = 0.0
    """Audio dropped whatever its level because the buffer was MAX_EXCESS_MS over target."""
    delay_ms: float = 0.0
    """Gauge: current delay target."""
    depth_ms: float = 0.0
    """Gauge: audio buffered (packets waiting for their deadline)."""
    jitter_ms: float = 0.0
    """Gauge: RFC 3550 interarrival jitter estimate."""


@attrs.define(eq=False, repr=False)
class OpusPlayout:
    """Opus packets with arrival times in, a real-time stream of PCM16 48 kHz frames out.

    `push(packet, now)` for each received packet; call `pull(now)` at `next_deadline()` (or
    any time later) for the frames due; `next_deadline()` is None while idle. See the module
    docstring for the timeline, the delay control, FEC and idle rules.
    """

    channels: int
    """Output channels, 1 or 2 (libopus up- or down-mixes what each packet codes)."""
    min_delay_ms: float = attrs.field(default=20.0, kw_only=True)
    """Least delay the buffer applies after the arrival of the fastest packets."""
    max_delay_ms: float = attrs.field(default=60.0, kw_only=True)
    """Ceiling of the delay target, however bad the jitter."""
    concealment: bool = attrs.field(default=True, kw_only=True)
    """False: slots PLC or FEC would fill are digital silence ("silence fill", a baseline)."""
    stats: PlayoutStats = attrs.field(factory=PlayoutStats, init=False)
    _dec: OpusDecoder = attrs.field(init=False)
    _min: float = attrs.field(init=False)
    _max: float = attrs.field(init=False)
    _target: float = attrs.field(init=False)
    _jitter: float = attrs.field(default=0.0, init=False)
    _pairs: int = attrs.field(default=0, init=False)
    _queue: collections.deque[_Queued] = attrs.field(factory=collections.deque, init=False)
    _queued: int = attrs.field(default=0, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _anchor: float = attrs.field(default=0.0, init=False)
    _out: int = attrs.field(default=0, init=False)
    _in: int = attrs.field(default=0, init=False)
    _ts: int = attrs.field(default=0, init=False)
    _gap: int = attrs.field(default=0, init=False)
    _quiet: int = attrs.field(default=0, init=False)
    _gain: float = attrs.field(default=1.0, init=False)
    _head: np.ndarray | None = attrs.field(default=None, init=False)
    _last_pcm: np.ndarray | None = attrs.field(default=None, init=False)
    _last_level: float | None = attrs.field(default=None, init=False)
    _slot: int = attrs.field(default=20 * _MS, init=False)
    _prev_a: float | None = attrs.field(default=None, init=False)
    _prev_n: int = attrs.field(default=0, init=False)
    _prev_kind: int = attrs.field(default=_MALFORMED, init=False)
    _prev_missing: int = attrs.field(default=0, init=False)
    _prev_gap: int = attrs.field(default=0, init=False)
    _last_push: float | None = attrs.field(default=None, init=False)
    _zmin: collections.deque[tuple[float, float]] = attrs.field(factory=collections.deque, init=False)
    _zmax: collections.deque[tuple[float, float]] = attrs.field(factory=collections.deque, init=False)
    _celt: bool = attrs.field(default=False, init=False)
    _fec_until: float = attrs.field(default=-1e300, init=False)

    def __attrs_post_init__(self) -> None:
        if self.channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {self.channels}")
        if not 0 <= self.min_delay_ms <= self.max_delay_ms:
            raise ValueError(f"need 0 <= min_delay_ms <= max_delay_ms, got {self.min_delay_ms}, {self.max_delay_ms}")
        self._dec = OpusDecoder(self.channels)
        self._min = self.min_delay_ms / 1000
        self._max = self.max_delay_ms / 1000
        self._target = self._min
        self.stats.delay_ms = self.min_delay_ms

    def __repr__(self) -> str:
        st = self.stats
        return (f"<OpusPlayout channels={self.channels} running={self._running} delay_ms={st.delay_ms:.1f} "
                f"depth_ms={st.depth_ms:.1f} received={st.received} concealed={st.concealed}>")

    # --- what the driver asks ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the stream emits (False before the first packet and while idle)."""
        return self._running

    @property
    def buffered(self) -> int:
        """Samples (per channel) of packets waiting for their deadline."""
        return self._queued

    def next_deadline(self) -> float | None:
        """When `pull` has the next frame due (None: idle until the next push)."""
        if not self._running:
            return None
        return self._anchor + self._out / RATE

    # --- input ------------------------------------------------------------------------------

    def push(self, packet: bytes, now: float) -> None:
        """One received packet, `now` its arrival time (seconds). Never raises for the packet's
        content: malformed packets are counted and concealed."""
        st = self.stats
        st.received += 1
        item: bytes | AudioFrame = packet  # what is queued: the packet, or the frame decoded at a restart
        try:
            n = packet_samples(packet)
        except RemoteProtocolError:
            st.malformed += 1
            if not self._running:
                return
            kind, n = _MALFORMED, self._slot
        else:
            if len(packet) <= 2:
                st.dtx += 1
                if not self._running:
                    return
                kind = _DTX
            elif self._running:
                kind = _NORMAL
            else:
                frame = self._decode(packet, n)
                if frame is None or _level(frame.pcm) < _SILENT_MS:
                    return  # nothing to restart for: an idle source already plays as silence
                self._start(now)
                kind, item = _DECODED, frame
            self._slot = n

        # Timeline: lost slots from the arrival spacing, then RFC 3550 jitter.
        missing = 0
        prev_a = self._prev_a
        queue = self._queue
        if self._prev_missing and prev_a is not None and 2 * (now - prev_a) * RATE < self._prev_n:
            # Bunched right behind a packet read as following a loss: that was a stall
            # released (TCP holds back what follows a delayed segment), not a loss.
            if self._prev_gap and self._prev_gap <= self._prev_missing:
                st.late += 1
            if queue and queue[-1][5] == prev_a:
                e = queue[-1]
                queue[-1] = (e[0], e[1], e[2], 0, e[4], e[5])
            self._prev_missing = 0
        if prev_a is not None and kind != _MALFORMED and self._prev_kind != _MALFORMED:
            s = self._prev_n
            d = now - prev_a - s / RATE  # seconds the spacing exceeds the previous duration
            if self._pairs >= JITTER_WARMUP and 8 * self._jitter * RATE < s and 2 * d * RATE > s:
                m = round(d * RATE / s)
                if abs(d * RATE - m * s) * 4 <= s and m * s <= _IDLE:
                    missing = m * s
                    d -= missing / RATE
            if kind != _DTX and self._prev_kind != _DTX:
                self._jitter += (min(abs(d), self._max) - self._jitter) / 16
                self._pairs += 1
        self._prev_a, self._prev_n, self._prev_kind = now, n, kind
        if missing and kind == _NORMAL and self.concealment and (self._gap if not queue else 0) >= missing \
                and packet_has_lbrr(packet):
            st.fec_missed += 1  # FEC could have rebuilt the slot had this packet been here in time
            self._fec_until = now + FEC_HOLD_S

        p = self._in + missing
        self._in = p + n
        if kind != _MALFORMED:
            # transit z over the last WINDOW_S: monotonic deques give its min and max
            z = now - p / RATE
            entry = (now, z)
            lo, hi, old = self._zmin, self._zmax, now - WINDOW_S
            while lo and lo[-1][1] >= z:
                lo.pop()
            lo.append(entry)
            if lo[0][0] < old:
                while lo[0][0] < old:
                    lo.popleft()
            while hi and hi[-1][1] <= z:
                hi.pop()
            hi.append(entry)
            if hi[0][0] < old:
                while hi[0][0] < old:
                    hi.popleft()
            # delay target: up at once, down by at most SHRINK_MS_PER_S
            jitter = self._jitter
            cand = max(JITTER_FACTOR * jitter, hi[0][1] - lo[0][1]) + _MARGIN
            if now < self._fec_until:
                cand += n / RATE  # the packet after a loss must be here before the lost slot plays
            if cand < self._min:
                cand = self._min
            elif cand > self._max:
                cand = self._max
            target = self._target
            if cand >= target:
                target = cand
            elif self._last_push is not None:
                target = max(cand, target - _SHRINK * (now - self._last_push))
            self._target = target
            self._last_push = now
            st.delay_ms = target * 1000
            st.jitter_ms = jitter * 1000
        gap = 0 if queue else self._gap
        if gap > missing:
            st.late += 1  # its slot was concealed: it plays next, the timeline moves later
        self._prev_missing, self._prev_gap = missing, gap
        queue.append((p, n, kind, missing, item, now))
        self._queued += n
        st.depth_ms = self._queued / _MS

    def _start(self, now: float) -> None:
        self._running = True
        self._anchor = now + self._target
        self._out = self._in = self._gap = 0
        self._zmin.clear()
        self._zmax.clear()
        self._prev_a = None
        self._prev_missing = 0
        self._head = None

    # --- output -----------------------------------------------------------------------------

    def pull(self, now: float) -> list[AudioFrame]:
        """Every frame whose playout deadline is <= `now`, in order (possibly [])."""
        frames: list[AudioFrame] = []
        if not self._running:
            return frames
        limit = now + _EPS
        queue = self._queue
        while self._running and self._anchor + self._out / RATE <= limit:
            if not queue:
                if self._quiet >= _IDLE:
                    self._running = False  # idle: the next push restarts on a new anchor
                    self._head = None
                    break
                frames.append(self._conceal(min(self._slot, CONCEAL_CHUNK, _IDLE - self._quiet)))
                continue
            p, n, kind, missing, data, _ = queue[0]
            need = missing - self._gap
            if need > 0:  # slots lost before this packet: PLC, the last one from its FEC
                chunk = min(need, MAX_FRAME_SAMPLES)
                # libopus decodes FEC only for a whole frame of the packet, after a non-CELT one
                fec = (kind == _NORMAL and chunk == need and self.concealment and not self._celt
                       and chunk >= packet_frame_samples(data) and packet_has_lbrr(data))
                frames.append(self._conceal(chunk, data if fec else None))
                continue
            if kind == _DTX or kind == _MALFORMED:  # a slot with nothing to decode
                queue.popleft()
                self._queued -= n
                if self._quiet < _IDLE:
                    frames.append(self._conceal(n))
                self._gap = 0
                continue
            # lead: how long the fastest recent packet waits; excess: lead above the target
            excess = self._anchor + (self._out - p) / RATE - self._zmin[0][1] - self._target
            if (
                kind == _NORMAL
                and excess * 1000 < -INSERT_HYST_MS
                and self._head is None
                and self._last_pcm is not None
                and self._last_low()
            ):
                ins = min(-(-int(-excess * RATE) // GRANULE) * GRANULE, INSERT_MAX)
                frames.append(self._insert(ins))
                continue
            queue.popleft()
            self._queued -= n
            self._gap = 0
            if kind == _NORMAL:
                frame = self._decode(data, n)
                if frame is None:  # libopus refused it
                    frames.append(self._conceal(n))
                    self._gap = 0
                    continue
            else:
                frame = data
            pcm = frame.pcm
            self._quiet = 0
            self._last_pcm, self._last_level = pcm, None
            if excess * 1000 > DROP_HYST_MS:
                forced = excess * 1000 > MAX_EXCESS_MS
                if forced or self._last_low():
                    want = excess - MAX_EXCESS_MS / 1000 if forced else excess
                    d = min(int(want * RATE) // GRANULE * GRANULE, self._queued)
                    if d > 0:
                        d = min(d, n)
                        if self._head is None:
                            self._head = pcm[:SPLICE].copy()
                        if forced:
                            self.stats.trimmed_ms += d / _MS
                        else:
                            self.stats.dropped_ms += d / _MS
                        if d == n:
                            continue  # the whole frame goes; the next one splices on
                        pcm = pcm[d:]
                        frame = None
            frames.append(self._emit(pcm, frame))
        self.stats.depth_ms = self._queued / _MS
        return frames

    def _last_low(self) -> bool:
        """Whether the last decoded frame is a pause (below LOW_LEVEL_DBFS); computed once."""
        if self._last_level is None:
            assert self._last_pcm is not None  # asked only once a frame was decoded
            self._last_level = _level(self._last_pcm)
        return self._last_level < _LOW_MS

    def _decode(self, packet: bytes, n: int) -> AudioFrame | None:
        try:
            (frame,) = self._dec.process(EncodedFrame(packet, self._dec.input, n, self._ts))
        except RemoteProtocolError:
            self.stats.malformed += 1
            return None
        self._celt = packet[0] >= 0x80  # TOC configs 16-31: what libopus's FEC decision looks at
        self.stats.decoded += 1
        return frame

    def _conceal(self, n: int, fec: bytes | None = None) -> AudioFrame:
        """PLC (or FEC from `fec`, the packet after the gap) for a slot with no audio, faded
        by the time since the last decoded audio."""
        st = self.stats
        st.concealed += 1
        if not self.concealment:  # silence fill: no PLC, no fade, no splice
            self._gap += n
            self._quiet += n
            self._head = None
            self._gain = 1.0
            return self._stamp(np.zeros((n, self.channels), dtype=np.int16), None)
        try:
            frame = self._dec.conceal(n, fec)
        except RemoteProtocolError:
            frame, fec = self._dec.conceal(n), None
        if fec is not None:
            st.fec += 1
            self._celt = False  # libopus now holds the mode of the packet it took the FEC from
        self._gap += n
        q0 = self._quiet
        self._quiet = q0 + n
        pcm = frame.pcm
        if q0 >= _FADE_END:
            pcm.fill(0)
            self._gain = 0.0
            self._head = None
            return self._stamp(pcm, frame)
        elif q0 + n > _FULL:
            g = np.clip((_FADE_END - q0 - np.arange(n, dtype=np.float32)) / (_FADE_END - _FULL), 0.0, 1.0)
            if self._gain < 1.0:
                g[: min(FADE_IN, n)] = np.minimum(g[: min(FADE_IN, n)], self._ramp(min(FADE_IN, n))[:, 0])
            pcm[:] = np.rint(pcm * g[:, None])
            self._gain = float(g[-1])
            if self._head is not None:
                self._splice(pcm)
            return self._stamp(pcm, frame)
        return self._emit(pcm, frame)

    def _insert(self, n: int) -> AudioFrame:
        """PLC in a pause, to grow the applied delay toward the target."""
        self.stats.inserted_ms += n / _MS
        if not self.concealment:
            return self._emit(np.zeros((n, self.channels), dtype=np.int16), None)
        frame = self._dec.conceal(n)
        return self._emit(frame.pcm, frame)

    def _ramp(self, n: int) -> np.ndarray:
        g0 = self._gain
        return g0 + (1.0 - g0) * _FADE_IN_RAMP[:n]

    def _splice(self, pcm: np.ndarray) -> None:
        """Crossfade the start of `pcm` from the audio that followed the last emitted sample."""
        head, self._head = self._head, None
        assert head is not None  # callers splice only while a head is held
        k = min(len(head), len(pcm))
        r = _SPLICE_RAMP[:k] if k == SPLICE else ((np.arange(k, dtype=np.float32) + 0.5) / k)[:, None]
        h = head[:k].astype(np.float32)
        pcm[:k] = np.rint(h + (pcm[:k] - h) * r)

    def _emit(self, pcm: np.ndarray, frame: AudioFrame | None) -> AudioFrame:
        if self._head is not None:
            self._splice(pcm)
        if self._gain < 1.0:
            k = min(FADE_IN, len(pcm))
            ramp = self._ramp(k)
            pcm[:k] = np.rint(pcm[:k] * ramp)
            self._gain = 1.0 if k == FADE_IN else float(ramp[-1, 0])
        return self._stamp(pcm, frame)

    def _stamp(self, pcm: np.ndarray, frame: AudioFrame | None) -> AudioFrame:
        ts = self._ts
        n = len(pcm)
        self._ts = ts + n
        self._out += n
        if frame is not None and frame.timestamp == ts and frame.pcm is pcm:
            return frame
        return AudioFrame(pcm, RATE, ts)
