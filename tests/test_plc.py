"""G.711 Appendix I waveform-repeat concealment (gateway/codecs/plc.py), pure, on recorded
speech (gateway/assets/or105.wav, or109.wav: 8 kHz).

What a listener would check: a lost 20 ms packet sounds like the speech around it rather than
a hole (its spectrum is close to the lost one's, and PESQ of the whole clip is higher than with
silence fill); neither the start of a loss nor the next good packet clicks (no sample step
larger than the speech itself makes); a long loss fades to silence by 60 ms and the speech
fades back in; received packets pass through untouched, 3.75 ms late.

Why the spectrum and not the waveform SNR per lost frame: a repeated pitch period drifts in
phase against the real one within a few ms, so the sample-by-sample error of a 20 ms frame is
about as large as the frame itself for any concealment (near 0 dB, sometimes below); what
the ear (and PESQ) hears is the spectral envelope and level, which waveform repeat keeps and
silence loses.
"""

from __future__ import annotations

import numpy as np
import pytest

from audio_checks import read_wav
from conftest import ASSETS
from gateway.codecs.plc import DELAY, PITCH_MAX, G711Plc, find_pitch

FRAME = 160  # 20 ms at 8 kHz
SPEECH = ("or105.wav", "or109.wav")
SEEDS = (0, 1, 2)


