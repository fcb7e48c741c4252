"""Opus encoder/decoder stages: packet framing, round-trip fidelity, stereo, DTX, PLC/FEC, errors."""

from __future__ import annotations

import pathlib
import wave

import numpy as np
import pytest

from gateway.codecs import (
    OPUS_48K,
    OPUS_48K_STEREO,
    AudioFrame,
    EncodedFrame,
    OpusDecoder,
    OpusEncoder,
    packet_channels,
    packet_samples,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "gateway" / "assets"
LEFT_HZ, RIGHT_HZ = 262, 392  # the tones of stereo48k.wav (C4 left, G4 right)
MAX_LAG_SLACK = 8  # samples: hybrid (SILK + CELT) packets decode ~2 samples off the CELT lookahead


def read_wav(name: str) -> tuple[np.ndarray, int]:
    with wave.open(str(ASSETS / name)) as w:
        assert w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return pcm.astype(np.int16), w.getframerate()


def upsample_fft(x: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (ideal) upsampling by zero-padding the spectrum: a reference that does
    not depend on the Resampler under test elsewhere."""
    spectrum = np.fft.rfft(x.astype(float))
    n = len(x) * factor
    padded = np.zeros(n // 2 + 1, dtype=complex)
    padded[: len(spectrum)] = spectrum
    return np.fft.irfft(padded, n) * factor


@pytest.fixture(scope="module")
def speech48k() -> np.ndarray:
    """The first 3 s of or105.wav (8 kHz speech) at 48 kHz, int16 (n, 1)."""
    pcm, rate = read_wav("or105.wav")
    assert rate == 8000
    y = upsample_fft(pcm[: 3 * rate, 0], 6)
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16).reshape(-1, 1)


@pytest.fixture(scope="module")
def stereo48k() -> np.ndarray:
    pcm, rate = read_wav("stereo48k.wav")
    assert rate == 48000 and pcm.shape[1] == 2
    return pcm[: 2 * rate]


def encode_all(enc: OpusEncoder, pcm: np.ndarray, n: int) -> list[EncodedFrame]:
    out = []
    for i in range(0, len(pcm) - n + 1, n):
        out += enc.process(AudioFrame(np.ascontiguousarray(pcm[i : i + n]), 48000, i))
    return out


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(float) - a.mean()
    b = b.astype(float) - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def best_aligned_corr(decoded: np.ndarray, original: np.ndarray, lag: int) -> tuple[float, int]:
    """Best correlation of decoded[k:] with original for k within MAX_LAG_SLACK of `lag`."""
    results = []
    for k in range(lag - MAX_LAG_SLACK, lag + MAX_LAG_SLACK + 1):
        n = min(len(decoded) - k, len(original))
        results.append((corr(decoded[k : k + n], original[:n]), k))
    return max(results)


def tone_db(x: np.ndarray, freq: float) -> float:
    w = np.kaiser(len(x), 16)
    spectrum = np.abs(np.fft.rfft(x.astype(float) * w))
    bins = np.fft.rfftfreq(len(x), 1 / 48000)
    near = np.abs(bins - freq) < 4
    return 20 * np.log10(spectrum[near].max() + 1e-9)


@pytest.mark.parametrize("ptime", [10, 20, 40, 60])
def test_mono_speech_round_trip(ptime, speech48k):
    enc, dec = OpusEncoder(1, ptime), OpusDecoder(1)
    n = 48 * ptime
    packets = encode_all(enc, speech48k, n)
    decoded = []
    for k, p in enumerate(packets):
        assert (p.format, p.samples, p.timestamp) == (OPUS_48K, n, k * n)
        assert packet_samples(p.payload) == n  # one packet of the configured duration
        assert packet_channels(p.payload) == 1
        (frame,) = dec.process(p)
        assert (frame.samples, frame.channels, frame.rate, frame.timestamp) == (n, 1, 48000, k * n)
        decoded.append(frame.pcm[:, 0])
    c, lag = best_aligned_corr(np.concatenate(decoded), speech48k[:, 0], enc.delay)
    assert c > 0.9, f"correlation {c:.3f} at lag {lag}"


@pytest.mark.parametrize("ptime", [10, 20, 40, 60])
def test_stereo_round_trip_keeps_left_left_and_right_right(ptime, stereo48k):
    enc, dec = OpusEncoder(2, ptime), OpusDecoder(2)
    n = 48 * ptime
    packets = encode_all(enc, stereo48k, n)
    frames = []
    for p in packets:
        assert p.format == OPUS_48K_STEREO
        assert packet_samples(p.payload) == n and packet_channels(p.payload) == 2
        (frame,) = dec.process(p)
        assert frame.samples == n and frame.channels == 2
        frames.append(frame.pcm)
    y = np.concatenate(frames)[4800:]  # skip the first 100 ms (codec start-up)
    left, right = y[:, 0], y[:, 1]
    assert tone_db(left, LEFT_HZ) - tone_db(left, RIGHT_HZ) > 30
    assert tone_db(right, RIGHT_HZ) - tone_db(right, LEFT_HZ) > 30
    # and the level is kept (within 1 dB)
    src = stereo48k[4800 : 4800 + len(y)]
    assert abs(tone_db(left, LEFT_HZ) - tone_db(src[:, 0], LEFT_HZ)) < 1
    assert abs(tone_db(right, RIGHT_HZ) - tone_db(src[:, 1], RIGHT_HZ)) < 1


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("ptime", [10, 20, 40, 60])
def test_silence_never_codes_to_two_bytes_or_less(ptime, channels):
    """Argon rejects packets of <= 2 bytes, which DTX would send in silence."""
    enc = OpusEncoder(channels, ptime)
    n = 48 * ptime
    packets = encode_all(enc, np.zeros((48000, channels), dtype=np.int16), n)
    assert min(len(p.payload) for p in packets) > 2


def test_dtx_on_does_send_tiny_packets_in_silence():
    """The other side of the test above: DTX really is a switch, and it is off by default."""
    packets = encode_all(OpusEncoder(1, 20, dtx=True), np.zeros((48000, 1), dtype=np.int16), 960)
    assert min(len(p.payload) for p in packets) <= 2


def test_lookahead_is_the_encoder_delay():
    assert OpusEncoder(1, 20).delay == 312  # 6.5 ms at 48 kHz
    assert OpusEncoder(2, 20, application="voip").delay == 312
    assert OpusEncoder(1, 20, application="restricted_lowdelay").delay == 120  # 2.5 ms


@pytest.mark.parametrize("rate", [8000, 12000, 16000, 24000, 48000])
def test_any_input_rate_codes_48k_packets_with_the_same_lookahead(rate, speech48k):
    """libopus takes 8-48 kHz input; the packets are Opus 48 kHz like any other, their
    samples, timestamps and the lookahead (`delay`) in 48 kHz units, and the speech survives
    at the same delay whatever the input rate."""
    factor = 48000 // rate
    enc, dec = OpusEncoder(1, 20, input_rate=rate), OpusDecoder(1)
    assert enc.input.rate == rate and enc.output == OPUS_48K and enc.frame_samples == rate // 50
    assert enc.delay == 312 and OpusEncoder(1, 20, input_rate=rate, application="restricted_lowdelay").delay == 120
    x = speech48k[::factor] if factor > 1 else speech48k  # or105 is band-limited to 4 kHz: no aliasing
    n = rate // 50
    packets = []
    for i in range(0, len(x) - n + 1, n):
        packets += enc.process(AudioFrame(np.ascontiguousarray(x[i : i + n]), rate, i))
    assert [(p.samples, p.timestamp) for p in packets] == [(960, 960 * k) for k in range(len(packets))]
    y = np.concatenate([dec.process(p)[0].pcm[:, 0] for p in packets])
    c, _ = best_aligned_corr(y, speech48k[:, 0], enc.delay)
    assert c > 0.9, c


def test_bitrate_setting_controls_packet_size(speech48k):
    sizes = {}
    for bitrate in (16000, 64000):
        packets = encode_all(OpusEncoder(1, 20, bitrate=bitrate), speech48k, 960)
        sizes[bitrate] = np.mean([len(p.payload) for p in packets]) * 8 / 0.020  # bit/s
    assert 0.6 * 16000 < sizes[16000] < 1.3 * 16000
    assert 0.6 * 64000 < sizes[64000] < 1.3 * 64000


def test_encoder_rejects_wrong_frames():
    enc = OpusEncoder(1, 20)
    with pytest.raises(LocalProtocolError, match="960"):
        enc.process(AudioFrame.silence(959, 48000))
    with pytest.raises(LocalProtocolError):
        enc.process(AudioFrame.silence(480, 48000))  # a valid Opus size, but not the ptime
    with pytest.raises(LocalProtocolError):
        enc.process(AudioFrame.silence(320, 16000))
    with pytest.raises(LocalProtocolError):
        enc.process(AudioFrame.silence(960, 48000, channels=2))
    with pytest.raises(ValueError):
        OpusEncoder(1, 30)
    with pytest.raises(ValueError):
        OpusEncoder(3, 20)


def test_encoder_without_ptime_takes_any_opus_size():
    enc = OpusEncoder(1, None)
    for n in (120, 240, 480, 960, 1920, 2880, 5760):
        (p,) = enc.process(AudioFrame.silence(n, 48000))
        assert packet_samples(p.payload) == n == p.samples
    with pytest.raises(LocalProtocolError):
        enc.process(AudioFrame.silence(1000, 48000))


def test_decoder_reports_the_real_duration():
    dec = OpusDecoder(1)
    for ptime in (10, 20, 60, 120):
        (p,) = OpusEncoder(1, ptime).process(AudioFrame.silence(48 * ptime, 48000))
        # the sender's EncodedFrame.samples may be wrong; the decoder trusts the packet
        (frame,) = dec.process(EncodedFrame(p.payload, OPUS_48K, 960, 0))
        assert frame.samples == 48 * ptime


def test_mono_packet_into_stereo_decoder_duplicates(speech48k):
    packets = encode_all(OpusEncoder(1, 20), speech48k[:48000], 960)
    dec = OpusDecoder(2)
    y = np.concatenate([dec.process(p)[0].pcm for p in packets])
    assert y.shape[1] == 2 and np.array_equal(y[:, 0], y[:, 1]) and np.abs(y).max() > 1000


@pytest.mark.parametrize(
    "payload, cause",
    [
        (b"", "empty"),
        (b"\x03", "corrupted"),  # code 3 (RFC 6716 §3.2.5) without its frame-count byte
        (b"\x03\x31" + bytes(10), "corrupted"),  # code 3 claiming 49 frames (> 120 ms)
        (b"\x01\x05", "corrupted"),  # code 1 (two equal frames) with an odd payload length
    ],
)
def test_corrupt_packets_are_the_peers_fault(payload, cause):
    dec = OpusDecoder(1)
    with pytest.raises(RemoteProtocolError, match=cause) as info:
        dec.process(EncodedFrame(payload, OPUS_48K, 960, 0))
    assert info.value.close_code == 1007
    if payload:
        with pytest.raises(RemoteProtocolError):
            packet_samples(payload)


def test_decoder_rejects_non_opus_frames():
    with pytest.raises(LocalProtocolError):
        OpusDecoder(1).process(AudioFrame.silence(960, 48000))


def test_plc_continues_a_tone_and_keeps_the_clock():
    t = np.arange(48000) / 48000
    tone = np.rint(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).reshape(-1, 1)
    packets = encode_all(OpusEncoder(1, 20), tone, 960)
    dec = OpusDecoder(1)
    for p in packets[:20]:
        dec.process(p)
    lost = dec.conceal(960)
    assert (lost.samples, lost.timestamp, dec.next_timestamp) == (960, 20 * 960, 21 * 960)
    rms = np.sqrt(np.mean(lost.pcm.astype(float) ** 2))
    assert rms > 0.3 * 8000 / np.sqrt(2)  # PLC extrapolates the tone rather than going silent
    with pytest.raises(LocalProtocolError):
        dec.conceal(100)  # not a multiple of 2.5 ms
    with pytest.raises(LocalProtocolError):
        dec.conceal(5760 + 120)


def test_fec_recovers_lost_speech_better_than_plc(speech48k):
    enc = OpusEncoder(1, 20, fec=True)
    packets = encode_all(enc, speech48k, 960)
    with_fec, plc_only = OpusDecoder(1), OpusDecoder(1)
    fec_corr, plc_corr = [], []
    for k, p in enumerate(packets[:-1]):
        if k in (35, 45, 55, 65, 75, 85, 95):  # lost packets, all within speech
            original = speech48k[k * 960 - enc.delay : (k + 1) * 960 - enc.delay, 0]
            fec_corr.append(corr(with_fec.conceal(960, packets[k + 1].payload).pcm[:, 0], original))
            plc_corr.append(corr(plc_only.conceal(960).pcm[:, 0], original))
        else:
            with_fec.process(p)
            plc_only.process(p)
    assert np.mean(fec_corr) > 0.8
    assert np.mean(fec_corr) > np.mean(plc_corr) + 0.2


def test_flush_emits_the_lookahead_tail(speech48k):
    enc, dec = OpusEncoder(1, 20), OpusDecoder(1)
    x = speech48k[48000 : 48000 + 960 * 25]  # 0.5 s in the middle of speech
    packets = encode_all(enc, x, 960)
    tail = enc.flush()
    assert len(tail) == 1 and tail[0].timestamp == 25 * 960
    y = np.concatenate([dec.process(p)[0].pcm[:, 0] for p in packets + tail])
    # the last 6.5 ms of the input only come out of the flush packet
    c, _ = best_aligned_corr(y, x[:, 0], enc.delay)
    end = x[-960:, 0]
    c_end, _ = best_aligned_corr(y[len(x) - 960 :], end, enc.delay)
    assert c > 0.9 and c_end > 0.9
