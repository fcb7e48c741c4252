"""VoIPBIN media stream framing (gateway/adapters/voipbin/wire.py), no event loop needed."""

from __future__ import annotations

import random
import struct
import uuid
import wave

import pytest
from aiortc.rtp import RtpPacket

from conftest import ASSETS
from gateway.adapters.voipbin.wire import (
    MAX_DROPOUT,
    Audio,
    CallUuid,
    Codec,
    Dtmf,
    Encapsulation,
    Hangup,
    Headerless,
    MediaStreamProtocol,
    PeerError,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError

RTP, SLN, AS = Encapsulation.RTP, Encapsulation.SLN, Encapsulation.AUDIOSOCKET
ULAW_20MS = bytes(range(160))  # 160 distinct u-law bytes
SLIN_20MS = struct.pack("<160h", *range(-80 * 100, 80 * 100, 100))  # 320 bytes, little-endian


def rtp(seq: int, ts: int = 0, payload: bytes = ULAW_20MS, *, pt: int = 0, ssrc: int = 0x01020304, marker: int = 0) -> bytes:
    """An RTP v2 packet built by hand (RFC 3550 §5.1): no padding, extension or CSRC."""
    return struct.pack("!BBHII", 0x80, (marker << 7) | pt, seq, ts, ssrc) + payload


def as_frame(kind: int, payload: bytes = b"") -> bytes:
    """An AudioSocket frame built by hand: kind, big-endian length, payload."""
    return struct.pack("!BH", kind, len(payload)) + payload


def expect_rpe(proto: MediaStreamProtocol, message, close_code: int, *fragments: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        proto.receive(message)
    err = info.value
    assert err.close_code == close_code, str(err)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    assert len(str(err).encode()) <= 123  # fits a WebSocket close reason
    return err


# --- RTP --------------------------------------------------------------------------------


def test_rtp_golden_receive_and_aiortc_round_trip():
    golden = bytes.fromhex("80 00 04d2 0000162e deadbeef".replace(" ", "")) + ULAW_20MS
    assert golden == rtp(1234, 5678, ssrc=0xDEADBEEF)
    parsed = RtpPacket.parse(golden)
    assert (parsed.version, parsed.payload_type, parsed.sequence_number, parsed.timestamp, parsed.ssrc) == (
        2, 0, 1234, 5678, 0xDEADBEEF,
    )
    assert parsed.serialize() == golden  # exact round trip through aiortc

    proto = MediaStreamProtocol(RTP)
    assert proto.receive(golden) == [Audio(ULAW_20MS, Codec.ULAW, 1234, 5678, 0)]
    assert proto.peer_ssrc == 0xDEADBEEF
    assert proto.packets_in == 1


def test_rtp_golden_send_bytes():
    proto = MediaStreamProtocol(RTP, ssrc=0x11223344, sequence=1000, timestamp=160000)
    first = proto.send_audio(ULAW_20MS)
    second = proto.send_audio(ULAW_20MS)
    # marker on the first packet only, PT 0 before the peer spoke, +1 sequence, +160 samples
    assert first == bytes.fromhex("8080 03e8 00027100 11223344") + ULAW_20MS
    assert second == bytes.fromhex("8000 03e9 000271a0 11223344") + ULAW_20MS
    assert RtpPacket.parse(second).serialize() == second
    assert proto.packets_out == 2


def test_rtp_csrc_and_extension_are_skipped():
    csrcs = struct.pack("!II", 7, 8)
    extension = struct.pack("!HH", 0xBEDE, 1) + bytes([0x10, 0xAB, 0, 0])  # one-byte header ext
    header = struct.pack("!BBHII", 0x80 | 0x10 | 2, 96, 9, 90, 5)
    [audio] = MediaStreamProtocol(RTP).receive(header + csrcs + extension + ULAW_20MS)
    assert audio.payload == ULAW_20MS
    assert audio.sequence == 9


def test_rtp_padding_is_removed():
    header = struct.pack("!BBHII", 0x80 | 0x20, 0, 1, 0, 5)
    [audio] = MediaStreamProtocol(RTP).receive(header + ULAW_20MS + b"\x00\x00\x03")
    assert audio.payload == ULAW_20MS


@pytest.mark.parametrize("pt", [0, 96])
def test_rtp_accepts_pt_and_echoes_it_back(pt):
    proto = MediaStreamProtocol(RTP, ssrc=1, sequence=0, timestamp=0)
    before = RtpPacket.parse(proto.send_audio(ULAW_20MS))
    assert before.payload_type == 0  # 0 until the peer's first packet
    proto.receive(rtp(50, pt=pt))
    assert proto.payload_type == pt
    after = RtpPacket.parse(proto.send_audio(ULAW_20MS))
    assert after.payload_type == pt
    assert after.marker == 0


@pytest.mark.parametrize("pt", [8, 9, 18, 97, 101, 127])
def test_rtp_other_payload_types_are_refused(pt):
    proto = MediaStreamProtocol(RTP)
    expect_rpe(proto, rtp(1, pt=pt), 1003, f"payload type {pt}")
    assert proto.packets_in == 0


def test_rtp_sequence_wraps_when_sending():
    proto = MediaStreamProtocol(RTP, ssrc=1, sequence=65534, timestamp=0xFFFFFF60)
    packets = [RtpPacket.parse(proto.send_audio(ULAW_20MS)) for _ in range(4)]
    assert [p.sequence_number for p in packets] == [65534, 65535, 0, 1]
    assert [p.timestamp for p in packets] == [0xFFFFFF60, 0, 160, 320]
    assert [p.marker for p in packets] == [1, 0, 0, 0]


def test_rtp_loss_counting_across_wrap_around():
    proto = MediaStreamProtocol(RTP)
    lost = [proto.receive(rtp(seq))[0].lost for seq in (65533, 65535, 2, 3)]
    assert lost == [0, 1, 2, 0]  # 65534 missing; then 0 and 1 missing across the wrap
    assert proto.lost == 3
    assert proto.packets_in == 4


def test_rtp_in_order_wrap_has_no_loss():
    proto = MediaStreamProtocol(RTP)
    seqs = [65534, 65535, 0, 1]
    events = [proto.receive(rtp(seq))[0] for seq in seqs]
    assert [e.sequence for e in events] == seqs
    assert [e.lost for e in events] == [0, 0, 0, 0]
    assert proto.lost == 0


def test_rtp_late_and_duplicate_packets_are_not_loss():
    proto = MediaStreamProtocol(RTP)
    assert proto.receive(rtp(10))[0].lost == 0
    assert proto.receive(rtp(13))[0].lost == 2
    assert proto.receive(rtp(11))[0].lost == 0  # late, already counted
    assert proto.receive(rtp(13))[0].lost == 0  # duplicate
    assert proto.receive(rtp(14))[0].lost == 0  # highest was still 13
    assert proto.lost == 2


def test_rtp_restart_is_not_loss():
    proto = MediaStreamProtocol(RTP)
    proto.receive(rtp(100))
    assert proto.receive(rtp(100 + MAX_DROPOUT))[0].lost == 0  # a jump this big is a restart
    assert proto.receive(rtp(100 + MAX_DROPOUT + 2))[0].lost == 1  # counting resumes from there
    assert proto.receive(rtp(5, ssrc=0x0BADCAFE))[0].lost == 0  # new SSRC: new stream
    assert proto.receive(rtp(7, ssrc=0x0BADCAFE))[0].lost == 1
    assert proto.lost == 2


def test_rtp_gap_just_under_max_dropout_counts():
    proto = MediaStreamProtocol(RTP)
    proto.receive(rtp(0))
    assert proto.receive(rtp(MAX_DROPOUT - 1))[0].lost == MAX_DROPOUT - 2


def test_rtp_timestamp_growing_by_bytes_is_accepted():
    # The service has been seen to advance the timestamp by payload bytes (320 per slin frame).
    proto = MediaStreamProtocol(RTP, Codec.SLIN)
    events = [proto.receive(rtp(i, ts=i * 320, payload=SLIN_20MS, pt=96))[0] for i in range(5)]
    assert [e.timestamp for e in events] == [0, 320, 640, 960, 1280]
    assert all(e.lost == 0 and e.payload == SLIN_20MS and e.codec is Codec.SLIN for e in events)


def test_rtp_empty_payload_yields_no_audio_but_keeps_sequence():
    proto = MediaStreamProtocol(RTP)
    proto.receive(rtp(1))
    assert proto.receive(rtp(2, payload=b"")) == []
    assert proto.receive(rtp(3))[0].lost == 0
    assert proto.codec_resolved


@pytest.mark.parametrize(
    "message, fragment",
    [
        (rtp(1)[:11], "less than 12 bytes"),
        (b"\x40" + rtp(1)[1:], "invalid version"),  # version 1
        (struct.pack("!BBHII", 0x82, 0, 1, 0, 5) + b"\x00\x00\x00\x07", "truncated CSRC"),
        (struct.pack("!BBHII", 0x90, 0, 1, 0, 5) + b"\xbe\xde", "truncated extension profile"),
        (struct.pack("!BBHII", 0x90, 0, 1, 0, 5) + b"\xbe\xde\x00\x02" + b"\x00" * 4, "truncated extension value"),
        (struct.pack("!BBHII", 0xA0, 0, 1, 0, 5) + b"\x00\x00\x09", "padding length is invalid"),
        (struct.pack("!BBHII", 0xA0, 0, 1, 0, 5) + b"\x00\x00\x00", "padding length is invalid"),
    ],
)
def test_rtp_malformed_packets(message, fragment):
    expect_rpe(MediaStreamProtocol(RTP), message, 1002, "malformed RTP packet", fragment)


def test_rtp_oversize_payload():
    expect_rpe(MediaStreamProtocol(RTP), rtp(1, payload=b"\x00" * 1922), 1009, "1922 bytes")
    [audio] = MediaStreamProtocol(RTP, Codec.SLIN).receive(rtp(1, payload=b"\x00" * 1920))
    assert len(audio.payload) == 1920


def test_rtp_odd_slin_payload():
    expect_rpe(MediaStreamProtocol(RTP, Codec.SLIN), rtp(1, payload=b"\x00" * 321), 1007, "odd", "321")


# --- SLN --------------------------------------------------------------------------------


def test_sln_golden_both_ways():
    proto = MediaStreamProtocol(SLN)
    assert proto.codec is Codec.SLIN
    assert proto.receive(SLIN_20MS) == [Audio(SLIN_20MS, Codec.SLIN, None, None, 0)]
    assert proto.send_audio(SLIN_20MS) == SLIN_20MS
    assert proto.send_hangup() is None
    assert (proto.packets_in, proto.packets_out, proto.lost) == (1, 1, 0)


def test_sln_odd_length_in_slin():
    expect_rpe(MediaStreamProtocol(SLN), b"\x00" * 319, 1007, "odd", "319")


def test_sln_ulaw_accepts_any_length():
    [audio] = MediaStreamProtocol(SLN, Codec.ULAW).receive(b"\x7f" * 161)
    assert audio.codec is Codec.ULAW and len(audio.payload) == 161


def test_sln_oversize():
    expect_rpe(MediaStreamProtocol(SLN), b"\x00" * 1922, 1009, "1922 bytes", "1920")


# --- AudioSocket ------------------------------------------------------------------------


def test_audiosocket_golden_every_kind():
    call = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    proto = MediaStreamProtocol(AS)
    assert proto.receive(b"\x10\x01\x40" + SLIN_20MS) == [Audio(SLIN_20MS, Codec.SLIN, None, None, 0)]
    assert proto.receive(b"\x00\x00\x00") == [Hangup()]
    assert proto.receive(b"\x01\x00\x10" + call.bytes) == [CallUuid("12345678-9abc-def0-1234-56789abcdef0")]
    assert proto.receive(b"\x03\x00\x01" + b"#") == [Dtmf("#")]
    assert proto.receive(b"\x03\x00\x01" + b"b") == [Dtmf("B")]
    assert proto.receive(b"\xff\x00\x00") == [PeerError(None, b"")]
    assert proto.receive(b"\xff\x00\x01\x02") == [PeerError(2, b"\x02")]
    assert proto.receive(b"\x10\x00\x00") == []  # empty audio frame: nothing to play


def test_audiosocket_several_frames_in_one_message():
    call = uuid.uuid4()
    message = as_frame(0x01, call.bytes) + as_frame(0x10, SLIN_20MS) + as_frame(0x03, b"5") + as_frame(0x00)
    events = MediaStreamProtocol(AS).receive(message)
    assert events == [CallUuid(str(call)), Audio(SLIN_20MS, Codec.SLIN, None, None, 0), Dtmf("5"), Hangup()]


def test_audiosocket_golden_send():
    proto = MediaStreamProtocol(AS)
    assert proto.send_audio(SLIN_20MS) == b"\x10\x01\x40" + SLIN_20MS
    assert proto.send_hangup() == b"\x00\x00\x00"
    call = "12345678-9abc-def0-1234-56789abcdef0"
    assert proto.send_uuid(call) == b"\x01\x00\x10" + bytes.fromhex("123456789abcdef0123456789abcdef0")
    assert proto.send_uuid(uuid.UUID(call)) == proto.send_uuid(call)
    assert proto.send_dtmf("7") == b"\x03\x00\x017"
    assert proto.send_dtmf("d") == b"\x03\x00\x01D"


def test_audiosocket_send_receive_round_trip():
    sender, receiver = MediaStreamProtocol(AS), MediaStreamProtocol(AS)
    call = str(uuid.uuid4())
    message = sender.send_uuid(call) + sender.send_audio(SLIN_20MS) + sender.send_dtmf("*") + sender.send_hangup()
    assert receiver.receive(message) == [
        CallUuid(call), Audio(SLIN_20MS, Codec.SLIN, None, None, 0), Dtmf("*"), Hangup(),
    ]


MALFORMED_AUDIOSOCKET = [
    (b"\x10\x01", 1002, ("header truncated", "expected 3", "got 2")),
    (b"\x10\x01\x40" + SLIN_20MS[:100], 1002, ("audio frame truncated", "expected 320", "got 100")),
    (as_frame(0x10, SLIN_20MS) + b"\x00", 1002, ("header truncated", "got 1")),
    (b"\x02\x00\x00", 1003, ("unknown AudioSocket kind 0x02",)),
    (b"\x11\x01\x40" + SLIN_20MS, 1003, ("unknown AudioSocket kind 0x11",)),
    (as_frame(0x01, b"\x00" * 15), 1007, ("UUID", "15 bytes", "expected 16")),
    (as_frame(0x03, b""), 1007, ("DTMF",)),
    (as_frame(0x03, b"12"), 1007, ("DTMF",)),
    (as_frame(0x03, b"x"), 1007, ("DTMF",)),
    (as_frame(0x10, b"\x00" * 321), 1007, ("odd", "321")),
    (b"\x10\x07\x82" + b"\x00" * 1922, 1009, ("1922 bytes", "1920")),
    (b"\x10\xff\xff", 1009, ("65535 bytes",)),  # declared too big: refused before reading
]


def framed(codec: Codec = Codec.AUTO) -> MediaStreamProtocol:
    """An audiosocket protocol whose session started with a well-formed AudioSocket message."""
    proto = MediaStreamProtocol(AS, codec)
    assert proto.receive(as_frame(0x10, SLIN_20MS)) == [Audio(SLIN_20MS, Codec.SLIN, None, None, 0)]
    assert not proto.headerless
    return proto


@pytest.mark.parametrize("message, code, fragments", MALFORMED_AUDIOSOCKET)
def test_audiosocket_malformed(message, code, fragments):
    # once the session is AudioSocket, every malformed message is refused
    expect_rpe(framed(), message, code, *fragments)
    # as a first message of odd length (never raw slin): refused the same way
    if len(message) % 2:
        expect_rpe(MediaStreamProtocol(AS), message, code, *fragments)


@pytest.mark.parametrize("message, code, fragments", [m for m in MALFORMED_AUDIOSOCKET if len(m[0]) % 2 == 0])
def test_audiosocket_malformed_even_first_message_is_raw_slin(message, code, fragments):
    proto = MediaStreamProtocol(AS)
    [note, audio] = proto.receive(message)
    assert isinstance(note, Headerless) and fragments[0] in note.reason, note
    assert audio == Audio(message, Codec.SLIN, None, None, 0)
    assert proto.headerless and proto.codec is Codec.SLIN and proto.packets_in == 1


# --- AudioSocket without headers: the spec's Node.js example ------------------------------


def speech_slin() -> bytes:
    """The bundled recording as raw slin (PCM16 LE 8 kHz mono): what the example sends."""
    with wave.open(str(ASSETS / "or105.wav")) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return w.readframes(w.getnframes())


def test_headerless_node_example_stream_is_raw_slin_audio():
    """What the example sends: the file in 320-byte chunks (the last one shorter)."""
    raw = speech_slin()
    chunks = [raw[i : i + 320] for i in range(0, len(raw), 320)]
    assert len(chunks[-1]) < 320
    proto = MediaStreamProtocol(AS)
    events = [event for chunk in chunks for event in proto.receive(chunk)]
    assert isinstance(events[0], Headerless) and "unknown AudioSocket kind" in events[0].reason
    audio = events[1:]
    assert all(isinstance(e, Audio) and e.codec is Codec.SLIN and e.lost == 0 for e in audio)
    assert b"".join(e.payload for e in audio) == raw  # every byte, in order, as audio
    assert proto.headerless and proto.packets_in == len(chunks)
    # what we send back stays AudioSocket (the encapsulation the client asked for)
    assert proto.send_audio(SLIN_20MS) == b"\x10\x01\x40" + SLIN_20MS
    assert proto.send_hangup() == b"\x00\x00\x00"


@pytest.mark.parametrize("size", [2, 160, 320, 322, 480, 640, 960, 1920])
def test_headerless_split_invariance(size):
    """However the raw stream is cut into even-length messages, the audio is the same bytes."""
    raw = speech_slin()[8000:24000]
    proto = MediaStreamProtocol(AS)
    events = [e for i in range(0, len(raw), size) for e in proto.receive(raw[i : i + size])]
    assert sum(isinstance(e, Headerless) for e in events) == 1 and isinstance(events[0], Headerless)
    assert b"".join(e.payload for e in events if isinstance(e, Audio)) == raw
    assert all(e.codec is Codec.SLIN for e in events if isinstance(e, Audio))  # 160 bytes too: never u-law


def test_headerless_detection_at_every_offset_of_real_speech():
    """A session whose first chunk starts anywhere in the speech is recognised as raw slin:
    speech starts with a known kind byte often, but never chains frames to the chunk's end."""
    raw = speech_slin()
    looked_like_a_header = 0
    for offset in range(0, len(raw) - 320, 2):
        chunk = raw[offset : offset + 320]
        looked_like_a_header += chunk[0] in (0x00, 0x01, 0x03, 0x10, 0xFF)
        events = MediaStreamProtocol(AS).receive(chunk)
        assert isinstance(events[0], Headerless) and events[1].payload == chunk, offset
    assert looked_like_a_header > 1000


@pytest.mark.parametrize(
    "chunk, why",
    [
        # starts like an audio frame whose length is the rest of the message: an odd payload
        (b"\x10\x01\x3d" + bytes(range(256)) + bytes(61), "odd"),
        # starts like a 320-byte audio frame, but the message is too short for it
        (b"\x10\x01\x40" + bytes(317), "truncated"),
        # digital silence: a run of hangup frames when the length is a multiple of 3
        (bytes(480), "frame after a hangup"),
        (bytes(960), "frame after a hangup"),
        (bytes(1920), "frame after a hangup"),
        (bytes(320), "frame after a hangup"),  # (would be 106 hangups and 2 bytes)
        (b"\x00\x01\x3d" + bytes(317), "hangup frame with a 317-byte payload"),
        (b"\xff\x00\x01\x04" + bytes(316), "frame after an error"),
        (b"\x10\x00\x00" + b"\x10\x01\x3b" + bytes(314), "empty AudioSocket audio frame"),
        (b"\x01\x00\x10" + bytes(16) + b"\x10\x01\x40" + bytes(298), "truncated"),  # a UUID, then a cut frame
    ],
)
def test_headerless_ambiguous_first_messages_are_raw_slin(chunk, why):
    assert len(chunk) % 2 == 0
    proto = MediaStreamProtocol(AS)
    events = proto.receive(chunk)
    assert isinstance(events[0], Headerless) and why in events[0].reason, events[0]
    assert events[1:] == [Audio(chunk, Codec.SLIN, None, None, 0)]
    assert proto.headerless


@pytest.mark.parametrize(
    "message, expected",
    [
        # UUID then audio (Asterisk's order), even in length: AudioSocket
        (as_frame(0x01, uuid.UUID(int=5).bytes) + as_frame(0x10, SLIN_20MS),
         [CallUuid(str(uuid.UUID(int=5))), Audio(SLIN_20MS, Codec.SLIN, None, None, 0)]),
        (as_frame(0x10, SLIN_20MS) + as_frame(0x03, b"1") + as_frame(0x00),  # ends with a hangup
         [Audio(SLIN_20MS, Codec.SLIN, None, None, 0), Dtmf("1"), Hangup()]),
        (as_frame(0x10, SLIN_20MS[:316]) + as_frame(0xFF),  # ends with an error
         [Audio(SLIN_20MS[:316], Codec.SLIN, None, None, 0), PeerError(None, b"")]),
    ],
)
def test_well_formed_even_first_messages_stay_audiosocket(message, expected):
    assert len(message) % 2 == 0
    proto = MediaStreamProtocol(AS)
    assert proto.receive(message) == expected
    assert not proto.headerless


def test_a_raw_chunk_well_formed_by_chance_is_audiosocket_and_the_next_raw_one_is_refused():
    """The rule's residual ambiguity fails loudly, on the second message."""
    lucky = as_frame(0x10, bytes(314)) + as_frame(0x00)  # 320 bytes of "PCM" that parse whole
    proto = MediaStreamProtocol(AS)
    assert proto.receive(lucky) == [Audio(bytes(314), Codec.SLIN, None, None, 0), Hangup()]
    expect_rpe(proto, speech_slin()[:320], 1003, "unknown AudioSocket kind")


def test_an_audiosocket_session_keeps_refusing_garbage():
    raw = speech_slin()
    expect_rpe(framed(), raw[:320], 1003, "unknown AudioSocket kind")
    expect_rpe(framed(), bytes(320), 1002, "truncated")
    expect_rpe(framed(Codec.SLIN), b"\x10\x01\x3d" + bytes(317), 1007, "odd")
    # a first message of odd length that is AudioSocket settles the framing too
    proto = MediaStreamProtocol(AS)
    assert proto.receive(as_frame(0x03, b"5")) == [Dtmf("5")]
    expect_rpe(proto, bytes(320), 1002)
    assert not proto.headerless


def test_headerless_session_checks_sizes_like_sln():
    proto = MediaStreamProtocol(AS)
    proto.receive(speech_slin()[:320])
    assert proto.headerless
    [audio] = proto.receive(b"\x10\x01\x40" + SLIN_20MS + b"\x00")  # a "header" is audio now
    assert audio.payload[:3] == b"\x10\x01\x40" and len(audio.payload) == 324
    expect_rpe(proto, b"\x00" * 321, 1007, "odd", "321")
    proto = MediaStreamProtocol(AS)
    proto.receive(speech_slin()[:320])
    expect_rpe(proto, b"\x00" * 1922, 1009, "1922 bytes")
    # the first message itself may be refused for its size
    expect_rpe(MediaStreamProtocol(AS), speech_slin()[:4000], 1009, "4000 bytes")


def test_headerless_with_explicit_codecs():
    chunk = speech_slin()[:320]
    assert isinstance(MediaStreamProtocol(AS, Codec.SLIN).receive(chunk)[0], Headerless)
    # explicit u-law: raw u-law has no sample boundaries to check, so no detection
    proto = MediaStreamProtocol(AS, Codec.ULAW)
    expect_rpe(proto, chunk, 1003, "unknown AudioSocket kind")
    assert not proto.headerless


def test_headerless_is_only_about_audiosocket():
    chunk = speech_slin()[:320]
    for encapsulation in (SLN, RTP):
        proto = MediaStreamProtocol(encapsulation, Codec.SLIN)
        try:
            events = proto.receive(chunk)
        except RemoteProtocolError:  # raw speech is not an RTP packet
            events = []
        assert not any(isinstance(e, Headerless) for e in events) and not proto.headerless


def test_audiosocket_only_helpers_refuse_other_encapsulations():
    for encapsulation in (RTP, SLN):
        proto = MediaStreamProtocol(encapsulation)
        with pytest.raises(LocalProtocolError, match="audiosocket"):
            proto.send_uuid(str(uuid.uuid4()))
        with pytest.raises(LocalProtocolError, match="audiosocket"):
            proto.send_dtmf("1")
        assert proto.send_hangup() is None


def test_send_helpers_validate_arguments():
    proto = MediaStreamProtocol(AS)
    for bad in ("", "12", "x", "E"):
        with pytest.raises(LocalProtocolError, match="DTMF"):
            proto.send_dtmf(bad)
    with pytest.raises(LocalProtocolError, match="not a UUID"):
        proto.send_uuid("not-a-uuid")


# --- common: messages, codec, sizes -----------------------------------------------------


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
def test_text_message_is_refused(encapsulation):
    expect_rpe(MediaStreamProtocol(encapsulation), "hello", 1003, "text message on a binary media stream")


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
def test_empty_message_is_refused(encapsulation):
    expect_rpe(MediaStreamProtocol(encapsulation), b"", 1002, "empty message")


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
def test_bytearray_and_memoryview_are_accepted(encapsulation):
    message = MediaStreamProtocol(encapsulation, Codec.SLIN).send_audio(SLIN_20MS)
    for view in (bytearray(message), memoryview(message)):
        [audio] = MediaStreamProtocol(encapsulation, Codec.SLIN).receive(view)
        assert audio.payload == SLIN_20MS and type(audio.payload) is bytes


def wrap(encapsulation: Encapsulation, payload: bytes, seq: int = 1) -> bytes:
    if encapsulation is RTP:
        return rtp(seq, payload=payload)
    if encapsulation is AS:
        return as_frame(0x10, payload)
    return payload


@pytest.mark.parametrize(
    "encapsulation, default", [(RTP, Codec.ULAW), (SLN, Codec.SLIN), (AS, Codec.SLIN)]
)
def test_codec_default_before_first_audio(encapsulation, default):
    proto = MediaStreamProtocol(encapsulation)
    assert proto.codec is default and not proto.codec_resolved


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
@pytest.mark.parametrize("size, resolved", [(160, Codec.ULAW), (320, Codec.SLIN)])
def test_codec_auto_detects_from_first_payload(encapsulation, size, resolved):
    proto = MediaStreamProtocol(encapsulation)
    [audio] = proto.receive(wrap(encapsulation, b"\x02" * size))
    assert audio.codec is resolved
    assert proto.codec is resolved and proto.codec_resolved
    # the decision is final: a later payload of the other size does not switch it
    other = 480 if size == 320 else 320
    [later] = proto.receive(wrap(encapsulation, b"\x02" * other, seq=2))
    assert later.codec is resolved and proto.codec is resolved
    # and what we send back is in the resolved codec
    assert len(proto.send_audio(b"\x00" * size)) >= size
    with pytest.raises(LocalProtocolError, match=f"{size} bytes of {resolved.value}"):
        proto.send_audio(b"\x00" * (480 - size))


@pytest.mark.parametrize(
    "encapsulation, default", [(RTP, Codec.ULAW), (SLN, Codec.SLIN), (AS, Codec.SLIN)]
)
def test_codec_auto_other_size_keeps_default(encapsulation, default):
    proto = MediaStreamProtocol(encapsulation)
    [audio] = proto.receive(wrap(encapsulation, b"\x02" * 240))
    assert audio.codec is default and proto.codec is default and proto.codec_resolved
    [later] = proto.receive(wrap(encapsulation, b"\x02" * (160 if default is Codec.SLIN else 320), seq=2))
    assert later.codec is default


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
@pytest.mark.parametrize("codec, size", [(Codec.ULAW, 320), (Codec.SLIN, 160)])
def test_explicit_codec_never_switches(encapsulation, codec, size):
    proto = MediaStreamProtocol(encapsulation, codec)
    [audio] = proto.receive(wrap(encapsulation, b"\x02" * size))
    assert audio.codec is codec and proto.codec is codec


def test_refused_first_payload_leaves_codec_open():
    proto = MediaStreamProtocol(SLN)
    expect_rpe(proto, b"\x00" * 321, 1007, "odd")
    assert not proto.codec_resolved


def test_rtp_sends_slin_after_detecting_it():
    proto = MediaStreamProtocol(RTP, ssrc=1, sequence=0, timestamp=0)
    proto.receive(rtp(1, payload=SLIN_20MS, pt=96))
    first = RtpPacket.parse(proto.send_audio(SLIN_20MS))
    second = RtpPacket.parse(proto.send_audio(SLIN_20MS))
    assert first.payload == SLIN_20MS and first.payload_type == 96
    assert second.timestamp - first.timestamp == 160  # samples, not bytes


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
def test_send_audio_refuses_wrong_frame_size(encapsulation):
    proto = MediaStreamProtocol(encapsulation, Codec.ULAW)
    for size in (0, 159, 161, 320):
        with pytest.raises(LocalProtocolError, match="160 bytes of ulaw"):
            proto.send_audio(b"\x00" * size)
    assert proto.packets_out == 0


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
def test_dial_listen_round_trip(encapsulation):
    dial, listen = MediaStreamProtocol(encapsulation, Codec.SLIN), MediaStreamProtocol(encapsulation)
    frames = [bytes([i]) * 320 for i in range(5)]
    received = [event for frame in frames for event in listen.receive(dial.send_audio(frame))]
    assert [e.payload for e in received] == frames
    assert all(e.codec is Codec.SLIN and e.lost == 0 for e in received)
    assert listen.packets_in == dial.packets_out == 5


def test_random_ssrc_and_start():
    a, b = MediaStreamProtocol(RTP), MediaStreamProtocol(RTP)
    pa, pb = RtpPacket.parse(a.send_audio(ULAW_20MS)), RtpPacket.parse(b.send_audio(ULAW_20MS))
    assert (pa.ssrc, pa.sequence_number, pa.timestamp) != (pb.ssrc, pb.sequence_number, pb.timestamp)
    assert pa.ssrc == a.ssrc


def test_constructor_validates():
    with pytest.raises(LocalProtocolError):
        MediaStreamProtocol("rtp")
    with pytest.raises(LocalProtocolError, match="sequence"):
        MediaStreamProtocol(RTP, sequence=65536)
    with pytest.raises(LocalProtocolError, match="ssrc"):
        MediaStreamProtocol(RTP, ssrc=-1)


# --- robustness: truncation and fuzzing -------------------------------------------------

_CALL = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
AUDIOSOCKET_FRAMES = [
    as_frame(0x10, SLIN_20MS),
    as_frame(0x10, ULAW_20MS),
    as_frame(0x00),
    as_frame(0x01, _CALL.bytes),
    as_frame(0x03, b"9"),
    as_frame(0xFF),
    as_frame(0xFF, b"\x04"),
]


@pytest.mark.parametrize("frame", AUDIOSOCKET_FRAMES, ids=lambda f: f"kind{f[0]:02x}-len{len(f) - 3}")
def test_audiosocket_every_truncation_raises(frame):
    assert MediaStreamProtocol(AS).receive(frame) is not None  # the whole frame is valid
    for cut in range(len(frame)):
        err = expect_rpe(framed(), frame[:cut], 1002)  # in an AudioSocket session
        assert "empty" in str(err) or "truncated" in str(err)
        if cut % 2 or not cut:  # a first message of odd length (or empty): refused the same way
            expect_rpe(MediaStreamProtocol(AS), frame[:cut], 1002)
        else:  # of even length: raw slin
            assert MediaStreamProtocol(AS).receive(frame[:cut])[1:] == [Audio(frame[:cut], Codec.SLIN, None, None, 0)]


def test_rtp_truncation_in_header_raises_and_in_payload_shortens():
    extension = struct.pack("!HH", 0xBEDE, 1) + bytes([0x10, 0xAB, 0, 0])
    header = struct.pack("!BBHII", 0x80 | 0x10 | 1, 0, 9, 90, 5) + struct.pack("!I", 7) + extension
    packet = header + ULAW_20MS
    for cut in range(len(packet)):
        proto = MediaStreamProtocol(RTP)
        if cut < len(header):
            expect_rpe(proto, packet[:cut], 1002)
        else:  # RTP carries no length: a cut in the payload is a shorter payload
            events = proto.receive(packet[:cut])
            assert [e.payload for e in events] == ([ULAW_20MS[: cut - len(header)]] if cut > len(header) else [])


def test_rtp_slin_truncation_at_odd_offsets_raises():
    packet = rtp(1, payload=SLIN_20MS)
    for cut in range(12, len(packet)):
        proto = MediaStreamProtocol(RTP, Codec.SLIN)
        if (cut - 12) % 2:
            expect_rpe(proto, packet[:cut], 1007, "odd")
        else:
            proto.receive(packet[:cut])


@pytest.mark.parametrize("encapsulation", list(Encapsulation))
@pytest.mark.parametrize("codec", [Codec.AUTO, Codec.ULAW, Codec.SLIN])
def test_fuzz_never_raises_anything_but_remote_protocol_error(encapsulation, codec):
    rng = random.Random(f"{encapsulation.value}-{codec.value}")
    seeds = [rtp(1), rtp(2, payload=SLIN_20MS, pt=96), SLIN_20MS, *AUDIOSOCKET_FRAMES, b"".join(AUDIOSOCKET_FRAMES)]
    outcomes = set()
    settled = MediaStreamProtocol(encapsulation, codec)  # one session for every message
    for _ in range(3000):
        message = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):  # mutate a few bytes, maybe cut or extend
            op = rng.randrange(3)
            if op == 0 and message:
                message[rng.randrange(len(message))] = rng.randrange(256)
            elif op == 1:
                del message[rng.randrange(len(message) + 1):]
            else:
                message += bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
        # the same message in the long session, and as the first message of a new one
        for proto in (settled, MediaStreamProtocol(encapsulation, codec)):
            try:
                events = proto.receive(bytes(message))
            except RemoteProtocolError as err:
                assert err.close_code in (1002, 1003, 1007, 1009)
                outcomes.add(err.close_code)
            else:
                assert all(isinstance(e, (Audio, Hangup, CallUuid, Dtmf, PeerError, Headerless)) for e in events)
                assert sum(isinstance(e, Headerless) for e in events) <= 1
                outcomes.add("ok")
    assert "ok" in outcomes and len(outcomes) >= 2  # the fuzzer reached both paths
