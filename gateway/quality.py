"""How close received audio is to what was sent, as numbers: the demo's speech-similarity
figures and the tests' checks (a broken path, noise, a wrong byte order or rate, scores near 0).

Shapes: int16 (or float) arrays of shape (samples,) or (samples, channels) with their rate in Hz;
stereo is averaged to mono. Cross-correlation by FFT (numpy); resampling with soxr.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import soxr


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM16 WAV file: int16 (samples, channels) and the rate in Hz."""
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return data, w.getframerate()


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    """Write int16 `pcm` (samples[, channels]) at `rate` Hz as a PCM16 WAV file."""
    pcm = pcm.reshape(pcm.shape[0], -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def best_alignment(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int, max_lag_s: float = 1.0) -> tuple[float, float]:
    """Normalized correlation of `received` with `reference` (mono float) at the best lag.

    The reference is resampled to `rate`; returns (correlation in [-1, 1], lag in seconds by
    which `received` trails the reference). A broken path (noise, wrong byte order, wrong
    rate, silence) gives a correlation near 0.
    """
    ref = reference.astype(np.float64)
    if ref.ndim > 1:
        ref = ref.mean(axis=1)
    got = received.astype(np.float64)
    if got.ndim > 1:
        got = got.mean(axis=1)
    if ref_rate != rate:
        ref = soxr.resample(ref, ref_rate, rate, quality="VHQ")
    max_lag = int(max_lag_s * rate)
    n = len(ref) + len(got)
    size = 1 << (n - 1).bit_length()
    spectrum = np.fft.rfft(got, size) * np.conj(np.fft.rfft(ref, size))
    xcorr = np.fft.irfft(spectrum, size)
    # lags -max_lag..max_lag: negative when the received audio starts later in the speech
    candidates = np.concatenate([xcorr[size - max_lag :], xcorr[: max_lag + 1]])
    lag = int(np.argmax(candidates)) - max_lag
    if lag >= 0:
        overlap = min(len(ref), len(got) - lag)
        a, b = ref[:overlap], got[lag : lag + overlap]
    else:
        overlap = min(len(ref) + lag, len(got))
        a, b = ref[-lag : -lag + overlap], got[:overlap]
    if overlap <= 0:
        return 0.0, lag / rate
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return (float(np.dot(a, b) / denom) if denom else 0.0), lag / rate


def active_duration(pcm: np.ndarray, rate: int, threshold_db: float = -50.0) -> float:
    """Seconds between the first and last 10 ms block louder than `threshold_db` dBFS."""
    x = pcm.astype(np.float64)
    if x.ndim > 1:
        x = x.mean(axis=1)
    block = rate // 100
    blocks = x[: len(x) // block * block].reshape(-1, block)
    level = 10 * np.log10(np.mean(blocks**2, axis=1) / 32768.0**2 + 1e-20)
    loud = np.nonzero(level > threshold_db)[0]
    if len(loud) == 0:
        return 0.0
    return (loud[-1] - loud[0] + 1) / 100


def blockwise_alignment(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int,
                        block_s: float = 0.25, search_s: float = 0.1) -> list[float]:
    """Correlation of each speech block of the reference with the received audio, each at its
    own best lag within ±`search_s` of the overall lag.

    A live path may conceal a late packet or shorten a pause to win back latency (a shift of a
    few ms mid-stream); per block such a shift costs one block, while noise, wrong byte order or
    a wrong rate fail every block, and a speech block the received audio does not reach (its
    head or tail missing) scores 0. Pauses of the reference are not scored.
    """
    ref = reference.astype(np.float64)
    ref = ref.mean(axis=1) if ref.ndim > 1 else ref
    got = received.astype(np.float64)
    got = got.mean(axis=1) if got.ndim > 1 else got
    if ref_rate != rate:
        ref = soxr.resample(ref, ref_rate, rate, quality="VHQ")
    _, lag_s = best_alignment(ref, rate, got, rate)
    base, search, block = int(lag_s * rate), int(search_s * rate), int(block_s * rate)
    threshold = 0.3 * np.sqrt(np.mean(ref**2))  # speech, not breath or room noise
    scores = []
    for start in range(0, len(ref) - block + 1, block):
        a = ref[start : start + block]
        if np.sqrt(np.mean(a**2)) < threshold:
            continue  # a pause: nothing to compare
        if start + base + search < 0 or start + base - search + block > len(got):
            scores.append(0.0)  # before or after what was received: that speech is missing
            continue
        lo = max(0, start + base - search)
        window = got[lo : start + base + search + block]
        if len(window) < block:
            scores.append(0.0)
            continue
        frames = np.lib.stride_tricks.sliding_window_view(window, block)
        dots = frames @ a
        norms = np.sqrt(np.einsum("ij,ij->i", frames, frames) * np.dot(a, a)) + 1e-9
        scores.append(float(np.max(dots / norms)))
    return scores
