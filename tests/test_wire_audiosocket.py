"""AudioSocket framing over a byte stream (gateway/adapters/audiosocket/wire.py), no event loop."""

from __future__ import annotations

import random
import struct
import uuid

import pytest

from gateway.adapters.audiosocket.wire import (
    AUDIO_KIND_OF_RATE,
    AUDIO_RATES,
    Audio,
    CallUuid,
    Dtmf,
    FrameParser,
    Hangup,
    PeerError,
    audio_frame,
    dtmf_frame,
    error_frame,
    hangup_frame,
    uuid_frame,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError

CALL = uuid.UUID("40325ec2-5efd-4bd3-805f-53576e581d13")  # the documentation's example UUID
SLIN_20MS = struct.pack("<160h", *range(-8000, 8000, 100))  # 320 bytes, little-endian
SLIN16_20MS = struct.pack("<320h", *range(-16000, 16000, 100))  # 640 bytes


def frame(kind: int, payload: bytes = b"") -> bytes:
    """A frame built by hand: kind, big-endian length, payload."""
    return struct.pack("!BH", kind, len(payload)) + payload


# What Asterisk sends on a call: the UUID, audio, a key press, audio at 16 kHz (channel driver
# with c(slin16)), an error report, an empty audio frame, the hangup.
STREAM = (
    frame(0x01, CALL.bytes)
    + frame(0x10, SLIN_20MS)
    + frame(0x03, b"5")
    + frame(0x10, SLIN_20MS[::-1])
    + frame(0x12, SLIN16_20MS)
    + frame(0xFF, b"\x02")
    + frame(0x10)
    + frame(0x00)
)
EVENTS = [
    CallUuid(str(CALL)),
    Audio(SLIN_20MS, 8000),
    Dtmf("5"),
    Audio(SLIN_20MS[::-1], 8000),
    Audio(SLIN16_20MS, 16000),
    PeerError(2, b"\x02"),
    Hangup(),
]
# frame boundaries of STREAM (offsets where a frame starts), and the end
BOUNDARIES = [0, 19, 342, 346, 669, 1312, 1316, 1319, 1322]


def feed(parser: FrameParser, pieces) -> list:
    """The events of `pieces` fed in order (empty ones skipped: b"" is the end of the stream)."""
    return [event for piece in pieces if piece for event in parser.receive_data(piece)]


def expect_rpe(fn, close_code: int, *fragments: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        fn()
    err = info.value
    assert err.close_code == close_code, str(err)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    return err


def test_boundaries_of_the_stream():
    assert len(STREAM) == BOUNDARIES[-1]


def test_golden_every_kind():
    parser = FrameParser()
    assert parser.receive_data(STREAM) == EVENTS
    assert parser.receive_data(b"") == [] and parser.eof and parser.buffered == 0
    assert parser.frames_in == 8  # the empty audio frame is a frame, but no event


@pytest.mark.parametrize("kind, rate", sorted(AUDIO_RATES.items()))
def test_every_audio_kind_and_its_rate(kind, rate):
    # the released table (docs.asterisk.org "AudioSocket"): 0x10 8 kHz ... 0x18 192 kHz
    samples = rate // 50  # 20 ms (44.1 kHz: 882 samples)
    payload = bytes(range(256)) * (2 * samples // 256) + bytes(2 * samples % 256)
    assert FrameParser().receive_data(frame(kind, payload)) == [Audio(payload, rate)]
    assert AUDIO_KIND_OF_RATE[rate] == kind
    assert audio_frame(payload, kind) == frame(kind, payload)


def test_documented_rate_table():
    assert dict(AUDIO_RATES) == {0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000,
                                 0x15: 44100, 0x16: 48000, 0x17: 96000, 0x18: 192000}


def test_split_at_every_offset_gives_the_same_events():
    for cut in range(len(STREAM) + 1):
        parser = FrameParser()
        first = feed(parser, [STREAM[:cut]])
        assert first == EVENTS[: sum(1 for b in BOUNDARIES[1:] if b <= cut and b != 1319)]  # (1319: empty audio)
        assert first + feed(parser, [STREAM[cut:]]) == EVENTS, cut
        assert parser.buffered == 0


def test_split_at_every_pair_of_offsets_around_each_header():
    # three pieces, both cuts anywhere within 4 bytes of a frame boundary (headers split in two)
    near = sorted({c for b in BOUNDARIES for c in range(b - 4, b + 5) if 0 <= c <= len(STREAM)})
    for i in near:
        for j in near:
            if i <= j:
                assert feed(FrameParser(), [STREAM[:i], STREAM[i:j], STREAM[j:]]) == EVENTS, (i, j)


def test_one_byte_at_a_time_and_random_splits():
    assert feed(FrameParser(), [STREAM[i : i + 1] for i in range(len(STREAM))]) == EVENTS
    rng = random.Random(13)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
        pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
        assert feed(FrameParser(), pieces) == EVENTS


def test_bytearray_and_memoryview_input():
    parser = FrameParser()
    assert parser.receive_data(bytearray(STREAM[:500])) + parser.receive_data(memoryview(STREAM)[500:]) == EVENTS
    assert all(type(e.payload) is bytes for e in EVENTS if isinstance(e, Audio))


def test_end_of_stream_at_every_offset():
    """EOF on a frame boundary is a clean end; anywhere else names what was cut."""
    for cut in range(len(STREAM) + 1):
        parser = FrameParser()
        feed(parser, [STREAM[:cut]])
        if cut in BOUNDARIES:
            assert parser.receive_data(b"") == [] and parser.eof
            continue
        start = max(b for b in BOUNDARIES if b < cut)
        got = cut - start
        if got < 3:
            expect_rpe(lambda: parser.receive_data(b""), 1002, "header truncated at end of stream",
                       "expected 3 bytes", f"got {got}")
        else:
            length = struct.unpack("!H", STREAM[start + 1 : start + 3])[0]
            expect_rpe(lambda: parser.receive_data(b""), 1002, "frame truncated at end of stream",
                       f"expected {length} payload bytes", f"got {got - 3}")


def test_truncated_messages_name_the_kind():
    parser = FrameParser()
    parser.receive_data(frame(0x10, SLIN_20MS)[:103])
    expect_rpe(lambda: parser.receive_data(b""), 1002,
               "AudioSocket audio frame truncated at end of stream: expected 320 payload bytes, got 100")
    parser = FrameParser()
    parser.receive_data(frame(0x01, CALL.bytes)[:10])
    expect_rpe(lambda: parser.receive_data(b""), 1002, "UUID frame truncated")


MALFORMED = [
    # (bytes, close code, fragments): each refused as soon as the fault is in the buffer
    (b"\x02\x00\x00", 1003, ("unknown AudioSocket kind 0x02",)),  # the Go library's old "silence"
    (b"\x19\x01\x40", 1003, ("unknown AudioSocket kind 0x19",)),
    (b"\x04\x00\x00", 1003, ("unknown AudioSocket kind 0x04",)),
    (b"\xfe\x00\x00", 1003, ("unknown AudioSocket kind 0xfe",)),
    (b"\x10\x07\x82", 1009, ("audio payload 1922 bytes", "limit 1920")),  # 120 ms of 8 kHz is the limit
    (b"\x12\x0f\x02", 1009, ("audio payload 3842 bytes", "limit 3840")),  # 120 ms of 16 kHz
    (b"\x10\xff\xff", 1009, ("65535 bytes",)),  # declared too big: refused before any payload
    (b"\x01\x07\x81", 1009, ("UUID payload 1921 bytes", "limit 1920")),
    (frame(0x01, bytes(15)), 1007, ("UUID", "15 bytes", "expected 16")),
    (frame(0x01, bytes(17)), 1007, ("UUID", "17 bytes")),
    (frame(0x03), 1007, ("DTMF",)),
    (frame(0x03, b"12"), 1007, ("DTMF", "2 bytes")),
    (frame(0x03, b"x"), 1007, ("DTMF",)),
    (frame(0x10, bytes(321)), 1007, ("odd length", "321 bytes")),
    (frame(0x16, bytes(1)), 1007, ("odd length", "1 bytes")),
]


@pytest.mark.parametrize("data, code, fragments", MALFORMED, ids=lambda v: v.hex()[:12] if isinstance(v, bytes) else None)
def test_malformed_frames_are_refused(data, code, fragments):
    expect_rpe(lambda: FrameParser().receive_data(data), code, *fragments)
    # after good frames, split anywhere: refused the same way, once the faulty bytes are in
    for cut in range(len(data)):
        parser = FrameParser()
        assert feed(parser, [frame(0x01, CALL.bytes) + data[:cut]]) == [CallUuid(str(CALL))]
        expect_rpe(lambda: parser.receive_data(data[cut:]), code, *fragments)


def test_a_restricted_rate_table_refuses_the_other_audio_kinds():
    parser = FrameParser({0x10: 8000})
    assert parser.receive_data(frame(0x10, SLIN_20MS)) == [Audio(SLIN_20MS, 8000)]
    expect_rpe(lambda: parser.receive_data(frame(0x12, SLIN16_20MS)), 1003, "unknown AudioSocket kind 0x12")
    with pytest.raises(LocalProtocolError):
        FrameParser({0x10: 8000}, limits={0x00: ("hangup", 0)})  # an audio kind without a limit


def test_lower_case_dtmf_and_every_digit():
    assert FrameParser().receive_data(frame(0x03, b"b")) == [Dtmf("B")]
    for digit in "0123456789*#ABCD":
        assert FrameParser().receive_data(dtmf_frame(digit)) == [Dtmf(digit)]


def test_hangup_payload_is_ignored_and_error_payloads():
    assert FrameParser().receive_data(frame(0x00, b"\x01")) == [Hangup()]
    assert FrameParser().receive_data(frame(0xFF)) == [PeerError(None, b"")]
    assert FrameParser().receive_data(frame(0xFF, b"\x05xy")) == [PeerError(5, b"\x05xy")]


def test_receive_after_end_of_stream_is_our_bug():
    parser = FrameParser()
    parser.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        parser.receive_data(hangup_frame())


def test_serializers_golden_and_round_trip():
    assert hangup_frame() == b"\x00\x00\x00"
    assert uuid_frame(str(CALL)) == b"\x01\x00\x10" + bytes.fromhex("40325ec25efd4bd3805f53576e581d13")
    assert uuid_frame(CALL) == uuid_frame(str(CALL))
    assert dtmf_frame("7") == b"\x03\x00\x017" and dtmf_frame("d") == b"\x03\x00\x01D"
    assert audio_frame(SLIN_20MS) == b"\x10\x01\x40" + SLIN_20MS
    assert error_frame() == b"\xff\x00\x00" and error_frame(4) == b"\xff\x00\x01\x04"
    stream = uuid_frame(CALL) + audio_frame(SLIN_20MS) + dtmf_frame("#") + error_frame(1) + hangup_frame()
    assert FrameParser().receive_data(stream) == [
        CallUuid(str(CALL)), Audio(SLIN_20MS, 8000), Dtmf("#"), PeerError(1, b"\x01"), Hangup(),
    ]


@pytest.mark.parametrize("call", [lambda: uuid_frame("not-a-uuid"), lambda: uuid_frame(5),  # type: ignore[arg-type]
                                  lambda: dtmf_frame("x"), lambda: dtmf_frame("12"),
                                  lambda: audio_frame(bytes(3)), lambda: audio_frame(bytes(2), 0x01),
                                  lambda: audio_frame(bytes(65536)), lambda: error_frame(256),
                                  lambda: error_frame(True)])
def test_serializers_refuse_what_is_not_a_frame(call):
    with pytest.raises(LocalProtocolError):
        call()


def test_the_uuid_of_a_first_frame_is_read_only_when_the_frame_is_whole():
    """What the supervisor of `--workers N` peeks at to pick the worker (gateway.workers)."""
    from gateway.adapters.audiosocket.wire import audio_frame, uuid_frame, uuid_of_first_frame

    call = "40325ec2-5efd-4bd3-805f-53576e581d13"
    frame = uuid_frame(call)
    assert uuid_of_first_frame(frame) == call and uuid_of_first_frame(frame + b"\x10\x00") == call
    assert uuid_of_first_frame(frame[:18]) is None  # not all there yet
    assert uuid_of_first_frame(audio_frame(b"\0" * 320)) is None  # another kind of frame first
    assert uuid_of_first_frame(b"\x01\x00\x11" + bytes(17)) is None  # a UUID frame of the wrong length
