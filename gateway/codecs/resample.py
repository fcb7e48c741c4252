"""Sample-rate conversion: a low-delay polyphase FIR for integer ratios, soxr for the rest.

Live paths convert between 8, 16 and 48 kHz (ratios 2, 3 and 6). `soxr.ResampleStream` holds
back ~140 ms at its default quality (~30 ms with `vr=True`, DESIGN.md "Latency is a budget"),
so integer ratios use a linear-phase windowed-sinc FIR run as a streaming polyphase filter:

- passband up to `PASSBAND_FRACTION` of the lower rate (3400 Hz at 8 kHz, 6800 Hz at 16 kHz),
  ripple < 0.001 dB;
- stopband from half the lower rate (its Nyquist frequency: 4000 Hz at 8 kHz), attenuated by
  at least 84 dB (Kaiser design for `STOPBAND_ATTENUATION_DB`), so images (upsampling) and
  aliases (downsampling) are >= 80 dB down;
- group delay 4.5 ms for 8 <-> 16 and 8 <-> 48 kHz, 2.25 ms for 16 <-> 48 kHz.

The delay is set by the transition width (0.075 x the lower rate = 600 Hz at 8 kHz): a
passband to 0.45 x the lower rate with the same stopband would need ~6.7 ms, over the 5 ms
budget. Rates below ~7.2 kHz would exceed 5 ms as well. Measured (bench/bench_codecs.py):
images and aliases of test tones 92-98 dB down; ~12 us (8 -> 48 kHz) to ~19 us (48 -> 16 kHz)
per 20 ms mono frame. Arithmetic is float32 (BLAS), so splitting the same input differently
can change an output sample by 1 LSB where it rounds at .5.

Every call returns the samples its input completes: exactly `n * L` for upsampling by L, and
for downsampling by M exactly `n / M` when the stream so far is a multiple of M samples
(otherwise the phase is carried and the count is the floor or ceiling, never a held frame).
Non-integer ratios (44.1 kHz files) go through `soxr.ResampleStream` (HQ, int16), whose output
per call varies.
"""

from __future__ import annotations

import functools
import math

import attrs
import numpy as np
import soxr

from gateway.codecs.formats import AudioFormat, AudioFrame, Encoding, Frame
from gateway.codecs.stage import check_pcm

PASSBAND_FRACTION = 0.425  # passband edge / lower rate: 3400 Hz at 8 kHz (the G.711 band edge)
STOPBAND_FRACTION = 0.5  # stopband edge / lower rate: the lower rate's Nyquist frequency
STOPBAND_ATTENUATION_DB = 85.0  # Kaiser design target (dB); the requirement is >= 80 dB
SOXR_QUALITY = "HQ"  # soxr preset for non-integer ratios (20-bit, ~-120 dB aliasing)
INT16_MIN, INT16_MAX = -32768, 32767


@attrs.frozen
class LowpassDesign:
    """A linear-phase lowpass FIR for conversion by an integer `ratio` (L or M).

    `taps` is float64 of odd length `2 * half * ratio + 1`, DC gain 1, running at the higher
    rate; its group delay is `half * ratio` samples at the higher rate, i.e. `half` samples at
    the lower rate.
    """

    taps: np.ndarray
    """Impulse response, float64, shape (2 * half * ratio + 1,), symmetric."""
    ratio: int
    """Rate ratio high / low (2, 3, 6, ...)."""
    half: int
    """Group delay in samples at the lower rate."""
    high_rate: int
    """Rate the filter runs at, Hz."""

    @property
    def delay_s(self) -> float:
        """Group delay in seconds."""
        return self.half / (self.high_rate / self.ratio)


