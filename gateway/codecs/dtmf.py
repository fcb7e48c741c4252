"""DTMF keys and tones, pure numpy: the key table, the tone generator, a Goertzel detector.

Sources: ITU-T Q.23 (the 4 x 4 frequency matrix: a key is one low-group and one high-group
frequency sent together), ITU-T Q.24 (what receivers accept: about 40 ms of tone and 40 ms of
pause at the least, level within roughly -3 to -25 dBm0 per frequency), ITU-T G.711 (the
level of a full-scale sine: +3.17 dBm0 for μ-law), RFC 4733 §3.2 (event codes 0-15 of the
sixteen keys, used on RTP).

The generator is for the sln encapsulation, where a key press can only travel in-band: the
tone pair at -10 dBm0 per frequency (`TONE_LEVEL_DBM0`) for the press's duration, then at
least `MIN_PAUSE_MS` of silence so the next press is heard as a new key. Each frequency is
shaped by a short raised-cosine ramp (`RAMP_MS`) at both ends, so the tone starts and stops
without a click that would spread energy over the other DTMF frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_DURATION_MS",
    "FREQUENCIES",
    "FULL_SCALE_DBM0",
    "HIGH_GROUP_HZ",
    "KEYS",
    "LOW_GROUP_HZ",
    "MAX_DURATION_MS",
    "MIN_DURATION_MS",
    "MIN_PAUSE_MS",
    "RAMP_MS",
    "TONE_LEVEL_DBM0",
    "dtmf_key",
    "duration_ms_of",
    "goertzel_power",
    "tone",
]

#: The sixteen keys in RFC 4733 event-code order (§3.2): "0"-"9" are 0-9, "*" 10, "#" 11,
#: "A"-"D" 12-15. ``KEYS.index(key)`` is the key's event code.
KEYS = "0123456789*#ABCD"
LOW_GROUP_HZ = (697, 770, 852, 941)  # rows of the keypad (ITU-T Q.23)
HIGH_GROUP_HZ = (1209, 1336, 1477, 1633)  # columns of the keypad (ITU-T Q.23)
_KEYPAD = ("123A", "456B", "789C", "*0#D")  # rows: low group; columns: high group
#: Each key's (low-group Hz, high-group Hz) pair.
FREQUENCIES: dict[str, tuple[int, int]] = {
    key: (LOW_GROUP_HZ[row], HIGH_GROUP_HZ[column])
    for row, keys in enumerate(_KEYPAD)
    for column, key in enumerate(keys)
}

TONE_LEVEL_DBM0 = -10.0  # dBm0 per frequency (within Q.24's accepted range, the usual send level)
FULL_SCALE_DBM0 = 3.17  # dBm0 of a full-scale sine in G.711 μ-law (its digital milliwatt is 0 dBm0)
MIN_PAUSE_MS = 50  # ms of silence after every tone (Q.24 receivers need about 40 ms between keys)
RAMP_MS = 2  # ms of raised-cosine rise and fall at each end of a tone (inside its duration)
DEFAULT_DURATION_MS = 100  # ms of tone when a press names no duration
MIN_DURATION_MS = 40  # ms: shorter presses are lengthened (Q.24 receivers may ignore less)
MAX_DURATION_MS = 8000  # ms: longer presses are shortened (RFC 4733's 16-bit duration: 8.19 s at 8 kHz)


def dtmf_key(value: Any) -> str | None:
    """The DTMF key `value` names, or None when it names none.

    A key is one character of `KEYS`; lower-case "a"-"d" are taken for "A"-"D". Anything
    else (a longer string, a number, None) gives None: the caller logs it and ignores it."""
    if isinstance(value, str) and len(value) == 1:
        key = value.upper()
        if key in KEYS:
            return key
    return None


def duration_ms_of(value: Any) -> int:
    """A press duration in ms from an event's optional ``duration_ms`` field: a number,
    clamped to `MIN_DURATION_MS`..`MAX_DURATION_MS`; `DEFAULT_DURATION_MS` when absent or
    not a number (a bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DEFAULT_DURATION_MS
    return int(min(MAX_DURATION_MS, max(MIN_DURATION_MS, round(value))))


def tone(
    key: str,
    duration_ms: int = DEFAULT_DURATION_MS,
    *,
    rate: int = 8000,
    level_dbm0: float = TONE_LEVEL_DBM0,
    pause_ms: int = MIN_PAUSE_MS,
    frame_samples: int | None = None,
) -> np.ndarray:
    """One key press as int16 PCM at `rate` Hz, mono, shape (samples,).

    The key's two Q.23 frequencies, each a sine at `level_dbm0` (dBm0 per frequency, G.711
    μ-law scale: a full-scale sine is `FULL_SCALE_DBM0`), for `duration_ms`, then `pause_ms`
    of digital silence. With `frame_samples`, the pause is lengthened so the whole press is a
    whole number of frames (the caller sends it frame by frame). Raises ValueError for a
    `key` that is not one of `KEYS` (see `dtmf_key`) or a duration that is not positive.
    """
    if key not in FREQUENCIES:
        raise ValueError(f"not a DTMF key: {key!r} (expected one of {KEYS})")
    if duration_ms <= 0 or pause_ms < 0:
        raise ValueError(f"tone needs a positive duration and no negative pause, got {duration_ms} ms, {pause_ms} ms")
    on = rate * duration_ms // 1000
    total = on + rate * pause_ms // 1000
    if frame_samples:
        total = -(-total // frame_samples) * frame_samples
    amplitude = 32768.0 * 10 ** ((level_dbm0 - FULL_SCALE_DBM0) / 20)
    t = np.arange(on) / rate
    low, high = FREQUENCIES[key]
    signal = amplitude * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    ramp = min(rate * RAMP_MS // 1000, on // 2)
    if ramp:
        shape = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        signal[:ramp] *= shape
        signal[on - ramp :] *= shape[::-1]
    out = np.zeros(total, dtype=np.int16)
    out[:on] = np.clip(np.round(signal), -32768, 32767).astype(np.int16)
    return out


def goertzel_power(pcm: np.ndarray, frequency: float, rate: int = 8000) -> float:
    """Power of `pcm` (int16 or float, mono) at `frequency` Hz: |X(f)|² of the whole block,
    the single DFT term at exactly `frequency` that the Goertzel algorithm computes (here one
    numpy dot product, no Python loop over samples), normalised by the block length squared,
    so a sine of amplitude A gives about A²/4 whatever the length (an empty block: 0.0)."""
    x = np.asarray(pcm, dtype=np.float64).reshape(-1)
    n = x.size
    if n == 0:
        return 0.0
    phase = np.exp(-2j * np.pi * frequency * np.arange(n) / rate)
    value = np.dot(x, phase)
    return float(abs(value) ** 2) / (n * n)
