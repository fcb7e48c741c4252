"""G.711 u-law stages against the ITU-T G.711 / Sun g711.c reference formulas."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.codecs import (
    PCM16_8K,
    PCM16_16K,
    PCMU_8K,
    AudioFrame,
    EncodedFrame,
    G711Decoder,
    G711Encoder,
)
from gateway.errors import LocalProtocolError

BIAS = 0x84  # 132: bias added before the segment search (G.711, Sun g711.c)
CLIP = 8159  # largest 14-bit magnitude u-law codes
SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])  # 14-bit segment ends


def ulaw2linear(codes: np.ndarray) -> np.ndarray:
    """Sun g711.c ulaw2linear, vectorised: the G.711 u-law decoding table (16-bit output)."""
    u = ~codes.astype(np.int32) & 0xFF
    t = ((u & 0x0F) << 3) + BIAS
    t = t << ((u & 0x70) >> 4)
    return np.where(u & 0x80, BIAS - t, t - BIAS)


def linear2ulaw(pcm: np.ndarray) -> np.ndarray:
    """Sun g711.c linear2ulaw (16-bit input truncated to 14 bits), vectorised."""
    v = pcm.astype(np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), CLIP) + (BIAS >> 2)
    seg = np.searchsorted(SEG_END, v)  # first segment whose end >= v
    uval = np.where(seg >= 8, 0x7F, (seg << 4) | ((v >> (seg + 1)) & 0x0F))  # past the last segment: max code
    return (uval ^ mask).astype(np.uint8)


def decode(payload: bytes) -> np.ndarray:
    (frame,) = G711Decoder().process(EncodedFrame(payload, PCMU_8K, len(payload), 0))
    return frame.pcm[:, 0]


def test_known_code_points():
    assert decode(bytes([0xFF, 0x7F, 0x00, 0x80])).tolist() == [0, 0, -32124, 32124]


def test_full_decode_table_matches_g711_formula():
    codes = np.arange(256, dtype=np.uint8)
    got = decode(codes.tobytes())
    np.testing.assert_array_equal(got, ulaw2linear(codes))
    # the table is odd-symmetric around the sign bit and monotonic within each half
    assert (got[:128] == -got[128:]).all()
    assert (np.diff(got[:128]) > 0).all()


def test_encode_every_int16_matches_reference():
    pcm = np.arange(-32768, 32768, dtype=np.int16).reshape(-1, 1)
    (enc,) = G711Encoder().process(AudioFrame(pcm, 8000, 0))
    got = np.frombuffer(enc.payload, dtype=np.uint8)
    np.testing.assert_array_equal(got, linear2ulaw(pcm[:, 0]))


def test_round_trip_of_decoded_values_is_exact():
    codes = np.array([c for c in range(256) if c != 0x7F], dtype=np.uint8)  # 0x7F (-0) re-encodes as 0xFF (+0)
    linear = ulaw2linear(codes).astype(np.int16).reshape(-1, 1)
    (enc,) = G711Encoder().process(AudioFrame(linear, 8000, 0))
    assert enc.payload == codes.tobytes()


def test_frames_keep_length_and_timestamp():
    pcm = (np.sin(np.arange(160) / 5) * 12000).astype(np.int16).reshape(-1, 1)
    (enc,) = G711Encoder().process(AudioFrame(pcm, 8000, 4800))
    assert (enc.format, enc.samples, enc.timestamp, len(enc.payload)) == (PCMU_8K, 160, 4800, 160)
    (dec,) = G711Decoder().process(enc)
    assert (dec.rate, dec.samples, dec.channels, dec.timestamp) == (8000, 160, 1, 4800)
    # u-law: error within half a quantisation step (< 3 % of the value above the first segment)
    err = np.abs(dec.pcm.astype(int) - pcm)
    assert (err <= np.maximum(np.abs(pcm) * 0.035, 8)).all()


def test_wrong_input_is_our_bug():
    with pytest.raises(LocalProtocolError):
        G711Encoder().process(AudioFrame.silence(320, PCM16_16K.rate))
    with pytest.raises(LocalProtocolError):
        G711Encoder().process(AudioFrame.silence(160, 8000, channels=2))
    with pytest.raises(LocalProtocolError):
        G711Decoder().process(AudioFrame.silence(160, PCM16_8K.rate))