@functools.lru_cache(maxsize=32)
def design_lowpass(low_rate: int, ratio: int) -> LowpassDesign:
    """Kaiser-windowed sinc lowpass for converting between `low_rate` and `low_rate * ratio` Hz.

    Kaiser's formulas (Oppenheim & Schafer, "Discrete-Time Signal Processing", §7.6):
    beta = 0.1102 (A - 8.7) and N - 1 = (A - 7.95) / (2.285 dw), A the stopband attenuation
    in dB and dw the transition width in rad/sample. N - 1 is rounded up to a multiple of
    2 * ratio so the group delay is a whole number of low-rate samples. Raises ValueError for
    a ratio < 2.
    """
    if ratio < 2:
        raise ValueError(f"ratio must be an integer >= 2, got {ratio}")
    high_rate = low_rate * ratio
    f_pass = PASSBAND_FRACTION * low_rate
    f_stop = STOPBAND_FRACTION * low_rate
    atten = STOPBAND_ATTENUATION_DB
    dw = 2 * math.pi * (f_stop - f_pass) / high_rate
    order = math.ceil((atten - 7.95) / (2.285 * dw))
    half = -(-order // (2 * ratio))
    n_taps = 2 * half * ratio + 1
    beta = 0.1102 * (atten - 8.7)
    cutoff = (f_pass + f_stop) / 2 / high_rate  # cycles per sample at the high rate
    t = np.arange(n_taps) - (n_taps - 1) / 2
    taps = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n_taps, beta)
    taps /= taps.sum()
    taps.setflags(write=False)
    return LowpassDesign(taps, ratio, half, high_rate)


_LO, _HI = np.float32(INT16_MIN), np.float32(INT16_MAX)
_F32 = np.dtype(np.float32)


