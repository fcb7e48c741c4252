"""The tests' own judge of real-time audio: `audio_checks.assert_blocks_found` excuses a bad
speech block only where a stretch in which another process kept the test off the cores
(`harness.Starvation`) reached its audio, and nothing else; `gateway.quality`'s blocks say where
they were found. Recorded speech (gateway/assets); the starved stretches scripted on trio's mock
clock."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

import harness
from audio_checks import (
    STALL_REACH_S,
    BlockScore,
    assert_blocks_found,
    assert_correlated,
    blockwise_blocks,
    found_share,
    reached_samples,
    read_wav,
    spectral_blocks,
)
from conftest import ASSETS
from harness import Starvation, Timeline


def speech() -> tuple[np.ndarray, int]:
    pcm, rate = read_wav(ASSETS / "or105.wav")
    return pcm[int(0.3 * rate) : int(2.3 * rate), 0], rate


@pytest.mark.parametrize("blocks_of", [blockwise_blocks, spectral_blocks])
def test_blocks_say_where_in_the_recording_they_were_found(blocks_of):
    pcm, rate = speech()
    delay = 0.5
    received = np.concatenate([np.zeros(int(delay * rate), np.int16), pcm])
    blocks = blocks_of(pcm, rate, received, rate)
    assert len(blocks) >= 5 and min(b.score for b in blocks) > 0.9
    # each block at its own place in the reference (multiples of 250 ms), shifted by the delay
    offsets = [b.at_s - delay for b in blocks]
    assert all(abs(o / 0.25 - round(o / 0.25)) * 0.25 <= 0.004 for o in offsets), np.round(offsets, 3)
    assert offsets == sorted(offsets) and offsets[0] >= 0


def blocks(*scores: float) -> list[BlockScore]:
    return [BlockScore(s, 0.25 * i) for i, s in enumerate(scores)]


def starved(*stretches: tuple[float, float]) -> Starvation:
    starvation = Starvation()
    starvation.stretches = list(stretches)
    return starvation


# a recording that arrived in 20 ms frames from trio time 100.0 on: second s of it at 100 + s
ARRIVED = Timeline(8000, ((100.0 + 0.02 * k, 160) for k in range(200)))


def test_calm_every_block_is_judged():
    assert_blocks_found(blocks(0.99, 0.97, 0.98, 0.95, 0.96), 0.85, "calm")
    with pytest.raises(AssertionError, match=r"calm: blocks \[0.99 0.4  0.5  0.95 0.96\], 3 of 5 judged above 0.85"):
        assert_blocks_found(blocks(0.99, 0.4, 0.5, 0.95, 0.96), 0.85, "calm", starvation=starved(), timeline=ARRIVED)


def test_a_bad_block_is_excused_only_where_a_starved_stretch_reached_its_audio():
    # blocks 1 and 2 bad: their audio arrived at 100.24-100.50 and 100.50-100.74; `share` 1.0,
    # so any bad block judged fails
    scores = blocks(0.99, 0.4, 0.5, 0.95, 0.96, 0.97)

    def check(what: str, *stretches: tuple[float, float], offset_s: float = 0.0) -> None:
        assert_blocks_found(scores, 0.85, what, starvation=starved(*stretches), timeline=ARRIVED,
                            offset_s=offset_s, share=1.0)

    # a stall at 100.30-100.38 and what it leaves on its way for STALL_REACH_S: blocks 1 and 2
    check("stalled", (100.30, 100.38))
    # the same stall 1 s later reaches block 5, not 1 and 2
    with pytest.raises(AssertionError, match=r"stalled later: .*, 4 of 6 judged above 0.85$"):
        check("stalled later", (101.30, 101.38))
    # a stall just after block 2's audio: neither is excused
    with pytest.raises(AssertionError, match=r"4 of 6 judged above 0.85$"):
        check("after", (100.76, 100.78))
    # a stall that ended just within STALL_REACH_S before block 1's audio reaches it, not 2;
    # just beyond, neither
    with pytest.raises(AssertionError, match=r"4 of 5 judged above 0.85 \(blocks \[1\] excused"):
        check("within reach", (99.5, 100.24 - STALL_REACH_S + 0.005))
    with pytest.raises(AssertionError, match=r"4 of 6 judged above 0.85$"):
        check("beyond reach", (99.5, 100.24 - STALL_REACH_S - 0.005))
    # `offset_s`: the blocks were scored on a part of the recording starting 1 s in
    with pytest.raises(AssertionError, match=r"4 of 6 judged above 0.85$"):
        check("part", (100.30, 100.38), offset_s=1.0)


def test_a_broken_path_fails_however_starved_the_machine():
    noise = blocks(0.1, 0.2, 0.05, 0.9, 0.1, 0.15)  # one block above by chance
    with pytest.raises(AssertionError, match=r"1 of 1 judged"):
        assert_blocks_found(noise, 0.85, "noise", starvation=starved((99.0, 110.0)), timeline=ARRIVED)


def test_starvation_merges_consecutive_starved_slices_into_stretches(monkeypatch):
    # run-queue wait (s) as the thread's schedstat would read it, one reading per 20 ms slice:
    # slices 3-4 starved (8 ms each), slice 7 (6 ms), slice 9 under the 5 ms threshold
    waits = iter(np.cumsum([0, 0, 0, 0.008, 0.008, 0, 0, 0.006, 0, 0.004, 0, 0]))
    monkeypatch.setattr(harness, "run_queue_wait", lambda pid=None: float(next(waits)))
    late = iter(range(100))

    async def main() -> Starvation:
        starvation = Starvation(probe=lambda: next(late))
        start = trio.current_time()
        with trio.move_on_after(0.2 + 0.001):
            await starvation.run()
        starvation.stretches = [(round(s - start, 3), round(e - start, 3)) for s, e in starvation.stretches]
        return starvation

    starvation = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert starvation.stretches == [(0.04, 0.08), (0.12, 0.14)]
    assert starvation.slices == 3
    assert starvation.excused == 5  # the probe grew by 1 a slice: slices 3, 4, 5 and 7, 8
    assert starvation.overlaps(0.09, 0.1, after=0.01) and not starvation.overlaps(0.09, 0.1)


def stalled_speech() -> tuple[np.ndarray, np.ndarray, int]:
    """(speech, what a stalled path delivered: 40 ms late from 1.0 s on, the gap filled
    with silence as a late slot is, arriving in 20 ms frames from trio time 100.0 on)."""
    pcm, rate = speech()
    cut = int(1.0 * rate)
    return pcm, np.concatenate([pcm[:cut], np.zeros(int(0.04 * rate), np.int16), pcm[cut:]]), rate


def test_correlation_is_judged_around_the_audio_a_stall_reached():
    pcm, received, rate = stalled_speech()
    # calm it is the whole signal's correlation: the shift mid-stream fails it
    with pytest.raises(AssertionError, match=r"calm: correlation 0\.[0-8]\d* at lag"):
        assert_correlated(pcm, rate, received, rate, 0.9, "calm", starvation=starved(), timeline=ARRIVED)
    # a stall at 100.95-101.0 reached it: the parts before and after score on their own
    corr, lag = assert_correlated(pcm, rate, received, rate, 0.9, "stalled", starvation=starved((100.95, 101.0)),
                                  timeline=ARRIVED)
    assert corr < 0.9 and lag in (0.0, 0.04)
    # once a stall reached the audio, the pieces (250 ms) away from it are judged as blocks
    # are: one shifted piece in 5 or more may be the pause packet skipped to win the stall's
    # latency back; two shifts fail
    twice = np.concatenate([received[: int(0.6 * rate)], np.zeros(int(0.04 * rate), np.int16), received[int(0.6 * rate):]])
    with pytest.raises(AssertionError, match=r"elsewhere: .*pieces of \[[\d., ]+\] s score .*not 80 % of them"):
        assert_correlated(pcm, rate, twice, rate, 0.9, "elsewhere", starvation=starved((101.7, 101.75)),
                          timeline=ARRIVED)
    # noise fails however much a stall reached
    noise = np.random.default_rng(7).normal(0, 3000, len(received)).astype(np.int16)
    with pytest.raises(AssertionError, match="noise"):
        assert_correlated(pcm, rate, noise, rate, 0.9, "noise", starvation=starved((100.95, 101.0)), timeline=ARRIVED)


def test_reached_samples_maps_arrival_times_onto_the_signal():
    reached = reached_samples(8000 * 2, 8000, starved((100.40, 100.42)), ARRIVED)
    # the frames that arrived from 100.40 to 100.42 + STALL_REACH_S (the last at 100.66):
    # 0.40-0.68 s of the signal
    span = np.flatnonzero(reached) / 8000
    assert span[0] == pytest.approx(0.40) and span[-1] == pytest.approx(0.68 - 1 / 8000)
    # the same, for a part of the recording starting 0.3 s in, at 48 kHz
    part = np.flatnonzero(reached_samples(48000, 48000, starved((100.40, 100.42)), ARRIVED, offset_s=0.3)) / 48000
    assert part[0] == pytest.approx(0.10) and len(part) == len(span) * 6
    assert not reached_samples(100, 8000, None, ARRIVED).any() and not reached_samples(100, 8000, starved(), ARRIVED).any()


def test_run_queue_wait_of_another_process_sums_its_threads():
    import glob
    import os
    import subprocess
    import sys

    mine = harness.run_queue_wait()
    assert harness.run_queue_wait(os.getpid()) >= mine  # this thread is one of this process's
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert glob.glob(f"/proc/{child.pid}/task/*/schedstat")  # what it reads, while the child runs
    child.communicate(b"")
    assert harness.run_queue_wait(child.pid) == 0.0  # ended: nothing to read


def test_found_share_leaves_out_the_bad_blocks_a_stall_reached_and_no_others():
    scores = blocks(0.99, 0.4, 0.5, 0.95, 0.96, 0.3)  # blocks 1, 2 (100.24-100.74) and 5 bad
    assert found_share(scores, 0.85) == pytest.approx(3 / 6)
    assert found_share(scores, 0.85, starved((100.30, 100.38)), ARRIVED) == pytest.approx(3 / 4)  # 1, 2 left out
    assert found_share(scores, 0.85, starved((101.30, 101.38)), ARRIVED) == pytest.approx(3 / 5)  # 5 left out
    # a stall over it all: half judged at least, or nothing to say
    assert found_share(scores, 0.85, starved((99.0, 110.0)), ARRIVED) == 1.0
    assert found_share(blocks(0.99, 0.4, 0.5, 0.2, 0.96, 0.3), 0.85, starved((99.0, 110.0)), ARRIVED) == 0.0
