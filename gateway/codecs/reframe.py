"""Re-framing PCM into frames of a fixed duration (the packet time, ptime)."""

from __future__ import annotations

import attrs
import numpy as np

from gateway.codecs.formats import AudioFormat, AudioFrame, Frame
from gateway.codecs.stage import check_pcm
from gateway.errors import LocalProtocolError

INITIAL_CAPACITY_FRAMES = 4  # ring size at start, in output frames; it doubles when full


@attrs.define(eq=False)
class Reframer:
    """Accumulates PCM of `fmt` and hands out frames of exactly `fmt.samples(ptime_ms)` samples.

    A preallocated int16 ring of shape (capacity, channels): `push` copies the input in (one
    or two slices), `pop` copies one frame out; nothing re-concatenates the backlog. The ring
    grows (doubling) when a push does not fit, unless `max_buffered` is set: then the oldest
    samples beyond it are discarded and counted in `overflowed`.

    Two ways to use it:

    - as a chain stage: `process(frame)` pushes and returns every whole frame now available
      (possibly [] for a short input); `flush()` also returns the last partial frame padded
      with silence, then starts over.
    - from a real-time pacer: `push(frame)`, `pop()` (one frame or None), `buffered`,
      `peek(samples)` (look ahead without consuming), `drop(samples)`.

    Timestamps: an output frame carries the timestamp of its first sample. Input is treated
    as contiguous; when a push arrives with nothing buffered, the clock re-syncs to that
    frame's timestamp (so a gap the route left with the buffer empty is visible downstream).
    """

    fmt: AudioFormat
    """PCM format of the input and output frames."""
    ptime_ms: int
    """Output frame duration in ms (10, 20, 40, 60 or any positive value)."""
    max_buffered: int | None = attrs.field(default=None, kw_only=True)
    """Bound on `buffered` in samples (None: unbounded); the oldest samples go first."""
    input: AudioFormat = attrs.field(init=False)
    output: AudioFormat = attrs.field(init=False)
    delay: int = attrs.field(default=0, init=False)
    frame_samples: int = attrs.field(init=False)
    """Samples per output frame (per channel)."""
    overflowed: int = attrs.field(default=0, init=False)
    """Samples discarded because of `max_buffered`."""
    _ring: np.ndarray = attrs.field(init=False)
    _start: int = attrs.field(default=0, init=False)
    _count: int = attrs.field(default=0, init=False)
    _head_ts: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.fmt.is_pcm:
            raise ValueError(f"Reframer works on PCM, not {self.fmt}")
        self.frame_samples = self.fmt.samples(self.ptime_ms)
        if self.ptime_ms <= 0 or self.frame_samples <= 0:
            raise ValueError(f"ptime {self.ptime_ms} ms gives no whole sample at {self.fmt.rate} Hz")
        if self.max_buffered is not None and self.max_buffered < self.frame_samples:
            raise ValueError(f"max_buffered {self.max_buffered} is less than one frame ({self.frame_samples})")
        self.input = self.output = self.fmt
        self._ring = np.zeros((INITIAL_CAPACITY_FRAMES * self.frame_samples, self.fmt.channels), dtype=np.int16)

    @property
    def buffered(self) -> int:
        """Samples (per channel) waiting, not yet popped."""
        return self._count

    def push(self, frame: Frame) -> None:
        """Append the samples of `frame`. Raises LocalProtocolError for a frame not of `fmt`."""
        frame = check_pcm(frame, self.fmt, "Reframer")
        pcm = frame.pcm
        n = pcm.shape[0]
        if n == 0:
            return
        if self._count == 0:
            self._start = 0
            self._head_ts = frame.timestamp
        if self._count + n > self._ring.shape[0]:
            self._grow(self._count + n)
        ring, cap = self._ring, self._ring.shape[0]
        end = (self._start + self._count) % cap
        first = min(n, cap - end)
        ring[end : end + first] = pcm[:first]
        if first < n:
            ring[: n - first] = pcm[first:]
        self._count += n
        if self.max_buffered is not None and self._count > self.max_buffered:
            self.overflowed += self.drop(self._count - self.max_buffered)

    def _grow(self, needed: int) -> None:
        cap = self._ring.shape[0]
        if self.max_buffered is not None:
            # room for the bound plus one push; beyond that push() discards the oldest
            new_cap = max(needed, min(2 * cap, self.max_buffered + needed))
        else:
            new_cap = max(needed, 2 * cap)
        ring = np.zeros((new_cap, self._ring.shape[1]), dtype=np.int16)
        self._read(ring[: self._count])
        self._ring, self._start = ring, 0

    def _read(self, out: np.ndarray) -> None:
        """Copy the oldest len(out) buffered samples into `out` (no consumption)."""
        n = out.shape[0]
        cap = self._ring.shape[0]
        first = min(n, cap - self._start)
        out[:first] = self._ring[self._start : self._start + first]
        if first < n:
            out[first:] = self._ring[: n - first]

    def pop(self) -> AudioFrame | None:
        """One whole frame of the oldest samples, or None when fewer than `frame_samples` wait."""
        n = self.frame_samples
        if self._count < n:
            return None
        out = np.empty((n, self._ring.shape[1]), dtype=np.int16)
        self._read(out)
        frame = AudioFrame(out, self.fmt.rate, self._head_ts)
        self._consume(n)
        return frame

    def peek(self, samples: int) -> np.ndarray | None:
        """A copy of the oldest `samples` buffered samples, not consumed (the next `pop` returns
        them); None when fewer wait."""
        if samples < 0 or self._count < samples:
            return None
        out = np.empty((samples, self._ring.shape[1]), dtype=np.int16)
        self._read(out)
        return out

    def drop(self, samples: int) -> int:
        """Discard up to `samples` of the oldest samples; returns how many were discarded.

        Raises LocalProtocolError for a negative count.
        """
        if samples < 0:
            raise LocalProtocolError(f"cannot drop {samples} samples")
        n = min(samples, self._count)
        self._consume(n)
        return n

    def _consume(self, n: int) -> None:
        self._start = (self._start + n) % self._ring.shape[0]
        self._count -= n
        self._head_ts += n

    def process(self, frame: Frame) -> list[AudioFrame]:
        self.push(frame)
        frames: list[AudioFrame] = []
        while (whole := self.pop()) is not None:
            frames.append(whole)
        return frames

    def flush(self) -> list[AudioFrame]:
        """Every whole frame, then the partial one padded with silence; empties the buffer."""
        frames: list[AudioFrame] = []
        while (whole := self.pop()) is not None:
            frames.append(whole)
        if self._count:
            out = np.zeros((self.frame_samples, self._ring.shape[1]), dtype=np.int16)
            self._read(out[: self._count])
            frames.append(AudioFrame(out, self.fmt.rate, self._head_ts))
            self._consume(self._count)
        self._start = 0
        return frames