def _to_int16(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Round float32 samples `y` into int16 `out` with saturation (in place on `y`)."""
    np.rint(y, out=y)
    np.minimum(y, _HI, out=y)
    np.maximum(y, _LO, out=y)
    out[...] = y
    return out


class _History:
    """Channel-major float32 buffer: `keep` samples of history, then room for the input.

    Windows over it are built with the ndarray constructor (a strided view, ~0.3 us) rather
    than `sliding_window_view`, whose Python overhead costs more than the filter itself.
    """

    def __init__(self, keep: int, channels: int) -> None:
        self.keep = keep
        self.buf = np.zeros((channels, keep + 960), dtype=np.float32)

    def fill(self, pcm: np.ndarray) -> int:
        """Append `pcm` (int16, (n, channels)) after the history; returns history + n."""
        need: int = self.keep + pcm.shape[0]
        if self.buf.shape[1] < need:
            grown = np.zeros((self.buf.shape[0], need), dtype=np.float32)
            grown[:, : self.keep] = self.buf[:, : self.keep]
            self.buf = grown
        self.buf[:, self.keep : need] = pcm.T
        return need

    def windows(self, start: int, count: int, length: int, step: int) -> np.ndarray:
        """View (channels, count, length): window k of channel c is buf[c, start + k*step :][:length]."""
        buf = self.buf
        row = buf.strides[0]
        return np.ndarray((buf.shape[0], count, length), _F32, buf, start * 4, (row, step * 4, 4))

    def advance(self, n: int) -> None:
        """Keep the last `keep` samples (of history + the n just filled) as the new history."""
        self.buf[:, : self.keep] = self.buf[:, n : n + self.keep]

    def reset(self) -> None:
        self.buf[:, : self.keep] = 0


class _Interpolator:
    """Streaming upsampler by L: polyphase FIR over a float32 history of K - 1 input samples.

    Output sample m*L + p = L * sum_q h[q*L + p] x[m - q]: all n*L outputs of a call are one
    (channels*n, K) @ (K, L) product of the input's sliding windows with the phase bank.
    """

    def __init__(self, design: LowpassDesign, channels: int) -> None:
        L = design.ratio
        h = design.taps
        K = -(-len(h) // L)  # taps per phase
        padded = np.zeros(K * L)
        padded[: len(h)] = h * L  # gain L restores the level lost to zero stuffing
        # bank[i, p] = L * h[(K - 1 - i) * L + p]: window element i meets phase p
        self._bank = np.ascontiguousarray(padded.reshape(K, L)[::-1], dtype=np.float32)
        self._L, self._K, self._channels = L, K, channels
        self._hist = _History(K - 1, channels)
        self.delay = design.half * L  # output samples

    def reset(self) -> None:
        self._hist.reset()

    def tail_input(self) -> int:
        """Input samples of silence that push the last real sample out of the filter."""
        return self.delay // self._L

    def process(self, pcm: np.ndarray) -> np.ndarray:
        n = pcm.shape[0]
        L, K, C = self._L, self._K, self._channels
        hist = self._hist
        hist.fill(pcm)
        windows = hist.windows(0, n, K, 1)  # (C, n, K)
        y = np.dot(windows[0] if C == 1 else windows.reshape(C * n, K), self._bank)  # (C*n, L)
        out = np.empty((n * L, C), dtype=np.int16)
        if C == 1:
            _to_int16(y, out.reshape(n, L))
        else:  # y is (C*n, L) channel-major; out is (n*L, C) interleaved
            _to_int16(y.reshape(C, n, L), out.reshape(n, L, C).transpose(2, 0, 1))
        hist.advance(n)
        return out


class _Decimator:
    """Streaming downsampler by M: the FIR evaluated only at every M-th input sample.

    Output k = sum_j h[j] x[k*M - j]; the windows ending at those samples are a strided view
    of the float32 history (N - 1 samples) + input, reduced by one matrix-vector product.
    `phase` (input samples so far, mod M) carries across calls, so any frame size works.
    """

    def __init__(self, design: LowpassDesign, channels: int) -> None:
        self._taps = np.ascontiguousarray(design.taps[::-1], dtype=np.float32)
        self._M, self._N, self._channels = design.ratio, len(design.taps), channels
        self._hist = _History(self._N - 1, channels)
        self.phase = 0
        self.delay = design.half  # output samples

    def reset(self) -> None:
        self._hist.reset()
        self.phase = 0

    def tail_input(self) -> int:
        return self.delay * self._M

    def first_output(self) -> int:
        """Offset, within the next input, of the sample that completes the next output."""
        return -self.phase % self._M

    def process(self, pcm: np.ndarray) -> np.ndarray:
        n = pcm.shape[0]
        M, N, C = self._M, self._N, self._channels
        first = -self.phase % M
        count = (n - first + M - 1) // M if n > first else 0
        hist = self._hist
        hist.fill(pcm)
        windows = hist.windows(first, count, N, M)  # (C, count, N)
        y = np.dot(windows[0] if C == 1 else windows.reshape(C * count, N), self._taps)
        out = np.empty((count, C), dtype=np.int16)
        _to_int16(y.reshape(C, count), out.T)
        hist.advance(n)
        self.phase = (self.phase + n) % M
        return out


@functools.lru_cache(maxsize=16)
def soxr_latency(in_rate: int, out_rate: int, channels: int = 1) -> int:
    """Mean output held back by a soxr HQ stream fed 20 ms chunks, in output samples.

    soxr compensates its filter's group delay itself (output sample 0 is input sample 0) but
    withholds output until it has a block: `ResampleStream.delay()` (pending output) saws
    between a few ms and a whole chunk. The mean over 1 s of 20 ms chunks is the latency
    this stage adds on average (about 11 ms for 44.1 -> 48 kHz).
    """
    stream = soxr.ResampleStream(in_rate, out_rate, channels, dtype="int16", quality=SOXR_QUALITY)
    chunk = np.zeros((in_rate // 50, channels), dtype=np.int16)
    pending = []
    for _ in range(50):
        stream.resample_chunk(chunk)
        pending.append(stream.delay())
    return round(float(np.mean(pending[5:])))


@attrs.define(eq=False)
class Resampler:
    """One stream's sample-rate converter: PCM16 `in_rate` -> `out_rate` Hz, `channels` wide.

    Integer ratios (2, 3, 6: 8 <-> 16 <-> 48 kHz, or any rate pair with an integer ratio) use
    the low-delay polyphase FIR of this module: every call returns exactly
    `n * out_rate / in_rate` samples when that is whole (always for upsampling; for
    downsampling when the samples fed so far are a multiple of the ratio, otherwise the
    fraction is carried to the next call). Other ratios use `soxr.ResampleStream` (HQ), whose
    output count per call varies and may be 0. Equal rates pass frames through.

    State persists across calls and gaps (silence is just input), so there are no clicks at
    frame boundaries. `delay` is the group delay in output samples (for soxr, which aligns its
    output itself, the mean output it holds back: `soxr_latency`). Output timestamps are the
    input timestamp scaled to `out_rate` (FIR) or a running count of output samples (soxr).
    `process` returns [] instead of an empty frame. Raises LocalProtocolError for a frame of
    another rate or channel count.
    """

    in_rate: int
    """Input sample rate, Hz."""
    out_rate: int
    """Output sample rate, Hz."""
    channels: int = 1
    """Channel count, unchanged."""
    input: AudioFormat = attrs.field(init=False)
    output: AudioFormat = attrs.field(init=False)
    delay: int = attrs.field(init=False)
    kind: str = attrs.field(init=False)
    """'identity', 'upsample', 'downsample' (polyphase FIR) or 'soxr'."""
    _impl: _Interpolator | _Decimator | soxr.ResampleStream | None = attrs.field(init=False, default=None)
    _next_ts: int | None = attrs.field(init=False, default=None)
    """FIR: timestamp of the next input sample; soxr: of the next output sample; None before
    the first frame."""

    def __attrs_post_init__(self) -> None:
        if self.in_rate <= 0 or self.out_rate <= 0 or self.channels <= 0:
            raise ValueError(f"rates and channels must be positive: {self.in_rate} -> {self.out_rate} Hz, {self.channels} ch")
        self.input = AudioFormat(Encoding.PCM16, self.in_rate, self.channels)
        self.output = AudioFormat(Encoding.PCM16, self.out_rate, self.channels)
        if self.in_rate == self.out_rate:
            self.kind, self.delay = "identity", 0
        elif self.out_rate % self.in_rate == 0:
            self.kind = "upsample"
            self._impl = _Interpolator(design_lowpass(self.in_rate, self.out_rate // self.in_rate), self.channels)
            self.delay = self._impl.delay
        elif self.in_rate % self.out_rate == 0:
            self.kind = "downsample"
            self._impl = _Decimator(design_lowpass(self.out_rate, self.in_rate // self.out_rate), self.channels)
            self.delay = self._impl.delay
        else:
            self.kind = "soxr"
            self._impl = self._new_soxr()
            self.delay = soxr_latency(self.in_rate, self.out_rate, self.channels)

    def _new_soxr(self) -> soxr.ResampleStream:
        return soxr.ResampleStream(self.in_rate, self.out_rate, self.channels, dtype="int16", quality=SOXR_QUALITY)

    @property
    def ratio(self) -> tuple[int, int]:
        """(L, M): the output rate is in_rate * L / M, reduced."""
        g = math.gcd(self.in_rate, self.out_rate)
        return self.out_rate // g, self.in_rate // g

    def process(self, frame: Frame) -> list[AudioFrame]:
        frame = check_pcm(frame, self.input, "Resampler")
        impl = self._impl
        if impl is None:
            return [frame]
        if isinstance(impl, soxr.ResampleStream):
            if self._next_ts is None:
                self._next_ts = frame.timestamp * self.out_rate // self.in_rate
            return self._soxr_out(impl.resample_chunk(np.ascontiguousarray(frame.pcm)))
        self._next_ts = frame.timestamp + frame.pcm.shape[0]  # next input timestamp
        return self._fir(impl, frame.pcm, frame.timestamp)

    def _fir(self, impl: _Interpolator | _Decimator, pcm: np.ndarray, timestamp: int) -> list[AudioFrame]:
        if isinstance(impl, _Interpolator):
            ts = timestamp * (self.out_rate // self.in_rate)
        else:
            ts = (timestamp + impl.first_output()) // (self.in_rate // self.out_rate)
        if pcm.shape[0] == 0:
            return []
        y = impl.process(pcm)
        return [AudioFrame(y, self.out_rate, ts)] if y.shape[0] else []

    def _soxr_out(self, y: np.ndarray) -> list[AudioFrame]:
        if y.shape[0] == 0:
            return []
        ts = self._next_ts or 0
        self._next_ts = ts + y.shape[0]
        return [AudioFrame(y.reshape(-1, self.channels), self.out_rate, ts)]

    def flush(self) -> list[AudioFrame]:
        """End of stream: return the filter's tail (about `delay` output samples, the end of
        the signal still inside the filter), then reset to a fresh stream."""
        impl = self._impl
        if impl is None or self._next_ts is None:
            return []
        if isinstance(impl, soxr.ResampleStream):
            out = self._soxr_out(impl.resample_chunk(np.zeros((0, self.channels), np.int16), last=True))
            self._impl = self._new_soxr()
        else:
            zeros = np.zeros((impl.tail_input(), self.channels), dtype=np.int16)
            out = self._fir(impl, zeros, self._next_ts)
            impl.reset()
        self._next_ts = None
        return out
