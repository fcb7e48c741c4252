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

__all__ = ["SPECTRAL_FOUND", "STALL_REACH_S", "active_duration", "assert_blocks_found", "assert_correlated",
           "assert_loop_heard", "best_alignment", "BlockScore", "blockwise_alignment", "blockwise_blocks",
           "excused_blocks", "found_share", "loop_aligned", "loop_score", "mono", "reached_samples",
           "read_wav", "spectral_alignment", "spectral_blocks", "write_wav"]

#: s: how long after a starved stretch (`harness.Starvation`) its stall can still show in the
#: audio arriving: the pacers and jitter buffers the speech crosses (20-60 ms each, three or
#: four in a bridge run in one test process) catch up within it.
STALL_REACH_S = 0.25


def excused_blocks(blocks: list[BlockScore], found: float, starvation, timeline, *, offset_s: float = 0.0,
                   block_s: float = 0.25) -> list[int]:
    """Indices of the `blocks` at or below `found` whose audio (`timeline`: harness.Timeline of
    the recording, the blocks' received audio starting `offset_s` into it) arrived during a
    stretch of `starvation` or within STALL_REACH_S after one: none without either."""
    if starvation is None or timeline is None or not timeline.times:
        return []

    def reached(block: BlockScore) -> bool:
        start, end = offset_s + block.at_s, offset_s + block.at_s + block_s
        return starvation.overlaps(timeline.time_at(start), timeline.time_at(end), STALL_REACH_S)

    return [i for i, b in enumerate(blocks) if b.score <= found and reached(b)]


def found_share(blocks: list[BlockScore], found: float, starvation=None, timeline=None, **where) -> float:
    """The share of the judged `blocks` above `found` (the bad ones a starved stretch reached,
    `excused_blocks`, are not judged); 0.0 when not even half of them could be judged."""
    excused = excused_blocks(blocks, found, starvation, timeline, **where)
    judged = [b.score for i, b in enumerate(blocks) if i not in excused]
    if not judged or 2 * len(judged) < len(blocks):
        return 0.0
    return sum(score > found for score in judged) / len(judged)


