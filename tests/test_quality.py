"""gateway/quality.py's phase-insensitive check, `spectral_alignment`: speech that went through
the Opus encoder an Argon bot publishes with (real libopus, 8 kHz input: narrowband SILK, which
keeps the spectrum but not the waveform) scores high block by block; a broken path (noise, the
wrong byte order, the wrong rate, silence) scores low. Real recordings (gateway/assets)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ASSETS
from gateway.adapters.argon.dial import (
    DEFAULT_COMPLEXITY,
    DEFAULT_EXPECTED_LOSS_PCT,
    PUBLISH_MIN_PACKET,
)
from gateway.codecs import OPUS_48K, AudioFormat, AudioFrame, Encoding, OpusDecoder, plan
from gateway.codecs.opus import packet_bandwidth
from gateway.quality import read_wav, spectral_alignment

FOUND = 0.8  # a block whose score is above this is the reference's speech
NB = 4000  # Hz: the audio band a narrowband TOC names


def argon_opus(pcm: np.ndarray, rate: int) -> tuple[np.ndarray, list[bytes]]:
    """int16 (samples,) at `rate` Hz (8 or 16 kHz) through the Opus encoder of what an Argon
    bot publishes (its defaults: complexity auto, so 1 at 8 kHz and 5 at 16; FEC for 10 % loss;
    input at the source's rate), decoded at 48 kHz: (int16 (samples, 1) at 48 kHz, the packets)."""
    src = AudioFormat(Encoding.PCM16, rate, 1)
    chain = plan(src, OPUS_48K, ptime_ms=20, opus_complexity=DEFAULT_COMPLEXITY, opus_fec=True,
                 opus_expected_loss_pct=DEFAULT_EXPECTED_LOSS_PCT, opus_min_packet_bytes=PUBLISH_MIN_PACKET)
    assert chain.stages[-1].input_rate == rate  # no resampler: the rate libopus is fed at
    decoder = OpusDecoder(1)
    n = rate // 50
    packets, out = [], []
    for i in range(0, len(pcm) - n + 1, n):
        for packet in chain.process(AudioFrame(np.ascontiguousarray(pcm[i : i + n].reshape(-1, 1)), rate, i)):
            packets.append(packet.payload)
            out += [f.pcm for f in decoder.process(packet)]
    return np.concatenate(out), packets


def speech(name: str) -> tuple[np.ndarray, int]:
    pcm, rate = read_wav(ASSETS / name)
    return pcm[:, 0], rate


def found(scores: list[float]) -> float:
    return sum(s > FOUND for s in scores) / len(scores)


@pytest.fixture(scope="module", params=["or105.wav", "or109.wav"])
def call(request) -> tuple[np.ndarray, np.ndarray]:
    """(8 kHz speech of a phone call, what the channel hears of it: 48 kHz)."""
    pcm, rate = speech(request.param)
    assert rate == 8000
    decoded, packets = argon_opus(pcm, rate)
    assert {packet_bandwidth(p) for p in packets if len(p) > 3} == {NB}
    assert all(p[0] >> 3 < 12 for p in packets if len(p) > 3)  # TOC config 0-11: SILK only
    return pcm, decoded


def test_intact_narrowband_opus_speech_scores_high(call):
    ref, got = call
    scores = spectral_alignment(ref, 8000, got, 48000)
    assert len(scores) >= 10
    assert min(scores) > 0.85 and np.median(scores) > 0.9, np.round(scores, 2)
    # the same at any gain and delay (a level change is a constant in the log spectrum)
    delayed = np.concatenate([np.zeros((19200, 1)), got * 0.25])  # 0.4 s later, -12 dB
    assert spectral_alignment(ref, 8000, delayed, 48000) == pytest.approx(scores, abs=0.02)
    # and whatever rate it was recorded at
    assert found(spectral_alignment(ref, 8000, got[::6], 8000)) == 1.0


def test_intact_wideband_opus_speech_scores_high():
    ref, rate = speech("speech16k.wav")
    assert rate == 16000
    got, _ = argon_opus(ref, rate)
    scores = spectral_alignment(ref, rate, got, 48000)
    assert len(scores) >= 5 and min(scores) > 0.85, np.round(scores, 2)


def test_missing_speech_scores_zero(call):
    ref, got = call
    head = got[: 4 * 48000]  # the call's first 4 s only: the blocks after it were not received
    scores = spectral_alignment(ref, 8000, head, 48000)
    reached = [s for s in scores if s > 0]
    assert 0.2 * len(scores) < len(reached) < len(scores) and min(reached) > 0.85
    assert scores[-1] == 0.0


def broken_paths(ref: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """What the channel would hear (48 kHz) from a call path broken in one way, each through
    the same real Opus encoder: (int16 audio, the rate it is read at)."""
    rng = np.random.default_rng(12)
    level = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
    noise = np.clip(rng.normal(0, level, len(ref)), -32768, 32767).astype(np.int16)
    spectrum = np.fft.rfft(ref.astype(np.float64))  # noise with the speech's long-term spectrum
    shaped = np.fft.irfft(np.abs(spectrum) * np.exp(2j * np.pi * rng.random(len(spectrum))), len(ref))
    twice = np.repeat(ref, 2)  # read at half the rate: half as fast (a 16 kHz stream taken as 8 kHz)
    return {
        "noise": (argon_opus(noise, 8000)[0], 48000),
        "speech-shaped noise": (argon_opus(shaped.astype(np.int16), 8000)[0], 48000),
        "wrong byte order": (argon_opus(ref.byteswap(), 8000)[0], 48000),
        "wrong rate, fast": (argon_opus(ref, 16000)[0], 48000),  # 8 kHz samples taken as 16 kHz
        "wrong rate, slow": (argon_opus(twice, 8000)[0], 48000),
        "wrong rate, read at 24 kHz": (argon_opus(ref, 8000)[0], 24000),  # the right audio, mislabelled
        "silence": (argon_opus(np.zeros_like(ref), 8000)[0], 48000),
        "digital silence": (np.zeros((48000 * 8, 1), np.int16), 48000),
    }


def test_broken_paths_score_low(call):
    ref, _ = call
    for what, (got, rate) in broken_paths(ref).items():
        scores = spectral_alignment(ref, 8000, got, rate)
        # a byte-swapped sample is its low byte (noise) plus its sign (clipped speech, which
        # can match the odd block): no path comes close to the 80 % of blocks the demo needs
        assert np.median(scores) < 0.3 and found(scores) <= 0.1, (what, np.round(scores, 2))


def test_another_talker_is_not_the_call():
    ref, _ = speech("or105.wav")
    other, _ = argon_opus(speech("or109.wav")[0], 8000)
    scores = spectral_alignment(ref, 8000, other, 48000)
    assert np.median(scores) < 0.4 and found(scores) <= 0.1, np.round(scores, 2)



def test_the_reference_s_last_block_counts(call):
    # a reference cut in mid-speech, received as long (less the codec's few ms of delay): its
    # last block is scored like any other (the spectrogram has a frame for every hop up to the
    # end), not taken as missing
    ref, got = call
    cut = 7 * 8000  # in speech for both recordings
    scores = spectral_alignment(ref[:cut], 8000, got[: 6 * cut], 48000)
    assert len(scores) >= 10 and min(scores) > FOUND, np.round(scores, 2)
    assert scores == pytest.approx(spectral_alignment(ref, 8000, got, 48000)[: len(scores)], abs=0.05)
