"""What a listener checks, as numbers: does the audio that arrived match what was sent?
(The functions live in gateway/quality.py, which the demo uses too.)"""

import numpy as np
import soxr

from gateway.quality import (
    SPECTRAL_FOUND,
    active_duration,
    best_alignment,
    blockwise_alignment,
    read_wav,
    spectral_alignment,
    write_wav,
)

__all__ = ["SPECTRAL_FOUND", "active_duration", "best_alignment", "blockwise_alignment", "loop_score", "mono",
           "read_wav", "spectral_alignment", "write_wav"]


def mono(pcm: np.ndarray) -> np.ndarray:
    """float64 mono of an int16 (samples,) or (samples, channels) array (channels averaged)."""
    return pcm.astype(np.float64).mean(axis=1) if pcm.ndim > 1 else pcm.astype(np.float64)


def loop_score(clip: np.ndarray, clip_rate: int, received: np.ndarray, rate: int,
               search_s: float = 0.1, *, spectral: bool = False) -> tuple[float, list[float]]:
    """How well `received` matches `clip` played in a loop (a looping file source, Chromium's
    fake microphone), from wherever in the loop it starts: (correlation, per-block scores of
    `blockwise_alignment`, or with `spectral` of `spectral_alignment` (for audio that went
    through a parametric codec: SILK), each block searched within ±`search_s` of the overall
    lag)."""
    ref = mono(clip)
    if clip_rate != rate:
        ref = soxr.resample(ref, clip_rate, rate, quality="VHQ")
    period = len(ref)
    loops = int(np.ceil(len(received) / period)) + 2
    corr, lag = best_alignment(np.tile(ref, loops), rate, received, rate, max_lag_s=1.05 * period / rate)
    phase = round(-lag * rate) % period
    aligned = np.tile(ref, loops + 1)[phase : phase + len(received)]
    corr, _ = best_alignment(aligned, rate, received, rate, max_lag_s=0.1)
    per_block = spectral_alignment if spectral else blockwise_alignment
    return corr, per_block(aligned, rate, received, rate, search_s=search_s)