def assert_blocks_found(blocks: list[BlockScore], found: float, what: str, *, block_s: float = 0.25,
                        starvation=None, timeline=None, offset_s: float = 0.0, share: float = 0.8,
                        min_blocks: int = 3, context: object = "") -> None:
    """There are at least `min_blocks` speech `blocks` (`blockwise_blocks`, `spectral_blocks`)
    and `share` of them score above `found`: but for the ones the machine's stalls could
    reach, which are not judged. A block below `found` whose audio arrived (`timeline`:
    harness.Timeline of the recording, the blocks' received audio starting `offset_s` into
    it) during a stretch in which another process kept the test off the cores
    (`starvation`: harness.Starvation, run beside the test) or within STALL_REACH_S after one
    is excused; at least half of the blocks must be judged (else the machine was too starved
    for the check to say anything, and it fails saying so). Calm (no stretch) every block is
    judged. Raises AssertionError naming `what`, the scores, the excused blocks and the
    stretches."""
    excused = excused_blocks(blocks, found, starvation, timeline, offset_s=offset_s, block_s=block_s)
    judged = [b.score for i, b in enumerate(blocks) if i not in excused]
    good = sum(score > found for score in judged)
    stretches = [] if starvation is None else [round(e - s, 3) for s, e in starvation.stretches]
    assert len(blocks) >= min_blocks and 2 * len(judged) >= len(blocks) and good >= share * len(judged), (
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
    aligned = loop_aligned(clip, clip_rate, received, rate)
    corr, _ = best_alignment(aligned, rate, received, rate, max_lag_s=0.1)
    per_block = spectral_alignment if spectral else blockwise_alignment
    return corr, per_block(aligned, rate, received, rate, search_s=search_s)


def loop_aligned(clip: np.ndarray, clip_rate: int, received: np.ndarray, rate: int) -> np.ndarray:
    """`clip` played in a loop (mono float64, at `rate`), as long as `received` and from the
    place in the loop where `received` starts."""
    ref = mono(clip)
    if clip_rate != rate:
        ref = soxr.resample(ref, clip_rate, rate, quality="VHQ")
    period = len(ref)
    loops = int(np.ceil(len(received) / period)) + 2
    corr, lag = best_alignment(np.tile(ref, loops), rate, received, rate, max_lag_s=1.05 * period / rate)
    phase = round(-lag * rate) % period
    return np.tile(ref, loops + 1)[phase : phase + len(received)]


def assert_loop_heard(clip: np.ndarray, clip_rate: int, received: np.ndarray, rate: int, what: str, *,
                      correlation: float = 0.9, block: float = 0.8, starvation=None, timeline=None) -> None:
    """`received` is `clip` played in a loop from wherever in it: the whole correlated above
    `correlation` and every speech block above `block` (`loop_score`), but for the audio a
    starved stretch reached (`assert_correlated`, `assert_blocks_found`); calm, exactly
    `loop_score`'s figures."""
    aligned = loop_aligned(clip, clip_rate, received, rate)
    assert_correlated(aligned, rate, received, rate, correlation, what, max_lag_s=0.1, starvation=starvation,
                      timeline=timeline)
    assert_blocks_found(blockwise_blocks(aligned, rate, received, rate), block, what, share=1.0,
                        starvation=starvation, timeline=timeline)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def reached_samples(received_len: int, rate: int, starvation, timeline, offset_s: float = 0.0) -> np.ndarray:
    """bool (received_len,): which samples of a received signal (at `rate`, starting `offset_s`
    into the recording `timeline` describes) arrived during a starved stretch of `starvation`
    or within STALL_REACH_S after one. All False without a starvation or a timeline."""
    reached = np.zeros(received_len, dtype=bool)
    if starvation is None or timeline is None or not timeline.times or not starvation.stretches:
        return reached
    ends = np.asarray(timeline.ends) / timeline.rate - offset_s  # s into the received signal
    starts = np.concatenate([[-offset_s], ends[:-1]])
    for at, first, last in zip(timeline.times, starts, ends):
        if starvation.overlaps(at, at, STALL_REACH_S):
            reached[max(0, int(first * rate)) : max(0, int(last * rate))] = True
    return reached


def assert_correlated(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int, minimum: float,
                      what: str, *, starvation=None, timeline=None, offset_s: float = 0.0,
                      max_lag_s: float = 1.0, search_s: float = 0.1, min_segment_s: float = 0.12,
                      context: object = "") -> tuple[float, float]:
    """`received` is the reference, correlated above `minimum` (`best_alignment`, within
    ±`max_lag_s`): but for the parts the machine's stalls reached. Calm (no starved stretch
    reached the audio) that is the whole signal at one lag, exactly `best_alignment`. Else the
    received signal is cut where a stretch of `starvation` reached it (`reached_samples`:
    arrived during the stretch or within STALL_REACH_S after), and each part of at least
    `min_segment_s` between such cuts, in pieces of up to 0.25 s, is judged on its own, at its
    own lag within ±`search_s` of the overall one (a stall costs a concealed packet or a
    skipped one: a shift); 80 % of the pieces must score above `minimum` (the pacer wins the
    stall's latency back by skipping a pause packet at the next pause, which may come later
    than STALL_REACH_S: a shift inside one piece). At least one piece of the reference's
    speech must be long enough to judge (else the machine was too starved for the check to
    say anything, and it fails saying so). Returns (the whole signal's correlation, its lag in
    s); raises AssertionError naming `what`, the scores and the stretches."""
    corr, lag = best_alignment(reference, ref_rate, received, rate, max_lag_s=max_lag_s)
    reached = reached_samples(len(received), rate, starvation, timeline, offset_s)
    if corr > minimum or not reached.any():
        assert corr > minimum, f"{what}: correlation {corr:.3f} at lag {lag:.3f} s, not above {minimum} {context}"
        return corr, lag
    ref = mono(reference)
    if ref_rate != rate:
        ref = soxr.resample(ref, ref_rate, rate, quality="VHQ")
    got = mono(received)
    base, search, shortest = round(lag * rate), round(search_s * rate), round(min_segment_s * rate)
    free = np.concatenate([[False], ~reached, [False]])  # runs of samples no stretch reached
    change = np.flatnonzero(free[1:] != free[:-1])
    piece = round(0.25 * rate)
    parts = [(a + k, min(b, a + k + piece)) for a, b in zip(change[::2], change[1::2])
             for k in range(0, b - a, piece)]
    parts = [(a, b) for a, b in parts if b - a >= shortest]
    # a part that is a pause of the reference (RMS under 0.3 times the whole's, as
    # `gateway.quality`'s speech blocks) says nothing: noise against noise
    loud = 0.3 * np.sqrt(np.mean(ref**2))
    parts = [(a, b) for a, b in parts if _rms(ref[max(0, a - base) : max(0, b - base)]) >= loud]
    scores = []
    for a, b in parts:
        segment = got[a:b]
        lo, hi = max(0, a - base - search), min(len(ref), b - base + search)
        window = ref[lo:hi]
        if len(window) < len(segment):
            scores.append(0.0)  # the reference does not reach this far: not its speech
            continue
        size = 1 << (len(window) + len(segment)).bit_length()
        dots = np.fft.irfft(np.fft.rfft(window, size) * np.conj(np.fft.rfft(segment, size)), size)
        dots = dots[: len(window) - len(segment) + 1]
        energy = np.convolve(window * window, np.ones(len(segment)), "valid") * np.dot(segment, segment)
        scores.append(float(np.max(dots / np.sqrt(energy + 1e-9))))
    stretches = [round(e - s, 3) for s, e in starvation.stretches]
    assert scores and sum(score > minimum for score in scores) >= 0.8 * len(scores), (
        f"{what}: correlation {corr:.3f} at lag {lag:.3f} s; outside the audio starved stretches reached "
        f"({reached.mean():.0%} of it; stretches {stretches} s), pieces of "
        f"{[round(float(b - a) / rate, 2) for a, b in parts]} s score {np.round(scores, 3)}, "
        f"not 80 % of them above {minimum} {context}")
    return corr, lag
