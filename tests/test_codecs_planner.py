"""The planner: every pair of standard formats converts, with the right duration, rate,
channels, stage order and content (speech correlates after the stated delay)."""

from __future__ import annotations

import itertools
import pathlib
import wave

import numpy as np
import pytest

from gateway.codecs import (
    OPUS_48K,
    OPUS_48K_STEREO,
    PCM16_8K,
    PCM16_16K,
    PCM16_48K,
    PCM16_48K_STEREO,
    PCMU_8K,
    STANDARD_FORMATS,
    AudioFormat,
    AudioFrame,
    ChannelMixer,
    EncodedFrame,
    Encoding,
    G711Decoder,
    G711Encoder,
    OpusDecoder,
    OpusEncoder,
    Reframer,
    Resampler,
    packet_samples,
    plan,
)

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "gateway" / "assets"
OPUS_LOOKAHEAD = 312  # samples at 48 kHz added by the test's own source encoder
PAIRS = list(itertools.product(STANDARD_FORMATS, repeat=2))


def read_wav(name: str) -> np.ndarray:
    with wave.open(str(ASSETS / name)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float)


def upsample_fft(x: np.ndarray, factor: int) -> np.ndarray:
    """Ideal band-limited upsampling (spectrum zero-padding), independent of the Resampler."""
    if factor == 1:
        return x
    spectrum = np.fft.rfft(x)
    padded = np.zeros(len(x) * factor // 2 + 1, dtype=complex)
    padded[: len(spectrum)] = spectrum
    return np.fft.irfft(padded, len(x) * factor) * factor


@pytest.fixture(scope="module")
def speech():
    """speech(rate, channels, seconds) -> float (n, channels): or105 left, or109 right
    (different talkers, so a swapped or mixed channel shows), from 0.5 s in (speech)."""
    left, right = read_wav("or105.wav"), read_wav("or109.wav")

    def make(rate: int, channels: int, seconds: float = 1.0) -> np.ndarray:
        n8 = int(8000 * seconds)
        cols = [left[4000 : 4000 + n8], right[4000 : 4000 + n8]][:channels]
        return np.stack([upsample_fft(c, rate // 8000) for c in cols], axis=1)

    return make


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def source_frames(fmt: AudioFormat, pcm: np.ndarray) -> list:
    """20 ms frames of `fmt` carrying `pcm` (encoded with the test's own encoders)."""
    n = fmt.samples(20)
    encoder = {Encoding.PCMU: G711Encoder(), Encoding.OPUS: OpusEncoder(fmt.channels, 20)}.get(fmt.encoding)
    frames = []
    for i in range(0, len(pcm), n):
        frame = AudioFrame(np.ascontiguousarray(pcm[i : i + n]), fmt.rate, i)
        frames += encoder.process(frame) if encoder else [frame]
    return frames


def decode_output(fmt: AudioFormat, frames: list) -> np.ndarray:
    """PCM (n, channels) of the chain's output, checking each frame's format on the way."""
    if fmt.encoding is Encoding.PCM16:
        assert all(isinstance(f, AudioFrame) and f.rate == fmt.rate and f.channels == fmt.channels for f in frames)
        return np.concatenate([f.pcm for f in frames])
    assert all(isinstance(f, EncodedFrame) and f.format == fmt for f in frames)
    decoder = G711Decoder() if fmt.encoding is Encoding.PCMU else OpusDecoder(fmt.channels)
    return np.concatenate([decoder.process(f)[0].pcm for f in frames])


def duration_samples(frames: list) -> int:
    total = 0
    for f in frames:
        if isinstance(f, EncodedFrame) and f.format.encoding is Encoding.OPUS:
            assert packet_samples(f.payload) == f.samples
        total += f.samples
    return total


def expected(src: AudioFormat, dst: AudioFormat, speech) -> np.ndarray:
    """What dst should carry: the source speech at dst's rate, mixed or duplicated."""
    ref = speech(dst.rate, src.channels)
    if src.channels == 2 and dst.channels == 1:
        return ref.mean(axis=1, keepdims=True)
    if src.channels == 1 and dst.channels == 2:
        return np.repeat(ref, 2, axis=1)
    return ref


def aligned_corr(y: np.ndarray, ref: np.ndarray, lag: int, slack: int) -> float:
    """Best correlation of y[k:] with ref for k within `slack` of `lag`."""
    best = -1.0
    for k in range(max(0, lag - slack), lag + slack + 1):
        n = min(len(y) - k, len(ref))
        a, b = y[k : k + n].astype(float), ref[:n]
        a, b = a - a.mean(), b - b.mean()
        best = max(best, float(a @ b / np.sqrt((a @ a) * (b @ b))))
    return best


def check_chain(src, dst, ptime_ms, speech, seconds=1.0):
    chain = plan(src, dst, ptime_ms=ptime_ms)
    assert (chain.input, chain.output) == (src, dst)
    pcm = to_int16(speech(src.rate, src.channels, seconds))
    out = []
    for frame in source_frames(src, pcm):
        produced = chain.process(frame)
        if ptime_ms is None and src != dst:
            assert len(produced) == 1  # nothing is held back without a reframer
        out += produced
    # all of it arrives through process(), at once: no stage holds a frame back
    assert duration_samples(out) == int(dst.rate * seconds)
    if ptime_ms is not None:
        assert {f.samples for f in out} == {dst.samples(ptime_ms)}
    y = decode_output(dst, out)
    assert y.shape == (int(dst.rate * seconds), dst.channels)
    lag = chain.delay + (OPUS_LOOKAHEAD * dst.rate // 48000 if src.encoding is Encoding.OPUS else 0)
    slack = max(2, 8 * dst.rate // 48000)  # Opus hybrid frames land ~2 samples (48 kHz) early
    ref = expected(src, dst, speech)
    for c in range(dst.channels):
        r = aligned_corr(y[:, c], ref[:, c], lag, slack)
        assert r > 0.9, f"{chain}: channel {c} correlates {r:.3f}"
    return chain


@pytest.mark.parametrize("ptime_ms", [20, None])
@pytest.mark.parametrize("src, dst", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_standard_pair_converts(src, dst, ptime_ms, speech):
    check_chain(src, dst, ptime_ms, speech)


@pytest.mark.parametrize("ptime_ms", [10, 40, 60])
@pytest.mark.parametrize(
    "src, dst", [(PCMU_8K, OPUS_48K), (OPUS_48K_STEREO, PCMU_8K), (PCM16_16K, PCM16_48K_STEREO), (PCM16_48K, PCM16_8K)]
)
def test_other_ptimes(src, dst, ptime_ms, speech):
    check_chain(src, dst, ptime_ms, speech, seconds=1.2)


def test_stage_order_saves_work():
    types = lambda chain: [type(s) for s in chain.stages]  # noqa: E731
    # down-mix before resampling, up-mix after, reframer right before the encoder
    assert types(plan(OPUS_48K_STEREO, PCMU_8K, ptime_ms=20)) == [OpusDecoder, ChannelMixer, Resampler, Reframer, G711Encoder]
    assert types(plan(PCMU_8K, OPUS_48K_STEREO, ptime_ms=20, opus_input_rate=48000)) == [
        G711Decoder, Resampler, ChannelMixer, Reframer, OpusEncoder]
    # by default Opus is encoded at the source's 8 kHz: nothing to resample
    assert types(plan(PCMU_8K, OPUS_48K_STEREO, ptime_ms=20)) == [G711Decoder, ChannelMixer, Reframer, OpusEncoder]
    assert types(plan(PCM16_8K, PCM16_48K_STEREO, ptime_ms=20)) == [Resampler, ChannelMixer, Reframer]
    assert types(plan(PCM16_48K_STEREO, PCM16_16K)) == [ChannelMixer, Resampler]
    mix = plan(PCM16_48K_STEREO, PCM16_16K).stages[0]
    assert mix.input == PCM16_48K_STEREO and mix.output == PCM16_48K  # mixes at the source rate


def test_same_format_passes_frames_through():
    chain = plan(OPUS_48K, OPUS_48K, ptime_ms=20)
    assert chain.stages == () and chain.delay_ms == 0
    packet = EncodedFrame(b"\xfc\xff\xfe", OPUS_48K, 960, 7)
    assert chain.process(packet) == [packet]
    frame = AudioFrame.silence(160, 8000)
    assert plan(PCM16_8K, PCM16_8K).process(frame) == [frame]


def test_delays_add_up_within_budget():
    for src, dst in PAIRS:
        chain = plan(src, dst, ptime_ms=20)
        assert chain.delay_ms == pytest.approx(sum(1000 * s.delay / s.output.rate for s in chain.stages))
        limit = 5.0 + (6.5 if Encoding.OPUS in (src.encoding, dst.encoding) and src != dst else 0)
        assert chain.delay_ms <= limit, str(chain)


@pytest.mark.parametrize(
    "src, dst",
    [
        (AudioFormat(Encoding.PCMU, 16000, 1), PCM16_16K),
        (PCM16_8K, AudioFormat(Encoding.PCMU, 8000, 2)),
        (PCM16_16K, AudioFormat(Encoding.OPUS, 16000, 1)),
        (AudioFormat(Encoding.PCM16, 48000, 6), PCM16_48K),
    ],
)
def test_impossible_pairs_name_both_formats(src, dst):
    with pytest.raises(ValueError) as info:
        plan(src, dst)
    assert str(src) in str(info.value) and str(dst) in str(info.value)


def test_opus_needs_an_opus_ptime():
    with pytest.raises(ValueError, match="ptime"):
        plan(PCM16_48K, OPUS_48K, ptime_ms=30)
    assert plan(PCM16_48K, PCM16_8K, ptime_ms=30).stages[-1].frame_samples == 240  # PCM takes any


def test_file_at_44100_stereo_to_opus():
    src = AudioFormat(Encoding.PCM16, 44100, 2)
    chain = plan(src, OPUS_48K, ptime_ms=20)
    assert [type(s) for s in chain.stages] == [ChannelMixer, Resampler, Reframer, OpusEncoder]
    t = np.arange(44100 * 2) / 44100
    pcm = to_int16(np.stack([8000 * np.sin(2 * np.pi * 262 * t), 8000 * np.sin(2 * np.pi * 392 * t)], axis=1))
    out = []
    for i in range(0, len(pcm), 882):
        out += chain.process(AudioFrame(np.ascontiguousarray(pcm[i : i + 882]), 44100, i))
    out += chain.flush()
    assert all(packet_samples(p.payload) == 960 for p in out)
    # soxr holds some output back until flush; all of it is there in the end
    assert 2 * 48000 <= sum(p.samples for p in out) < 2 * 48000 + 2 * 960
    dec = OpusDecoder(1)
    y = np.concatenate([dec.process(p)[0].pcm[:, 0] for p in out])
    t48 = np.arange(2 * 48000) / 48000
    ref = (4000 * np.sin(2 * np.pi * 262 * t48) + 4000 * np.sin(2 * np.pi * 392 * t48))[:, None]
    assert aligned_corr(y, ref[:, 0], OPUS_LOOKAHEAD, 8) > 0.95


def test_chain_flush_drains_every_stage(speech):
    chain = plan(PCM16_8K, OPUS_48K_STEREO, ptime_ms=20)
    pcm = to_int16(speech(8000, 1, 0.21))  # 10.5 frames of 20 ms
    out = []
    for i in range(0, len(pcm), 160):
        out += chain.process(AudioFrame(np.ascontiguousarray(pcm[i : i + 160]), 8000, i))
    assert len(out) == 10
    tail = chain.flush()
    # the half frame (padded) and the encoder's 6.5 ms lookahead (it encodes at 8 kHz: no
    # resampler), in 48 kHz units like any Opus packet
    assert chain.stages[-1].input_rate == 8000
    assert len(tail) == 2
    assert [p.timestamp for p in out + tail] == [k * 960 for k in range(12)]
