"""How close received audio is to what was sent, as numbers: the demo's speech-similarity
figures and the tests' checks (a broken path, noise, a wrong byte order or rate, scores near 0).

Two per-block checks: `blockwise_alignment` correlates the waveforms (for paths that keep
them: G.711, PCM, Opus at 48 kHz from a 48 kHz source); `spectral_alignment` correlates
short-time log-magnitude spectra, which a parametric codec keeps when the waveform is not
(Opus's SILK: an 8 or 16 kHz call published to Argon).

Shapes: int16 (or float) arrays of shape (samples,) or (samples, channels) with their rate in Hz;
stereo is averaged to mono. Cross-correlation by FFT (numpy); resampling with soxr.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import NamedTuple

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


def _speech_blocks(ref: np.ndarray, block: int) -> list[int]:
    """Start indices of the `block`-sample blocks of mono `ref` that are speech: RMS at least
    0.3 times the whole reference's (not breath or room noise); pauses are not scored."""
    threshold = 0.3 * np.sqrt(np.mean(ref**2))
    return [start for start in range(0, len(ref) - block + 1, block)
            if np.sqrt(np.mean(ref[start : start + block] ** 2)) >= threshold]


class BlockScore(NamedTuple):
    """One speech block of the reference, as `blockwise_blocks` and `spectral_blocks` found it."""

    score: float
    """Similarity, in [-1, 1] (0.0 for a block the received audio does not reach)."""
    at_s: float
    """Where in the received audio the block starts, in seconds from its first sample: at its
    best lag, or for a block it does not reach, at the overall lag."""


def blockwise_alignment(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int,
                        block_s: float = 0.25, search_s: float = 0.1) -> list[float]:
    """The scores of `blockwise_blocks`."""
    return [b.score for b in blockwise_blocks(reference, ref_rate, received, rate, block_s, search_s)]


def blockwise_blocks(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int,
                     block_s: float = 0.25, search_s: float = 0.1) -> list[BlockScore]:
    """Correlation of each speech block of the reference with the received audio, each at its
    own best lag within ±`search_s` of the overall lag, and where the block was found.

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
    scores = []
    for start in _speech_blocks(ref, block):
        a = ref[start : start + block]
        expected = (start + base) / rate
        if start + base + search < 0 or start + base - search + block > len(got):
            scores.append(BlockScore(0.0, expected))  # before or after what was received: that speech is missing
            continue
        lo = max(0, start + base - search)
        window = got[lo : start + base + search + block]
        if len(window) < block:
            scores.append(BlockScore(0.0, expected))
            continue
        frames = np.lib.stride_tricks.sliding_window_view(window, block)
        dots = frames @ a
        norms = np.sqrt(np.einsum("ij,ij->i", frames, frames) * np.dot(a, a)) + 1e-9
        best = int(np.argmax(dots / norms))
        scores.append(BlockScore(float(dots[best] / norms[best]), (lo + best) / rate))
    return scores


SPECTRAL_RATE = 8000  # Hz: `spectral_alignment` compares both signals resampled to this
SPECTRAL_BAND = (200.0, 3400.0)  # Hz: the telephone band, the one every path keeps
SPECTRAL_FRAME_S = 0.032  # s: 256-sample Hann frames at SPECTRAL_RATE (31.25 Hz bins)
SPECTRAL_HOP_S = 0.004  # s: frame step, the lag resolution of `spectral_alignment`
SPECTRAL_FLOOR = 1e-5  # power floor, relative to each signal's mean frame power (-50 dB)
#: A `spectral_alignment` block above this is the reference's speech: intact narrowband SILK
#: scores 0.88 and up, a broken path at most one block in 14 (`blockwise_alignment`'s is 0.9).
SPECTRAL_FOUND = 0.8


def log_spectrogram(pcm: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Short-time log-magnitude spectrum of `pcm` (int16 or float, (samples,) or (samples,
    channels), averaged to mono) at `rate` Hz: (log10 power, float64 array of shape (frames,
    bins): row k for the SPECTRAL_FRAME_S Hann frame that starts at k * SPECTRAL_HOP_S (the
    signal padded with silence at the end), its SPECTRAL_BAND bins; the mono signal resampled
    to SPECTRAL_RATE). Powers are floored at SPECTRAL_FLOOR
    times the signal's mean frame power (so quiet frames do not dominate the logarithm) and at
    1e-3 (int16 units squared: digital silence is one constant value)."""
    x = pcm.astype(np.float64)
    x = x.mean(axis=1) if x.ndim > 1 else x
    if rate != SPECTRAL_RATE:
        x = soxr.resample(x, rate, SPECTRAL_RATE, quality="VHQ")
    n, hop = round(SPECTRAL_FRAME_S * SPECTRAL_RATE), round(SPECTRAL_HOP_S * SPECTRAL_RATE)
    padded = np.pad(x, (0, n))  # a frame starts every hop up to the end: row k starts at k * hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n)[::hop] * np.hanning(n)
    freqs = np.fft.rfftfreq(n, 1 / SPECTRAL_RATE)
    band = (freqs >= SPECTRAL_BAND[0]) & (freqs <= SPECTRAL_BAND[1])
    power = np.abs(np.fft.rfft(frames, axis=1)[:, band]) ** 2
    floor = max(SPECTRAL_FLOOR * float(np.mean(power)), 1e-3)
    return np.log10(power + floor), x


