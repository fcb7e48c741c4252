"""What a listener checks, as numbers: does the audio that arrived match what was sent?
(The functions live in gateway/quality.py, which the demo uses too.)"""

import numpy as np
import soxr

from gateway.quality import (
    SPECTRAL_FOUND,
    BlockScore,
    active_duration,
    best_alignment,
    blockwise_alignment,
    blockwise_blocks,
    read_wav,
    spectral_alignment,
    spectral_blocks,
    write_wav,
)

__all__ = ["SPECTRAL_FOUND", "STALL_REACH_S", "BlockScore", "active_duration", "assert_blocks_found", "best_alignment",
           "blockwise_alignment", "blockwise_blocks", "loop_score", "mono", "read_wav", "spectral_alignment",
           "spectral_blocks", "write_wav"]

#: s: how long after a starved stretch (`harness.Starvation`) its stall can still show in the
#: audio arriving: the pacers and jitter buffers the speech crosses (20-60 ms each, three or
#: four in a bridge run in one test process) catch up within it.
STALL_REACH_S = 0.25


def assert_blocks_found(blocks: list[BlockScore], found: float, what: str, *, block_s: float = 0.25,
                        starvation=None, timeline=None, offset_s: float = 0.0, share: float = 0.8,
                        min_blocks: int = 3, context: object = "") -> None:
    """At least `share` (and `min_blocks`) of the speech `blocks` (`blockwise_blocks`,
    `spectral_blocks`) score above `found`: but for the ones the machine's stalls could
    reach, which are not judged. A block below `found` whose audio arrived (`timeline`:
    harness.Timeline of the recording, the blocks' received audio starting `offset_s` into
    it) during a stretch in which another process kept the test off the cores
    (`starvation`: harness.Starvation, run beside the test) or within STALL_REACH_S after one
    is excused. Calm (no stretch) every block is judged. Raises AssertionError naming `what`,
    the scores, the excused blocks and the stretches."""
    def reached(block: BlockScore) -> bool:
        if starvation is None or timeline is None or not timeline.times:
            return False
        start, end = offset_s + block.at_s, offset_s + block.at_s + block_s
        return starvation.overlaps(timeline.time_at(start), timeline.time_at(end), STALL_REACH_S)

    excused = [i for i, b in enumerate(blocks) if b.score <= found and reached(b)]
    judged = [b.score for i, b in enumerate(blocks) if i not in excused]
    good = sum(score > found for score in judged)
    stretches = [] if starvation is None else [round(e - s, 3) for s, e in starvation.stretches]
    assert len(judged) >= min_blocks and good >= share * len(judged), (
        f"{what}: blocks {np.round([b.score for b in blocks], 2)}, {good} of {len(judged)} judged above {found}"
        + (f" (blocks {excused} excused: audio of a starved stretch; stretches {stretches} s)" if excused else "")
        + (f" {context}" if context else ""))


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
