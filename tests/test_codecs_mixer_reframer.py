"""ChannelMixer and Reframer."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.codecs import (
    PCM16_8K,
    PCM16_16K,
    PCM16_48K,
    PCM16_48K_STEREO,
    PCMU_8K,
    AudioFrame,
    ChannelMixer,
    Reframer,
)
from gateway.errors import LocalProtocolError


def ramp(n: int, channels: int = 1, start: int = 0) -> np.ndarray:
    """int16 (n, channels) whose samples count up (distinct per channel), to check ordering."""
    base = (np.arange(start, start + n) % 30000).astype(np.int16)
    return np.stack([base + 1000 * c for c in range(channels)], axis=1).astype(np.int16)


# --- ChannelMixer -------------------------------------------------------------------------


def test_mono_to_stereo_duplicates():
    pcm = ramp(160)
    (out,) = ChannelMixer(1, 2, rate=8000).process(AudioFrame(pcm, 8000, 320))
    assert out.pcm.shape == (160, 2) and out.timestamp == 320 and out.rate == 8000
    np.testing.assert_array_equal(out.pcm[:, 0], pcm[:, 0])
    np.testing.assert_array_equal(out.pcm[:, 1], pcm[:, 0])


def test_stereo_to_mono_averages_without_overflow():
    pcm = np.array([[32767, 32767], [-32768, -32768], [32767, -32768], [1, 2], [-1, -2], [100, 300]], dtype=np.int16)
    (out,) = ChannelMixer(2, 1, rate=48000).process(AudioFrame(pcm, 48000, 0))
    assert out.pcm.dtype == np.int16 and out.pcm.shape == (6, 1)
    assert out.pcm[:, 0].tolist() == [32767, -32768, -1, 1, -2, 200]  # int32 sum, floor // 2


def test_mixer_checks_its_input():
    with pytest.raises(ValueError):
        ChannelMixer(3, 1)
    with pytest.raises(LocalProtocolError):
        ChannelMixer(2, 1, rate=48000).process(AudioFrame.silence(960, 48000, channels=1))
    with pytest.raises(LocalProtocolError):
        ChannelMixer(2, 1, rate=48000).process(AudioFrame.silence(320, 16000, channels=2))
    # without a rate it takes any rate
    (out,) = ChannelMixer(2, 1).process(AudioFrame.silence(320, 16000, channels=2))
    assert out.rate == 16000 and out.channels == 1


# --- Reframer -----------------------------------------------------------------------------


def feed(reframer: Reframer, pcm: np.ndarray, sizes: list[int]) -> list[AudioFrame]:
    out, pos = [], 0
    for size in sizes:
        out += reframer.process(AudioFrame(pcm[pos : pos + size], reframer.fmt.rate, pos))
        pos += size
    return out


@pytest.mark.parametrize("ptime", [10, 20, 40, 60, 30, 25])
@pytest.mark.parametrize("fmt", [PCM16_8K, PCM16_48K_STEREO])
def test_frames_of_exact_ptime_from_20ms_input(fmt, ptime):
    n_in = fmt.samples(20)
    total = n_in * 30  # 600 ms: a whole number of 10/20/30/40/60 ms frames; 25 ms leaves 0
    pcm = ramp(total, fmt.channels)
    r = Reframer(fmt, ptime)
    frames = feed(r, pcm, [n_in] * 30)
    size = fmt.samples(ptime)
    assert all(f.samples == size and f.rate == fmt.rate and f.channels == fmt.channels for f in frames)
    assert len(frames) == total // size and r.buffered == total % size
    np.testing.assert_array_equal(np.concatenate([f.pcm for f in frames]), pcm[: len(frames) * size])
    assert [f.timestamp for f in frames] == [k * size for k in range(len(frames))]


@pytest.mark.parametrize("ptime", [10, 20, 40, 60])
def test_frames_from_odd_input_sizes_wrap_the_ring(ptime):
    rng = np.random.default_rng(ptime)
    sizes = [int(s) for s in rng.integers(1, 1500, 80)]
    pcm = ramp(sum(sizes), 2)
    r = Reframer(PCM16_48K_STEREO, ptime)
    frames = feed(r, pcm, sizes)
    size = 48 * ptime
    assert all(f.samples == size for f in frames)
    assert len(frames) == sum(sizes) // size and r.buffered == sum(sizes) % size
    np.testing.assert_array_equal(np.concatenate([f.pcm for f in frames]), pcm[: len(frames) * size])
    tail = r.flush()
    assert len(tail) == (1 if sum(sizes) % size else 0) and r.buffered == 0
    if tail:
        rest = sum(sizes) % size
        np.testing.assert_array_equal(tail[0].pcm[:rest], pcm[-rest:])
        assert not tail[0].pcm[rest:].any()  # padded with silence
        assert tail[0].samples == size and tail[0].timestamp == len(frames) * size


def test_pacer_interface_push_pop_drop_buffered():
    r = Reframer(PCM16_16K, 20)  # 320-sample frames
    assert r.pop() is None and r.buffered == 0
    r.push(AudioFrame(ramp(400), 16000, 1000))
    assert r.buffered == 400
    f = r.pop()
    assert f is not None and f.samples == 320 and f.timestamp == 1000
    np.testing.assert_array_equal(f.pcm, ramp(320))
    assert r.pop() is None and r.buffered == 80
    r.push(AudioFrame(ramp(400, start=400), 16000, 1400))
    assert r.drop(100) == 100 and r.buffered == 380
    f = r.pop()
    assert f.timestamp == 1420  # 1000 + 320 popped + 100 dropped: the oldest left is sample 420
    np.testing.assert_array_equal(f.pcm, ramp(320, start=420))
    assert r.drop(1000) == 60 and r.buffered == 0
    assert r.drop(5) == 0
    with pytest.raises(LocalProtocolError):
        r.drop(-1)



def test_peek_looks_ahead_without_consuming_across_the_ring_seam():
    r = Reframer(PCM16_8K, 20)  # ring of 4 frames (640 samples)
    r.push(AudioFrame(ramp(600), 8000, 0))
    r.drop(500)
    r.push(AudioFrame(ramp(300, start=600), 8000, 600))  # wraps around the end of the ring
    np.testing.assert_array_equal(r.peek(320), ramp(320, start=500))
    assert r.buffered == 400 and r.peek(401) is None
    ahead = r.peek(160)
    np.testing.assert_array_equal(r.pop().pcm, ahead)  # the next pop returns what peek showed
    ahead[:] = 0  # a copy: the buffer is not changed through it
    np.testing.assert_array_equal(r.peek(80), ramp(80, start=660))

def test_clock_resyncs_when_pushed_into_an_empty_buffer():
    r = Reframer(PCM16_8K, 20)
    assert [f.timestamp for f in r.process(AudioFrame(ramp(160), 8000, 0))] == [0]
    # the route left a gap of 1 s: the next frame carries the new timestamp
    assert [f.timestamp for f in r.process(AudioFrame(ramp(160), 8000, 8160))] == [8160]


def test_bounded_buffer_discards_oldest_and_counts():
    r = Reframer(PCM16_8K, 20, max_buffered=480)
    r.push(AudioFrame(ramp(400), 8000, 0))
    r.push(AudioFrame(ramp(400, start=400), 8000, 400))
    assert r.buffered == 480 and r.overflowed == 320
    f = r.pop()
    assert f.timestamp == 320
    np.testing.assert_array_equal(f.pcm, ramp(160, start=320))


def test_short_input_returns_nothing_until_a_frame_completes():
    r = Reframer(PCM16_48K, 20)
    assert r.process(AudioFrame(ramp(500), 48000, 0)) == []
    (f,) = r.process(AudioFrame(ramp(500, start=500), 48000, 500))
    assert f.samples == 960 and r.buffered == 40


def test_reframer_rejects_wrong_input():
    with pytest.raises(ValueError):
        Reframer(PCMU_8K, 20)
    with pytest.raises(ValueError):
        Reframer(PCM16_8K, 0)
    with pytest.raises(LocalProtocolError):
        Reframer(PCM16_8K, 20).push(AudioFrame.silence(320, 16000))