def spectral_alignment(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int,
                       block_s: float = 0.25, search_s: float = 0.1, max_lag_s: float = 1.0) -> list[float]:
    """The scores of `spectral_blocks`."""
    return [b.score for b in spectral_blocks(reference, ref_rate, received, rate, block_s, search_s, max_lag_s)]


def spectral_blocks(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int,
                    block_s: float = 0.25, search_s: float = 0.1, max_lag_s: float = 1.0) -> list[BlockScore]:
    """Phase-insensitive speech similarity of each speech block of the reference with the
    received audio: per `block_s` block, the correlation (Pearson, in [-1, 1]) of the two
    short-time log-magnitude spectra (`log_spectrogram`: 32 ms frames every 4 ms, 200-3400
    Hz) over the block, the received one at its best lag within ±`search_s` of the overall
    lag (itself the best of ±`max_lag_s`, from the whole spectrograms).

    `reference` and `received`: int16 or float arrays of shape (samples,) or (samples,
    channels) (averaged to mono) at `ref_rate` and `rate` Hz; any rates (both are resampled
    to 8 kHz). Returns one `BlockScore` per speech block of the reference, in order (where it
    was found: to SPECTRAL_HOP_S); the blocks are
    those `blockwise_alignment` scores (pauses, RMS under 0.3 times the reference's, are
    left out; a block the received audio does not reach scores 0).

    `blockwise_alignment` needs the waveform: it is the stricter check where the path keeps
    it (G.711, PCM, 48 kHz Opus from a 48 kHz source). A parametric codec (Opus's SILK at 8,
    12 or 16 kHz input) keeps what is heard, the spectrum over time, but not the phase; its
    waveform correlation depends on the bitrate (narrowband SILK, or105/or109: 93-100 % of
    blocks above 0.9 at the 24 kb/s an Argon bot asks for, 36 % at libopus's own 8.5 kb/s).
    Measured with real libopus at 8 kHz input and Argon's settings (tests/test_quality.py,
    or105 and or109): intact narrowband speech scores 0.88-0.99 per block (median 0.93; 16
    kHz speech at 16 kHz input, wideband: 0.89 and up). White noise at the speech's level,
    noise with the speech's long-term spectrum, the speech in the wrong byte order, at the
    wrong rate (twice as fast, twice as slow, or read at 24 kHz for 48) and silence score
    medians of 0.00-0.19, and at most one block in 14 above 0.8 (a byte-swapped sample is
    its low byte, noise, plus its sign, clipped speech, which can match the odd block);
    another talker's speech, a median of ~0.28. `blockwise_alignment` on the same broken
    paths: medians of 0.00-0.18.
    """
    ref_spec, ref = log_spectrogram(reference, ref_rate)
    got_spec, _ = log_spectrogram(received, rate)
    hop = round(SPECTRAL_HOP_S * SPECTRAL_RATE)
    # the overall lag, in frames: cross-correlation of the (mean-removed) spectrograms, summed
    # over the bins; positive when the received audio trails the reference
    a, b = ref_spec - ref_spec.mean(), got_spec - got_spec.mean()
    size = 1 << (len(a) + len(b)).bit_length()
    xcorr = np.fft.irfft((np.fft.rfft(b, size, axis=0) * np.conj(np.fft.rfft(a, size, axis=0))).sum(axis=1), size)
    max_lag = round(max_lag_s / SPECTRAL_HOP_S)
    candidates = np.concatenate([xcorr[size - max_lag :], xcorr[: max_lag + 1]])
    base = int(np.argmax(candidates)) - max_lag
    block, search = round(block_s / SPECTRAL_HOP_S), round(search_s / SPECTRAL_HOP_S)
    block_samples = round(block_s * SPECTRAL_RATE)
    scores = []
    for start in _speech_blocks(ref, block_samples):
        first = start // hop
        pattern = ref_spec[first : first + block]
        lo, hi = max(0, first + base - search), min(len(got_spec), first + base + search + block)
        expected = (first + base) * SPECTRAL_HOP_S
        if len(pattern) < block or hi - lo < block:
            scores.append(BlockScore(0.0, expected))  # before or after what was received: that speech is missing
            continue
        pattern = (pattern - pattern.mean()).ravel()
        # every candidate block of the window, flattened: (lags, block * bins)
        windows = np.lib.stride_tricks.sliding_window_view(got_spec[lo:hi], block, axis=0)
        windows = windows.transpose(0, 2, 1).reshape(len(windows), -1)
        windows = windows - windows.mean(axis=1, keepdims=True)
        norms = np.sqrt(np.einsum("ij,ij->i", windows, windows) * np.dot(pattern, pattern))
        dots = windows @ pattern
        similarity = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 0.0)
        best = int(np.argmax(similarity))
        scores.append(BlockScore(float(similarity[best]), (lo + best) * SPECTRAL_HOP_S))
    return scores
