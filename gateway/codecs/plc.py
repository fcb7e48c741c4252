"""Packet loss concealment for G.711 speech: waveform repeat after ITU-T G.711 Appendix I.

ITU-T G.711 Appendix I (09/99), "A high quality low-complexity algorithm for packet loss
concealment with G.711" (reference code: ITU-T G.191 STL, g711iplc/lowcfe.c), for PCM16 mono at
8 kHz, implemented with numpy slices (no per-sample Python loop). The algorithm works in 10 ms
units (UNIT, 80 samples) whatever the packet size; a 20 ms packet is two.

- History: the last HISTORY_LEN samples (48.75 ms = 3 × PITCH_MAX + POVERLAP_MAX) of the
  signal, real and synthetic. Output is delayed by DELAY = POVERLAP_MAX samples (3.75 ms), so
  the tail that an erasure's start modifies has not been played yet.
- Start of an erasure: the pitch period P (5-15 ms: 40-120 samples) is found by normalized
  cross-correlation of the last 20 ms with the history (coarse search at 2:1 decimation, then
  ±1 sample at full rate). The pitch buffer starts as the last period; its last P/4 samples
  are cross-faded (overlap-add, triangular windows) into the samples one period earlier, so
  repeating the period joins without a step, and that cross-fade replaces the not-yet-played
  tail of the history.
- During the erasure the pitch buffer is repeated. At 10 ms and 20 ms one more period is added
  (up to 3 periods, so a long loss does not buzz), joined by a P/4 overlap-add with where the
  repetition was. From 10 ms on the synthetic signal is attenuated linearly by 20 % per 10 ms;
  at 60 ms it is silence.
- First good frame after an erasure: its start is overlap-added with the continuing synthetic
  signal (scaled by the attenuation reached) over P/4 + 4 ms per further 10 ms erased, at most
  10 ms, so it joins without a click (after 60 ms of loss this is a fade-in from silence).

Per call: `good(pcm)` for each received frame returns the frame to play, `conceal(samples)` for
each lost one returns its synthetic replacement; both return exactly as many samples as they
were given or asked for, DELAY samples late (the first call's output starts with DELAY samples
of silence; `flush()` returns the DELAY samples still held at the end). One object per stream.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DELAY", "G711Plc", "find_pitch"]

RATE = 8000  # Hz
UNIT = 80  # samples: 10 ms, the algorithm's frame (erasure count, attenuation, join growth)
PITCH_MIN = 40  # samples: 5 ms, 200 Hz
PITCH_MAX = 120  # samples: 15 ms, 66.7 Hz
PITCH_DIFF = PITCH_MAX - PITCH_MIN
POVERLAP_MAX = PITCH_MAX >> 2  # samples: the longest start-of-erasure overlap-add (P/4)
HISTORY_LEN = 3 * PITCH_MAX + POVERLAP_MAX  # samples: 390, 48.75 ms
DELAY = POVERLAP_MAX  # samples of output delay: 30, 3.75 ms
CORR_LEN = 160  # samples: 20 ms correlation window of the pitch search
CORR_BUF_LEN = CORR_LEN + PITCH_MAX  # samples searched
CORR_MIN_POWER = 250.0  # energy floor of the normalization (silence does not look periodic)
NDEC = 2  # decimation of the coarse pitch search
EOVERLAP_INCR = 32  # samples (4 ms) the end overlap-add grows per further 10 ms erased
ATTENUATION = 0.2  # fraction of full level lost per 10 ms, from the second 10 ms on
SILENT_AFTER = UNIT + int(round(UNIT / ATTENUATION))  # samples: 480 (60 ms), then silence


_RAMPS = {n: np.arange(1, n + 1, dtype=np.float64) / n for n in range(1, UNIT + 1)}
_GAIN = np.clip(1.0 - (np.arange(SILENT_AFTER, dtype=np.float64) - UNIT) * (ATTENUATION / UNIT), 0.0, 1.0)
"""Level of the synthetic signal, sample t of an erasure: full for 10 ms, then -20 % per 10 ms."""


def _ramp(count: int) -> np.ndarray:
    """Rising overlap-add weights (i + 1) / count, i = 0..count-1 (the falling one is 1 - it)."""
    return _RAMPS[count] if count in _RAMPS else np.arange(1, count + 1, dtype=np.float64) / count


def _to_int16(x: np.ndarray) -> np.ndarray:
    """Truncate towards zero (the reference's cast to short) and clip to int16."""
    x = np.trunc(x)
    clipped: np.ndarray = np.minimum(np.maximum(x, -32768.0, out=x), 32767.0, out=x)
    return clipped


def find_pitch(history: np.ndarray) -> int:
    """Pitch period in samples (PITCH_MIN..PITCH_MAX) of the end of `history` (float, at least
    CORR_BUF_LEN samples at 8 kHz): the lag whose segment best matches the last CORR_LEN
    samples by normalized cross-correlation (G.711 Appendix I, coarse 2:1 then fine search)."""
    target = history[-CORR_LEN:]
    region = history[-CORR_BUF_LEN:]  # region[j + i] is compared with target[i]; lag = PITCH_MAX - j
    # coarse: even offsets j, every other sample
    coarse = region[::NDEC]
    tap = target[::NDEC]
    lags = PITCH_DIFF // NDEC + 1
    corr = np.correlate(coarse, tap, "valid")[:lags]
    energy_sums = np.concatenate(([0.0], np.cumsum(coarse * coarse)))
    energy = energy_sums[len(tap) : len(tap) + lags] - energy_sums[:lags]
    score = corr / np.sqrt(np.maximum(energy, CORR_MIN_POWER))
    best = (lags - 1 - int(np.argmax(score[::-1]))) * NDEC  # the last of equal maxima (">=")
    # fine: the offsets around it, every sample (at most NDEC * 2 - 1 of them)
    lo, hi = max(0, best - (NDEC - 1)), min(PITCH_DIFF, best + (NDEC - 1))
    best_fine, best_score = lo, -np.inf
    for j in range(lo, hi + 1):
        window = region[j : j + CORR_LEN]
        score = float(np.dot(window, target)) / np.sqrt(max(float(np.dot(window, window)), CORR_MIN_POWER))
        if score > best_score:  # the first of equal maxima (">")
            best_fine, best_score = j, score
    return PITCH_MAX - best_fine


class G711Plc:
    """Waveform-repeat concealment for one 8 kHz PCM16 mono stream (module docstring).

    `good(pcm)` and `conceal(samples)` return int16 arrays of shape (samples, 1), as
    `AudioFrame.pcm`, DELAY samples behind their input. Pure: no clock, no I/O.
    """

    delay = DELAY
    """Samples by which the output trails the input (3.75 ms at 8 kHz)."""

    __slots__ = ("_history", "_erased", "_pitchbuf", "_pitch", "_poverlap", "_blen", "_poffset", "_lastq",
                 "_tail")

    def __init__(self) -> None:
        self._history = np.zeros(HISTORY_LEN, dtype=np.float64)  # integral values (int16 range)
        self._erased = 0  # samples concealed in the current erasure (0: none going on)
        self._pitchbuf = np.zeros(HISTORY_LEN, dtype=np.float64)
        self._pitch = PITCH_MAX
        self._poverlap = POVERLAP_MAX
        self._blen = PITCH_MAX  # samples of the pitch buffer in use (1, 2 or 3 periods)
        self._poffset = 0  # read position in the pitch buffer
        self._lastq = np.zeros(POVERLAP_MAX, dtype=np.float64)  # the history's tail before the erasure
        self._tail: np.ndarray | None = None  # old continuation to cross-fade after adding a period

    @property
    def erased_ms(self) -> float:
        """Milliseconds concealed in the current erasure (0 after a good frame)."""
        return self._erased * 1000 / RATE

    def good(self, pcm: np.ndarray) -> np.ndarray:
        """A received frame (int16, shape (n,) or (n, 1)): returns the n samples to play,
        DELAY samples late; right after an erasure the frame's start is overlap-added with the
        synthetic signal (module docstring)."""
        x = np.asarray(pcm).reshape(-1).astype(np.float64)
        if self._erased:
            units = -(-self._erased // UNIT)
            olen = min(self._poverlap + (units - 1) * EOVERLAP_INCR, UNIT, len(x))
            if olen > 0:
                synthetic = self._read(olen)
                gain = max(0.0, 1.0 - (units - 1) * ATTENUATION)
                rise = _ramp(olen)
                x[:olen] = _to_int16((1.0 - rise) * gain * synthetic + rise * x[:olen])
            self._erased = 0
            self._tail = None
        return self._save(x)

    def conceal(self, samples: int) -> np.ndarray:
        """`samples` of synthetic signal for a lost frame (module docstring), DELAY late."""
        out = np.empty(samples, dtype=np.float64)
        pos = 0
        while pos < samples:
            erased = self._erased
            if erased == 0:
                self._begin()
            elif erased in (UNIT, 2 * UNIT):
                self._add_period()
            end = UNIT if erased < UNIT else 2 * UNIT if erased < 2 * UNIT else erased + samples - pos
            count = min(samples - pos, end - erased)
            if erased >= SILENT_AFTER:
                chunk = np.zeros(count)
            else:
                chunk = self._read(count)
                if self._tail is not None:  # a period was just added: fade from where we were
                    m = min(len(self._tail), count)
                    rise = _ramp(m)
                    chunk[:m] = (1.0 - rise) * self._tail[:m] + rise * chunk[:m]
                    self._tail = None
                gain = _GAIN[erased : erased + count]
                chunk[: len(gain)] *= gain
                chunk[len(gain) :] = 0.0
            out[pos : pos + count] = _to_int16(chunk)
            self._erased += count
            pos += count
        return self._save(out)

    def flush(self) -> np.ndarray:
        """The DELAY samples still held back (end of the stream), shape (DELAY, 1)."""
        tail = self._history[-DELAY:].astype(np.int16).reshape(-1, 1)
        self._history = np.zeros(HISTORY_LEN, dtype=np.float64)
        self._erased = 0
        self._tail = None
        return tail

    # ---------------------------------------------------------------------------- internals
    def _save(self, x: np.ndarray) -> np.ndarray:
        """Append `x` to the history; return the len(x) samples that end DELAY before its end."""
        n = len(x)
        joined = np.concatenate((self._history, x))
        end = len(joined) - DELAY
        out = joined[end - n : end].astype(np.int16).reshape(-1, 1)
        self._history = joined[-HISTORY_LEN:].copy()
        return out

    def _read(self, count: int) -> np.ndarray:
        """`count` samples from the pitch buffer, repeating it; advances the read position."""
        start = HISTORY_LEN - self._blen
        index = (self._poffset + np.arange(count)) % self._blen
        self._poffset = (self._poffset + count) % self._blen
        return self._pitchbuf[start + index]

    def _cross_fade_tail(self) -> None:
        """The pitch buffer's last P/4 samples: from the original tail into the samples just
        before the buffer's start (so the repetition wraps without a step)."""
        povl = self._poverlap
        start = HISTORY_LEN - self._blen
        rise = _ramp(povl)
        self._pitchbuf[-povl:] = (1.0 - rise) * self._lastq[:povl] + rise * self._pitchbuf[start - povl : start]

    def _begin(self) -> None:
        """Start of an erasure: pitch, a one-period buffer, and the cross-faded history tail."""
        self._pitchbuf = self._history.copy()
        self._pitch = find_pitch(self._pitchbuf)
        self._poverlap = self._pitch >> 2
        self._lastq = self._pitchbuf[-self._poverlap :].copy()
        self._blen = self._pitch
        self._poffset = 0
        self._tail = None
        self._cross_fade_tail()
        self._history[-self._poverlap :] = _to_int16(self._pitchbuf[-self._poverlap :])

    def _add_period(self) -> None:
        """10 ms and 20 ms into the erasure: one more period in the buffer, same phase."""
        saved = self._poffset
        self._tail = self._read(self._poverlap)  # where the old buffer would have gone on
        self._poffset = saved
        while self._poffset > self._pitch:
            self._poffset -= self._pitch
        self._blen += self._pitch
        self._cross_fade_tail()