def speech(name: str) -> np.ndarray:
    pcm, rate = read_wav(ASSETS / name)
    assert rate == 8000
    x = pcm[:, 0]
    return x[: len(x) // FRAME * FRAME]


def losses(frames: int, seed: int, rate: float = 0.05) -> np.ndarray:
    """5 % random loss; never the first few frames (no history yet) nor the last two."""
    lost = np.random.default_rng(seed).random(frames) < rate
    lost[:4] = False
    lost[-2:] = False
    return lost


def through_plc(x: np.ndarray, lost: np.ndarray) -> np.ndarray:
    """What the concealer plays for `x` with the frames in `lost` missing, re-aligned (the
    DELAY samples it holds back removed), int64 for arithmetic."""
    plc = G711Plc()
    out = [plc.conceal(FRAME) if gone else plc.good(x[k * FRAME : (k + 1) * FRAME]) for k, gone in enumerate(lost)]
    out.append(plc.flush())
    y = np.concatenate(out)[:, 0]
    assert len(y) == len(x) + DELAY
    return y[DELAY:].astype(np.int64)


def silence_filled(x: np.ndarray, lost: np.ndarray) -> np.ndarray:
    y = x.astype(np.int64).copy()
    for k in np.nonzero(lost)[0]:
        y[k * FRAME : (k + 1) * FRAME] = 0
    return y


def log_spectral_distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS difference of the Hann-windowed log magnitude spectra of two frames, dB (a floor of
    100 per bin, about -60 dBFS, so silence is far from speech but not infinitely)."""
    window = np.hanning(len(a))
    spectrum_a = 20 * np.log10(np.abs(np.fft.rfft(a * window)) + 100.0)
    spectrum_b = 20 * np.log10(np.abs(np.fft.rfft(b * window)) + 100.0)
    return float(np.sqrt(np.mean((spectrum_a - spectrum_b) ** 2)))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def test_received_frames_pass_through_untouched_and_late_by_the_delay():
    x = speech("or105.wav")[: 50 * FRAME]
    plc = G711Plc()
    y = np.concatenate([plc.good(x[k * FRAME : (k + 1) * FRAME].reshape(-1, 1)) for k in range(50)] + [plc.flush()])
    assert y.dtype == np.int16 and y.shape == (len(x) + DELAY, 1)
    assert not y[:DELAY].any() and np.array_equal(y[DELAY:, 0], x)
    assert DELAY == 30  # 3.75 ms: P/4 of the longest pitch period (the start-of-loss overlap-add)


@pytest.mark.parametrize("name", SPEECH)
def test_concealment_is_closer_to_the_lost_speech_than_silence(name):
    pesq = pytest.importorskip("pesq").pesq
    x = speech(name)
    frames = len(x) // FRAME
    voiced = better = 0
    levels = []
    for seed in SEEDS:
        lost = losses(frames, seed)
        concealed, silent = through_plc(x, lost), silence_filled(x, lost)
        for k in np.nonzero(lost)[0]:
            original = x[k * FRAME : (k + 1) * FRAME].astype(np.float64)
            if rms(original) < 300:  # a pause: any fill is as good as another
                continue
            voiced += 1
            plc_lsd = log_spectral_distance(original, concealed[k * FRAME : (k + 1) * FRAME])
            silence_lsd = log_spectral_distance(original, silent[k * FRAME : (k + 1) * FRAME])
            better += plc_lsd < silence_lsd
            # and near the lost frame's level (silence is -inf dB from it); frame by frame it
            # differs where the lost frame starts or ends a word (the repeat keeps the level before)
            levels.append(20 * np.log10(rms(concealed[k * FRAME : (k + 1) * FRAME]) / rms(original) + 1e-9))
        reference = x.astype(np.float64)
        with_plc = pesq(8000, reference, concealed.astype(np.float64), "nb")
        with_silence = pesq(8000, reference, silent.astype(np.float64), "nb")
        assert with_plc > with_silence + 0.03, f"seed {seed}: PESQ {with_plc:.2f} with PLC, {with_silence:.2f} silence"
    assert voiced >= 10
    assert np.median(np.abs(levels)) < 6.0, np.round(levels, 1)
    assert better == voiced  # every lost frame of speech: the concealment's spectrum is closer


def max_step(y: np.ndarray, start: int, stop: int) -> int:
    return int(np.max(np.abs(np.diff(y[start:stop]))))


@pytest.mark.parametrize("name", SPEECH)
def test_no_click_where_a_loss_starts_or_ends(name):
    """The largest sample-to-sample step around each join is no larger than the largest step
    of the original speech over the surrounding 70 ms (the history the repeat comes from, the
    lost frame and the next): a click is a step the speech itself never makes. Silence fill
    fails the same measure on many joins (the recordings have a DC offset of ~85 and speech
    does not start from zero)."""
    x = speech(name)
    frames = len(x) // FRAME
    joins = silence_clicks = 0
    for seed in SEEDS:
        lost = losses(frames, seed)
        concealed, silent = through_plc(x, lost), silence_filled(x, lost.copy())
        original = x.astype(np.int64)
        for k in np.nonzero(lost)[0]:
            begin, end = k * FRAME, (k + 1) * FRAME
            bound = max_step(original, max(0, begin - 400), end + FRAME) + 1
            if not lost[k - 1]:  # the start of the loss: good -> synthetic
                assert max_step(concealed, begin - 40, begin + 40) <= bound, f"seed {seed}: click at loss {k}"
            if not lost[k + 1]:  # the end: synthetic -> the next good frame, over the join
                joins += 1
                assert max_step(concealed, end - 10, end + 80) <= bound, f"seed {seed}: click after loss {k}"
                silence_clicks += max_step(silent, end - 10, end + 80) > bound
    assert joins >= 40
    assert silence_clicks >= joins // 4  # the measure does catch a hard join


def test_a_long_loss_fades_to_silence_and_the_speech_fades_back_in():
    # a steady vowel-like tone: the repeat keeps its level, so each 10 ms shows the gain alone
    t = np.arange(8000)
    tone = (4000 * np.sin(2 * np.pi * t / 80) + 2000 * np.sin(2 * np.pi * 3 * t / 80 + 1)).astype(np.int16)
    lost = np.zeros(50, dtype=bool)
    lost[20:26] = True  # 120 ms
    y = through_plc(tone, lost)
    begin = 20 * FRAME
    units = [rms(y[begin + u * 80 : begin + (u + 1) * 80]) for u in range(12)]
    full = rms(tone[:800])
    # full level for 10 ms, then -20 % per 10 ms (mean gain of each 10 ms: 1, .9, .7, .5, .3, .1)
    assert np.allclose(np.array(units[:6]) / full, [1.0, 0.9, 0.7, 0.5, 0.3, 0.1], atol=0.02), np.round(units, 0)
    assert units[6:] == [0.0] * 6  # from 60 ms on: digital silence

    # recorded speech, lost at its loudest frame for 120 ms
    x = speech("or105.wav")
    energy = [rms(x[k * FRAME : (k + 1) * FRAME]) for k in range(len(x) // FRAME)]
    k0 = int(np.argmax(energy[5:-10])) + 5
    lost = np.zeros(len(x) // FRAME, dtype=bool)
    lost[k0 : k0 + 6] = True
    y = through_plc(x, lost)
    begin, end = k0 * FRAME, (k0 + 6) * FRAME
    units = [rms(y[begin + u * 80 : begin + (u + 1) * 80]) for u in range(12)]
    history = max(rms(x[begin - 400 + u * 80 : begin - 400 + (u + 1) * 80]) for u in range(5))
    for u, gain in enumerate([1.0, 1.0, 0.8, 0.6, 0.4, 0.2]):  # the gain at the start of each 10 ms
        assert units[u] <= gain * history * 1.2 + 1, f"10 ms unit {u}: {np.round(units)} (history {history:.0f})"
    assert units[0] > 0.3 * rms(x[begin - 80 : begin])  # the first 10 ms sound like the speech before
    assert not y[begin + 480 : end].any()
    # the next packet fades in from silence over 10 ms, then plays untouched
    join = y[end : end + 80].astype(np.float64)
    assert abs(join[0]) <= abs(x[end]) * 0.02 + 1
    ramp = np.arange(1, 81) / 80
    assert np.all(np.abs(join - ramp * x[end : end + 80]) <= 1)
    assert np.array_equal(y[end + 80 : end + 400], x[end + 80 : end + 400])


@pytest.mark.parametrize("period", [64, 80, 97, 113, 120])
def test_pitch_of_a_periodic_signal(period):
    rng = np.random.default_rng(period)
    t = np.arange(400)
    harmonics = sum(rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * h * t / period + rng.uniform(0, 6.3)) for h in range(1, 6))
    signal = 3000 * harmonics + rng.normal(0, 30, len(t))
    assert find_pitch(signal) == period
    # below 61 samples a multiple of the period (also in the range) may win: as good to repeat
    short = 3000 * np.sin(2 * np.pi * t / 50)
    assert find_pitch(short) % 50 == 0 and find_pitch(short) <= PITCH_MAX


def test_any_frame_size():
    x = speech("or109.wav")[: 40 * FRAME]
    plc = G711Plc()
    sizes = [80, 160, 240, 160, 80]
    pos = 0
    for size in sizes:
        assert plc.good(x[pos : pos + size]).shape == (size, 1)
        pos += size
    for size in (80, 240, 40, 200):  # 70 ms lost in odd pieces
        out = plc.conceal(size)
        assert out.shape == (size, 1) and out.dtype == np.int16
    assert plc.erased_ms == pytest.approx(70.0)
    assert plc.good(x[pos : pos + 160]).shape == (160, 1) and plc.erased_ms == 0
