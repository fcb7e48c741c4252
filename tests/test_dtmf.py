"""DTMF both ways (issue 11): RFC 4733 telephone-events on VoIPBIN rtp, AudioSocket DTMF frames,
Q.23 tones on sln, and the `dtmf` route event between endpoints.

Pure (no event loop): the RFC 4733 payload (golden bytes), key presses from packets (the three
end packets counted once, a lost end, sequence wrap-around, no `Audio.lost` from event
packets, codec detection and the payload type we answer with unaffected), the packets we send
(marker, one timestamp, growing duration, three end packets, our SSRC and sequence numbers,
audio resuming at the right timestamp), and the tone generator (Goertzel: the key's two Q.23
frequencies dominate every other DTMF frequency; duration and pause).

End to end over loopback (a running gateway): a VoIPBIN rtp client presses a key in the middle
of its speech (one route event with digit and duration, the stream stays open, the recording
of its speech has no gap and no garbage), and the other way: a VideoSDK message or an agent
client message makes a VoIPBIN client receive RFC 4733 packets (rtp), one DTMF frame
(audiosocket), or the tone pair (sln, found with Goertzel in what it received).
"""

from __future__ import annotations

import audioop
import json
import struct

import httpx
import numpy as np
import pytest
import trio
from aiortc.rtp import RtpPacket
from trio_websocket import ConnectionClosed

from audio_checks import (
    assert_blocks_found,
    assert_correlated,
    blockwise_blocks,
    read_wav,
    write_wav,
)
from conftest import ASSETS
from gateway.adapters.agent import wire as agent_wire
from gateway.adapters.voipbin.dtmf import (
    DTMF_QUEUE,
    LOST_END_MS,
    DtmfSender,
    KeyPress,
    TelephoneEvent,
    event_updates,
    telephone_event_payload,
)
from gateway.adapters.voipbin.wire import Audio, Codec, Encapsulation, MediaStreamProtocol
from gateway.codecs.dtmf import (
    FREQUENCIES,
    HIGH_GROUP_HZ,
    KEYS,
    LOW_GROUP_HZ,
    TONE_LEVEL_DBM0,
    dtmf_key,
    duration_ms_of,
    goertzel_power,
    tone,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError
from harness import AGENT_API_KEY, SECRETS, VOIPBIN_TOKEN, start, ws_client
from test_videosdk_endpoint import Device, wait_for

RTP = Encapsulation.RTP
ULAW_20MS = bytes(range(160))
SSRC = 0x5EED5EED
DTMF_FREQUENCIES = LOW_GROUP_HZ + HIGH_GROUP_HZ


def rtp(seq: int, ts: int, payload: bytes = ULAW_20MS, *, pt: int = 0, marker: bool = False, ssrc: int = SSRC) -> bytes:
    """An RTP v2 packet built by hand (RFC 3550 §5.1)."""
    return struct.pack("!BBHII", 0x80, (int(marker) << 7) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def event_packet(seq: int, ts: int, key: str, duration: int, *, end: bool = False, marker: bool = False, pt: int = 101) -> bytes:
    """An RFC 4733 telephone-event packet built by hand (§2.3): event, E|R|volume (10), duration."""
    payload = struct.pack("!BBH", KEYS.index(key), (0x80 if end else 0) | 10, duration)
    return rtp(seq, ts, payload, pt=pt, marker=marker)


def press_packets(seq: int, ts: int, key: str, updates: int = 5, *, pt: int = 101) -> list[bytes]:
    """One key press as a sender sends it (RFC 4733 §2.5.1): `updates` packets of growing
    duration (160 per 20 ms), the last with E, sent three times; consecutive sequence numbers."""
    durations = [160 * k for k in range(1, updates + 1)] + [160 * updates] * 2
    return [event_packet(seq + i, ts, key, d, end=i >= updates - 1, marker=i == 0, pt=pt) for i, d in enumerate(durations)]


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def presses(events) -> list[KeyPress]:
    return [e for e in events if isinstance(e, KeyPress)]


# ------------------------------------------------------------------ RFC 4733: the payload
def test_telephone_event_payload_golden_bytes_and_parse():
    # key 5, E bit, volume 10 (-10 dBm0), 800 timestamp units (100 ms at 8 kHz): RFC 4733 §2.3
    assert telephone_event_payload(5, 800, end=True) == bytes.fromhex("058a0320")
    assert telephone_event_payload(11, 160, end=False, volume=63) == bytes.fromhex("0b3f00a0")
    parsed = TelephoneEvent.parse(bytes.fromhex("05ca0320"), marker=False, timestamp=7, sequence=9)  # R bit set: ignored
    assert (parsed.event, parsed.end, parsed.volume, parsed.duration, parsed.key, parsed.duration_ms) == (5, True, 10, 800, "5", 100)
    for code, key in enumerate("0123456789*#ABCD"):  # RFC 4733 §3.2
        assert TelephoneEvent.parse(bytes([code, 0, 0, 0]), marker=True, timestamp=0, sequence=0).key == key
    assert TelephoneEvent.parse(bytes([16, 0, 0, 0]), marker=True, timestamp=0, sequence=0).key is None  # flash: no key
    with pytest.raises(ValueError, match="5 bytes, expected 4"):
        TelephoneEvent.parse(b"\x05\x8a\x03\x20\x00", marker=False, timestamp=0, sequence=0)
    with pytest.raises(ValueError):
        telephone_event_payload(5, 65536, end=True)


# ------------------------------------------------------------------ receiving on rtp
def test_a_press_in_speech_is_one_key_press_and_no_audio_loss():
    """Audio, a press replacing the audio (7 event packets), audio again: one KeyPress, after
    the first end packet only; the event packets' sequence numbers are not audio loss."""
    proto = MediaStreamProtocol(RTP)
    events = [*proto.receive(rtp(100, 16000)), *proto.receive(rtp(101, 16160))]
    for packet in press_packets(102, 16320, "5"):
        events += proto.receive(packet)
    events += proto.receive(rtp(109, 16320 + 7 * 160))
    assert kinds(events) == ["Audio"] * 2 + ["TelephoneEvent"] * 5 + ["KeyPress"] + ["TelephoneEvent"] * 2 + ["Audio"]
    assert presses(events) == [KeyPress("5", 100, 16320, True)]
    assert [e.lost for e in events if isinstance(e, Audio)] == [0, 0, 0]
    assert (proto.lost, proto.packets_in, proto.events_in) == (0, 3, 7)
    telephone = [e for e in events if isinstance(e, TelephoneEvent)]
    assert [e.marker for e in telephone] == [True] + [False] * 6
    assert [e.duration for e in telephone] == [160, 320, 480, 640, 800, 800, 800]


def test_event_packets_interleaved_with_audio_are_not_loss_across_the_sequence_wrap():
    """A sender that keeps sending audio during the event, one event packet before each audio
    packet, across the 16-bit sequence wrap: every audio packet arrives with `lost` 0."""
    proto = MediaStreamProtocol(RTP)
    seq, ts, events = 65530, 0xFFFFFD00, []
    for k in range(4):
        events += proto.receive(rtp(seq, ts + 160 * k))
        seq += 1
    packets = press_packets(0, ts + 640, "#")  # sequence numbers rewritten below
    for k, packet in enumerate(packets):
        events += proto.receive(packet[:2] + struct.pack("!H", seq & 0xFFFF) + packet[4:])
        events += proto.receive(rtp(seq + 1, ts + 160 * (4 + k)))
        seq += 2
    audio = [e for e in events if isinstance(e, Audio)]
    assert len(audio) == 11 and all(a.lost == 0 for a in audio) and proto.lost == 0
    assert audio[-1].sequence == (seq - 1) & 0xFFFF < 100  # wrapped
    assert presses(events) == [KeyPress("#", 100, (ts + 640) & 0xFFFFFFFF, True)]


def test_a_lost_event_packet_is_not_audio_loss_but_lost_audio_still_is():
    proto = MediaStreamProtocol(RTP)
    proto.receive(rtp(10, 0))
    packets = press_packets(11, 160, "1")
    first = proto.receive(packets[0])
    later = proto.receive(packets[2])  # packet 12 (an update) lost
    assert first[0].lost == 0 and later[0].lost == 1
    for packet in packets[3:]:
        proto.receive(packet)
    after = proto.receive(rtp(18, 1280))  # the next audio follows the last end packet
    assert after[0].lost == 0 and proto.lost == 0
    assert proto.receive(rtp(20, 1600))[0].lost == 1 and proto.lost == 1  # audio packet 19 lost


def test_the_three_end_packets_count_once_even_reordered():
    proto = MediaStreamProtocol(RTP)
    packets = press_packets(500, 8000, "9")
    order = [0, 1, 2, 3, 5, 4, 6]  # the second end packet overtakes the first
    events = [e for i in order for e in proto.receive(packets[i])]
    events += proto.receive(packets[6])  # a duplicate of the last end packet
    assert presses(events) == [KeyPress("9", 100, 8000, True)]


def test_a_press_whose_end_packets_were_lost_ends_at_the_next_event():
    proto = MediaStreamProtocol(RTP)
    events = []
    for packet in press_packets(1, 1000, "1")[:4]:  # updates only: every end packet lost
        events += proto.receive(packet)
    assert presses(events) == []
    second = press_packets(10, 3000, "2")
    events = proto.receive(second[0])  # a new timestamp: the first press is over
    assert presses(events) == [KeyPress("1", 80, 1000, False)]
    events = [e for packet in second[1:] for e in proto.receive(packet)]
    assert presses(events) == [KeyPress("2", 100, 3000, True)]
    assert proto.lost == 0  # the gap of the lost end packets is between event packets


def test_a_press_whose_end_packets_were_lost_ends_after_audio_resumes():
    """Packets 1-2 arrive, the three end packets 3-5 are lost, audio resumes at 6: the gap is
    the event's, not audio loss, and the press ends once LOST_END_MS of audio came."""
    proto = MediaStreamProtocol(RTP)
    packets = press_packets(1, 1000, "*", updates=3)
    for packet in packets[:2]:
        proto.receive(packet)
    events, slots, audio = [], 0, []
    while not presses(events):
        events = proto.receive(rtp(6 + slots, 1480 + 160 * slots))
        audio += [e for e in events if isinstance(e, Audio)]
        slots += 1
    assert audio[0].lost == 0 and proto.lost == 0
    # ended by the audio packet that brought LOST_END_MS of audio, before that packet's Audio
    assert slots * 20 >= LOST_END_MS > (slots - 1) * 20
    assert kinds(events) == ["KeyPress", "Audio"] and presses(events) == [KeyPress("*", 40, 1000, False)]
    assert presses(proto.receive(packets[4])) == []  # an end packet, very late: the same press
    assert proto.flush() == []
    assert proto.receive(rtp(20, 9000))[0].lost == 20 - (6 + slots)  # later audio loss still counts


def test_only_the_end_packets_arrive_and_flush_at_the_end_of_the_stream():
    proto = MediaStreamProtocol(RTP)
    packets = press_packets(40, 6400, "D")
    assert presses(proto.receive(packets[5])) == [KeyPress("D", 100, 6400, True)]
    assert presses(proto.receive(packets[6])) == []
    proto.receive(event_packet(60, 9000, "0", 160, marker=True))
    assert proto.flush() == [KeyPress("0", 20, 9000, False)]  # the stream ended mid-press


def test_other_events_are_ignored_and_end_an_open_press():
    proto = MediaStreamProtocol(RTP)
    proto.receive(event_packet(1, 100, "3", 160, marker=True))
    flash = rtp(2, 900, struct.pack("!BBH", 16, 10, 160), pt=101, marker=True)  # event 16: hook flash
    events = proto.receive(flash)
    assert kinds(events) == ["TelephoneEvent", "KeyPress"] and presses(events)[0].digit == "3"
    assert kinds(proto.receive(rtp(3, 900, struct.pack("!BBH", 16, 0x8A, 320), pt=101))) == ["TelephoneEvent"]


def test_a_long_press_in_segments_is_one_press():
    """RFC 4733 §2.5.1.3: past 65535 timestamp units the event goes on in a new segment (new
    timestamp, no marker bit, same key): one press, the segments' durations added up."""
    proto = MediaStreamProtocol(RTP)
    events = proto.receive(event_packet(1, 0, "0", 160, marker=True))
    events += proto.receive(event_packet(2, 0, "0", 65535))
    events += proto.receive(event_packet(3, 65535, "0", 8000))
    events += proto.receive(event_packet(4, 65535, "0", 16000, end=True))
    assert presses(events) == [KeyPress("0", round((65535 + 16000) / 8), 0, True)]


def test_codec_detection_and_answered_payload_type_ignore_telephone_events():
    proto = MediaStreamProtocol(RTP, ssrc=1, sequence=0, timestamp=0)
    proto.receive(event_packet(1, 0, "4", 160, marker=True))  # 4 bytes: neither u-law nor slin size
    assert (proto.codec, proto.codec_resolved, proto.payload_type) == (Codec.ULAW, False, 0)
    [audio] = proto.receive(rtp(2, 160, bytes(320), pt=96))
    assert audio.codec is Codec.SLIN and proto.payload_type == 96
    proto.receive(event_packet(3, 320, "4", 320))
    assert proto.payload_type == 96 and proto.codec is Codec.SLIN  # audio goes out as before
    assert RtpPacket.parse(proto.send_audio(bytes(320))).payload_type == 96


def test_the_payload_type_is_configurable_and_checked():
    proto = MediaStreamProtocol(RTP, dtmf_payload_type=110)
    assert kinds(proto.receive(event_packet(1, 0, "7", 160, marker=True, pt=110))) == ["TelephoneEvent"]
    with pytest.raises(RemoteProtocolError) as refused:
        proto.receive(event_packet(2, 0, "7", 320, pt=101))
    assert refused.value.close_code == 1003 and "payload type 101 not supported" in str(refused.value)
    for bad in (96, 95, 128, True, "101"):
        with pytest.raises(LocalProtocolError, match="dtmf_payload_type"):
            MediaStreamProtocol(RTP, dtmf_payload_type=bad)


def test_a_malformed_telephone_event_closes_1003_and_changes_nothing():
    proto = MediaStreamProtocol(RTP)
    proto.receive(rtp(1, 0))
    with pytest.raises(RemoteProtocolError) as refused:
        proto.receive(rtp(5, 160, b"\x05\x8a\x03", pt=101))
    err = refused.value
    assert err.close_code == 1003 and "telephone-event" in str(err) and "3 bytes, expected 4" in str(err)
    assert len(str(err).encode()) <= 123  # fits a close reason
    assert proto.receive(rtp(2, 160))[0].lost == 0  # the refused packet did not move the sequence
    assert proto.receive(rtp(6, 160, b"", pt=101)) == []  # empty: keepalive-like, no event


# ------------------------------------------------------------------ sending
def test_rfc4733_packets_we_send():
    """A 100 ms press between audio packets (RFC 4733 §2.5.1): marker on the first event packet,
    the slot's timestamp for all, duration +160 per packet, the final packet three times with
    E, our SSRC and consecutive sequence numbers, payload type `dtmf_payload_type`; the audio
    resumes at the timestamp of the slot it is sent in, with its own payload type."""
    proto = MediaStreamProtocol(RTP, ssrc=0xABCDEF01, sequence=65533, timestamp=1000, dtmf_payload_type=110)
    proto.receive(rtp(1, 0, pt=96))  # the peer's audio: we answer with 96
    sender = DtmfSender("rtp")
    assert sender.press("5", 100) and sender.busy
    wire = [proto.send_audio(ULAW_20MS)]
    slots = []
    while sender.busy:
        slot = sender.slot(proto)
        slots.append(slot)
        wire += slot.messages if not slot.audio else [proto.send_audio(ULAW_20MS)]
    wire.append(proto.send_audio(ULAW_20MS))
    packets = [RtpPacket.parse(m) for m in wire]
    assert [p.sequence_number for p in packets] == [(65533 + i) & 0xFFFF for i in range(len(packets))]
    assert {p.ssrc for p in packets} == {0xABCDEF01}
    events = [p for p in packets if p.payload_type == 110]
    assert len(events) == 7 and [s.started for s in slots[:2]] == ["5", None]
    assert all(p.timestamp == 1160 for p in events)  # the timestamp of the slot the event began in
    assert [p.marker for p in events] == [1, 0, 0, 0, 0, 0, 0]
    assert [p.payload for p in events] == [telephone_event_payload(5, d, end=e) for d, e in event_updates(100)]
    assert [e for _, e in event_updates(100)] == [False] * 4 + [True] * 3
    audio = [p for p in packets if p.payload_type == 96]
    assert [p.timestamp for p in audio] == [1000] + [1160 + 160 * k for k in range(7, len(audio) + 6)]
    assert len(slots) == 8 and slots[-1].audio  # after the end packets, one slot of audio (the pause)
    assert proto.events_out == 7 and proto.packets_out == len(audio)


def test_event_updates_for_odd_durations():
    assert event_updates(70) == [(160, False), (320, False), (480, False), (560, True), (560, True), (560, True)]
    assert event_updates(10) == [(80, True)] * 3
    assert event_updates(9000)[-1] == (65535, True)  # one segment at most


def test_send_telephone_event_refuses_misuse():
    with pytest.raises(LocalProtocolError, match="only on rtp"):
        MediaStreamProtocol(Encapsulation.SLN).send_telephone_event(5, 160, start=True, end=False)
    proto = MediaStreamProtocol(RTP)
    with pytest.raises(LocalProtocolError, match="no event started"):
        proto.send_telephone_event(5, 160, start=False, end=False)
    with pytest.raises(LocalProtocolError, match="out of range"):
        proto.send_telephone_event(5, 70000, start=True, end=False)


def test_what_we_send_is_one_press_for_our_own_receiver():
    sender_proto, receiver = MediaStreamProtocol(RTP), MediaStreamProtocol(RTP)
    sender = DtmfSender("rtp")
    for key, ms in (("1", 100), ("1", 60), ("#", 250)):
        sender.press(key, ms)
    received = []
    for _ in range(40):
        slot = sender.slot(sender_proto) if sender.busy else None
        for message in slot.messages if slot and not slot.audio else [sender_proto.send_audio(ULAW_20MS)]:
            received += receiver.receive(message)
    assert [(p.digit, p.duration_ms, p.end_seen) for p in presses(received)] == [("1", 100, True), ("1", 60, True), ("#", 250, True)]
    assert receiver.lost == 0


def test_audiosocket_sends_one_dtmf_frame_per_press_and_keeps_the_audio():
    proto = MediaStreamProtocol(Encapsulation.AUDIOSOCKET)
    sender = DtmfSender("audiosocket")
    sender.press("7", 100)
    sender.press("A", 100)
    slots = [sender.slot(proto) for _ in range(2)]
    assert [s.messages for s in slots] == [(b"\x03\x00\x017",), (b"\x03\x00\x01A",)]
    assert all(s.audio and s.tone is None for s in slots) and not sender.busy


def test_sln_sends_the_tone_then_a_pause_in_place_of_the_audio():
    sender = DtmfSender("sln")
    sender.press("8", 100)
    slots = []
    while sender.busy:
        slots.append(sender.slot(MediaStreamProtocol(Encapsulation.SLN)))
    assert len(slots) == 8  # 100 ms of tone + at least 50 ms of pause, in 20 ms slots
    assert [s.started for s in slots] == ["8"] + [None] * 7
    pcm = np.concatenate([s.tone for s in slots])
    assert np.array_equal(pcm, tone("8", 100, frame_samples=160))
    assert not pcm[800:].any() and np.all(np.abs(pcm[:800]).reshape(5, 160).max(axis=1) > 5000)


def test_the_send_queue_is_bounded_and_refuses_non_keys():
    sender = DtmfSender("rtp")
    assert all(sender.press("1", 100) for _ in range(DTMF_QUEUE))
    assert not sender.press("2", 100) and sender.queued == DTMF_QUEUE
    with pytest.raises(ValueError):
        sender.press("X", 100)


@pytest.mark.parametrize(
    "value, problem",
    [("96", "96 is the payload type of VoIPBIN's audio"), ("128", "expected at most 127"),
     ("90", "expected at least 96"), ("te", "expected an integer")],
)
def test_the_dtmf_payload_type_option_is_checked(value, problem):
    from gateway.config import GatewayConfig
    from gateway.daemon import Gateway
    from gateway.errors import ConfigError

    text = f"""\
server: {{http: "127.0.0.1:0", media: "127.0.0.1:0"}}
services: {{voipbin: {{token: "{VOIPBIN_TOKEN}"}}}}
routes:
  - name: r
    endpoints:
      - voipbin: {{role: listen, call_id: c1, dtmf_payload_type: {value}}}
      - record: {{path: /tmp/dtmf_never_written.wav}}
"""
    with pytest.raises(ConfigError) as info:
        Gateway(GatewayConfig.from_text(text, "gw.yaml")).build()
    message = str(info.value)
    assert message.startswith("gw.yaml:") and "dtmf_payload_type" in message and problem in message
    assert VOIPBIN_TOKEN not in message


# ------------------------------------------------------------------ keys and tones
def test_keys_and_durations_from_event_fields():
    assert [dtmf_key(v) for v in ("5", "*", "#", "a", "D")] == ["5", "*", "#", "A", "D"]
    assert [dtmf_key(v) for v in ("x", "55", "", 5, None, "E")] == [None] * 6
    assert [duration_ms_of(v) for v in (None, "200", True, 250, 10, 60000, 99.6, float("nan"))] == [
        100, 100, 100, 250, 40, 8000, 100, 100]


@pytest.mark.parametrize("key", list(KEYS))
def test_the_tone_of_each_key_is_its_q23_pair(key):
    """Goertzel: each of the key's two frequencies carries at least 30 dB more than any other
    DTMF frequency, each at -10 dBm0 (±0.5 dB), for exactly 100 ms, then silence."""
    pcm = tone(key, 100)
    assert len(pcm) == 800 + 400 and pcm.dtype == np.int16
    on = pcm[:800]
    power = {f: goertzel_power(on, f) for f in DTMF_FREQUENCIES}
    low, high = FREQUENCIES[key]
    others = max(p for f, p in power.items() if f not in (low, high))
    assert min(power[low], power[high]) > 1000 * others
    full_scale_sine = 32768.0**2 / 4  # goertzel_power of a full-scale sine
    for f in (low, high):
        level_dbm0 = 10 * np.log10(power[f] / full_scale_sine) + 3.17
        assert abs(level_dbm0 - TONE_LEVEL_DBM0) < 0.5
    assert not pcm[800:].any()  # the pause
    assert np.count_nonzero(np.abs(on) > 100) > 700  # tone all along the 100 ms


def test_tone_duration_pause_and_frames():
    pcm = tone("1", 70, frame_samples=160)
    assert len(pcm) % 160 == 0 and len(pcm) - 560 >= 400  # 70 ms of tone, at least 50 ms of pause
    assert np.flatnonzero(pcm).max() < 560 <= len(pcm)
    assert abs(goertzel_power(pcm[:560], 697) - goertzel_power(pcm[:560], 1209)) < 0.1 * goertzel_power(pcm[:560], 697)
    ulaw = audioop.ulaw2lin(audioop.lin2ulaw(pcm.tobytes(), 2), 2)  # on a u-law sln stream
    back = np.frombuffer(ulaw, dtype="<i2")[:560]
    assert min(goertzel_power(back, 697), goertzel_power(back, 1209)) > 300 * max(
        goertzel_power(back, f) for f in DTMF_FREQUENCIES if f not in (697, 1209))
    with pytest.raises(ValueError):
        tone("E", 100)


# ------------------------------------------------------------------ end to end
def speech_ulaw(seconds: float) -> tuple[np.ndarray, bytes]:
    pcm, rate = read_wav(ASSETS / "or105.wav")
    assert rate == 8000
    cut = pcm[int(0.3 * rate) : int((0.3 + seconds) * rate), 0].astype("<i2")
    return cut, audioop.lin2ulaw(cut.tobytes(), 2)


@pytest.fixture
def loud_clip(tmp_path):
    """1.2 s of speech with no pause (or105.wav from 0.9 s), for a file that loops."""
    pcm, rate = read_wav(ASSETS / "or105.wav")
    path = tmp_path / "loud.wav"
    write_wav(path, pcm[int(0.9 * rate) : int(2.1 * rate)], rate)
    return path


def stats(gateway) -> dict:
    return {f"{name}/{e.name}": e.stats.as_dict() for name, st in gateway.routes.items() for e in st.route.endpoints}


def route_events(gateway, route: str, kind: str) -> list:
    return [e for _, e in gateway.routes[route].route.stats.recent_events if e.kind == kind]


def media_url(gateway, call_id: str, encapsulation: str) -> str:
    return (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{call_id}/media_stream"
            f"?encapsulation={encapsulation}&token={VOIPBIN_TOKEN}")


KEY_IN = """\
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, call_id: key-in}
      - record: {path: "$out/call.wav", rate: 8000}
"""


async def test_an_rtp_caller_presses_a_key_in_the_middle_of_its_speech(tmp_path, caplog, stalls):
    """1.6 s of speech as u-law RTP at real time, across the sequence-number wrap; at 0.6 s a
    100 ms press of "5" as a gateway sends it (RFC 4733 §3.1, as Asterisk does): 7 event
    packets instead of the audio packets of those slots. One dtmf route event (digit,
    duration), the stream stays up to the end, and the recording is the speech on time:
    every audio packet played, none lost, the key's slots silent (no garbage from the
    event payloads), the speech after it neither late nor early."""
    _, ulaw = speech_ulaw(1.6)
    slots, at, ts0 = len(ulaw) // 160, 30, 0x7FFFFF00
    press = press_packets(0, ts0 + at * 160, "5")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, KEY_IN, out=tmp_path)
        client = await ws_client(nursery, media_url(gateway, "key-in", "rtp"))
        t0 = trio.current_time()
        for k in range(slots):
            await trio.sleep_until(t0 + 0.02 * k)
            seq = 65510 + k  # one sequence number per slot: the event packets take theirs
            if at <= k < at + len(press):
                packet = press[k - at]
                await client.send_message(packet[:2] + struct.pack("!H", seq & 0xFFFF) + packet[4:])
            else:
                await client.send_message(rtp(seq, ts0 + 160 * k, ulaw[160 * k : 160 * (k + 1)]))
        await trio.sleep(0.001)
        # what the jitter buffer made of it, before the close: once the last packet is in, the
        # slots after it are concealed until the close arrives (up to 200 ms on a loaded machine)
        buffered = gateway.routes["call"].route.endpoints[0]._playout.buffer.stats
        lost, late = buffered.lost, buffered.late
        await client.aclose(1000, "bye")
        with trio.fail_after(10):
            await gateway.routes["call"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    voipbin = gateway.routes["call"].route.endpoints[0]
    events = route_events(gateway, "call", "dtmf")
    assert [(e.source, e.data) for e in events] == [("voipbin", {"digit": "5", "duration_ms": 100})], stats(gateway)
    assert voipbin.stats.dtmf_in == 1 and voipbin.dtmf == ["5"]
    # no close for the event packets: the client's own close ended the session
    assert voipbin.stats.peer_errors == 0 and "1003" not in caplog.text and "not supported" not in caplog.text
    # every audio packet reached the audio path, no event packet did, no slot was taken as lost
    # (a slot the buffer inserts to grow under load is not a loss)
    audio_packets = slots - len(press)
    assert (voipbin.stats.frames_in, voipbin.stats.bytes_in, lost, late) == (
        audio_packets, 160 * audio_packets, 0, 0), stats(gateway)
    reference = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2").copy()
    reference[at * 160 : (at + len(press)) * 160] = 0  # what the caller's gateway sent: no audio
    reference = reference.reshape(-1, 1)
    received, rate = read_wav(tmp_path / "call.wav")
    # (but for the audio a stall of the machine reached: the `stalls` fixture)
    recorded = stalls.timeline(tmp_path / "call.wav")
    corr, lag = assert_correlated(reference, 8000, received, rate, 0.95, "the call", starvation=stalls.starvation,
                                  timeline=recorded, context=stats(gateway))
    assert -0.05 < lag < 0.3, (corr, lag, stats(gateway))
    blocks = blockwise_blocks(reference, 8000, received, rate, block_s=0.2)
    assert_blocks_found(blocks, 0.9, "the call", block_s=0.2, share=(len(blocks) - 1) / len(blocks), min_blocks=4,
                        starvation=stalls.starvation, timeline=recorded)
    assert abs(len(received) / rate - (slots * 0.02 + lag)) < 0.06  # nothing inserted, nothing lost
    shift = round(lag * rate)
    key = received[shift + at * 160 + 80 : shift + (at + len(press)) * 160 - 80, 0].astype(float)
    speech = reference[at * 160 - 800 : at * 160, 0].astype(float)
    assert np.sqrt(np.mean(key**2)) < 0.01 * np.sqrt(np.mean(speech**2))  # the key's slots: silence


class RtpCall:
    """A VoIPBIN rtp client: sends u-law PT 0 speech every 20 ms, keeps every packet it gets."""

    def __init__(self) -> None:
        self.packets: list[RtpPacket] = []
        self.ws = None

    async def run(self, nursery, url: str, ulaw: bytes) -> None:
        self.ws = await ws_client(nursery, url)
        nursery.start_soon(self._read)
        nursery.start_soon(self._speak, ulaw)

    async def _speak(self, ulaw: bytes) -> None:
        t0 = trio.current_time()
        for k in range(len(ulaw) // 160):
            await trio.sleep_until(t0 + 0.02 * k)
            await self.ws.send_message(rtp(k, 160 * k, ulaw[160 * k : 160 * (k + 1)]))

    async def _read(self) -> None:
        try:
            while True:
                self.packets.append(RtpPacket.parse(await self.ws.get_message()))
        except ConnectionClosed:
            pass


KEY_OUT_RTP = """\
routes:
  - name: phone
    endpoints:
      - voipbin: {role: listen, call_id: key-out, dtmf_payload_type: 110}
      - videosdk: {role: listen, room_id: keys}
      - file: {path: "$clip", rate: 8000, loop: true}
"""


async def test_a_videosdk_message_plays_rfc4733_packets_into_an_rtp_call(tmp_path, loud_clip):
    """A device publishes {"dtmf": "5"}: the call's client receives one 100 ms RFC 4733 event
    at payload type 110, in our audio stream's SSRC and sequence, in place of 7 audio packets,
    and the audio resumes at the right timestamp."""
    _, ulaw = speech_ulaw(3.0)
    call = RtpCall()
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, KEY_OUT_RTP, clip=loud_clip)
        await call.run(nursery, media_url(gateway, "key-out", "rtp"), ulaw)
        device = await Device().join(nursery, gateway, "keys", name="Desk")
        await wait_for(lambda: len(call.packets) >= 10)  # the call's audio flows
        await device.ws.send_message(json.dumps({"event": "message", "topic": "keys", "data": {"dtmf": "5"}}))
        await wait_for(lambda: sum(p.payload_type == 110 for p in call.packets) == 7
                       and call.packets[-1].payload_type == 0 and call.packets[-3].payload_type == 0)
        voipbin = gateway.routes["phone"].route.endpoints[0]
        nursery.cancel_scope.cancel()
    packets = call.packets
    assert {p.ssrc for p in packets} == {packets[0].ssrc}
    first = packets[0].sequence_number
    assert [p.sequence_number for p in packets] == [(first + i) & 0xFFFF for i in range(len(packets))]
    at = next(i for i, p in enumerate(packets) if p.payload_type == 110)
    events, before, after = packets[at : at + 7], packets[at - 1], packets[at + 7]
    assert all(p.payload_type == 110 for p in events) and before.payload_type == after.payload_type == 0
    assert [p.marker for p in events] == [1, 0, 0, 0, 0, 0, 0]
    assert {p.timestamp for p in events} == {(before.timestamp + 160) & 0xFFFFFFFF}
    fields = [struct.unpack("!BBH", p.payload) for p in events]
    assert [f[0] for f in fields] == [5] * 7 and [f[1] & 0x3F for f in fields] == [10] * 7  # key 5 at -10 dBm0
    assert [f[2] for f in fields] == [160, 320, 480, 640, 800, 800, 800]
    assert [bool(f[1] & 0x80) for f in fields] == [False] * 4 + [True] * 3
    assert after.timestamp == (events[0].timestamp + 7 * 160) & 0xFFFFFFFF
    assert sum(p.payload_type == 110 for p in packets) == 7
    assert voipbin.stats.dtmf_out == 1


KEY_OUT_AUDIOSOCKET = """\
routes:
  - name: phone
    endpoints:
      - voipbin: {role: listen, call_id: key-as}
      - agent: {role: listen}
      - file: {path: "$clip", rate: 8000, loop: true}
"""


async def agent_page(nursery, gateway):
    """A client of the gateway's agent service, as the spec's page is: token, WebSocket,
    {"token"} first, then wait for connected."""
    async with httpx.AsyncClient() as http:
        response = await http.post(f"http://127.0.0.1:{gateway.runtime.http.port}{agent_wire.TOKEN_PATH}",
                                   headers={"Authorization": f"Bearer {AGENT_API_KEY}"})
    grant = agent_wire.parse_token_response(response.status_code, response.content)
    ws = await ws_client(nursery, grant.ws_url)
    await ws.send_message(json.dumps({"token": grant.token}))
    with trio.fail_after(5):
        while json.loads(await ws.get_message()).get("type") != "connected":
            pass
    return ws


async def test_an_agent_message_sends_one_dtmf_frame_to_an_audiosocket_call(tmp_path, loud_clip, caplog):
    """The agent page sends {"type":"dtmf","digit":"7"} (and one with a digit that is not a
    key, which is logged and ignored): the AudioSocket client gets exactly one DTMF frame, "7",
    among its audio frames."""
    frames: list[tuple[int, bytes]] = []

    async def read(ws):
        try:
            while True:
                data = await ws.get_message()
                while data:
                    kind, length = struct.unpack_from("!BH", data)
                    frames.append((kind, data[3 : 3 + length]))
                    data = data[3 + length :]
        except ConnectionClosed:
            pass

    async def speak(ws):
        t0 = trio.current_time()
        for k in range(150):
            await trio.sleep_until(t0 + 0.02 * k)
            await ws.send_message(struct.pack("!BH", 0x10, 320) + bytes(320))

    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, KEY_OUT_AUDIOSOCKET, clip=loud_clip)
        caller = await ws_client(nursery, media_url(gateway, "key-as", "audiosocket"))
        nursery.start_soon(read, caller)
        nursery.start_soon(speak, caller)
        page = await agent_page(nursery, gateway)
        await wait_for(lambda: len(frames) >= 10)
        await page.send_message(json.dumps({"type": "dtmf", "digit": "x"}))
        await page.send_message(json.dumps({"type": "dtmf", "digit": "7"}))
        await wait_for(lambda: any(k == 0x03 for k, _ in frames))
        count = len(frames)
        await wait_for(lambda: len(frames) >= count + 10)
        voipbin = gateway.routes["phone"].route.endpoints[0]
        nursery.cancel_scope.cancel()
    assert [p for k, p in frames if k == 0x03] == [b"7"]
    at = next(i for i, (k, _) in enumerate(frames) if k == 0x03)
    assert all(k == 0x10 and len(p) == 320 for k, p in frames[:at] + frames[at + 1 :])  # the audio goes on
    assert [e.data for e in route_events(gateway, "phone", "dtmf")] == [{"digit": "7"}]
    assert voipbin.stats.dtmf_out == 1
    assert "digit 'x' is not a DTMF key" in caplog.text
    for secret in SECRETS:
        assert secret not in caplog.text


KEY_OUT_SLN = """\
routes:
  - name: phone
    endpoints:
      - voipbin: {role: listen, call_id: key-sln, codec: slin}
      - videosdk: {room_id: desk, participant_name: Phone, subscribe: [keys]}
      - file: {path: "$clip", rate: 8000, loop: true}
  - {name: desk-1, endpoints: [{videosdk: {role: listen, room_id: desk}}, {record: {path: "$out/1.wav"}}]}
  - {name: desk-2, endpoints: [{videosdk: {role: listen, room_id: desk}}, {record: {path: "$out/2.wav"}}]}
"""


def tone_frames(pcm: np.ndarray, key: str) -> list[int]:
    """Indexes of the 20 ms frames of `pcm` that are the tone of `key`: its two Q.23
    frequencies carry most of the frame's energy and dominate the other six."""
    low, high = FREQUENCIES[key]
    found = []
    for i in range(len(pcm) // 160):
        frame = pcm[160 * i : 160 * (i + 1)].astype(np.float64)
        energy = float(np.mean(frame**2))
        if energy < 1e4:
            continue
        power = {f: goertzel_power(frame, f) for f in DTMF_FREQUENCIES}
        pair = power[low] + power[high]
        others = max(p for f, p in power.items() if f not in (low, high))
        if 2 * pair > 0.8 * energy and min(power[low], power[high]) > 10 * others:
            found.append(i)
    return found


async def test_a_videosdk_room_message_plays_the_tone_into_an_sln_call(tmp_path, loud_clip):
    """A room participant publishes {"dtmf": "9"} on a topic the gateway's VideoSDK device
    subscribes: the sln caller hears the 852 + 1477 Hz pair for 100 ms (5 frames) in place
    of the speech it was hearing, then at least 50 ms of silence, then the speech again."""
    heard: list[np.ndarray] = []

    async def listen(ws):
        try:
            while True:
                heard.append(np.frombuffer(await ws.get_message(), dtype="<i2"))
        except ConnectionClosed:
            pass

    async def speak(ws):
        t0 = trio.current_time()
        for k in range(150):
            await trio.sleep_until(t0 + 0.02 * k)
            await ws.send_message(bytes(320))

    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, KEY_OUT_SLN, clip=loud_clip, out=tmp_path)
        caller = await ws_client(nursery, media_url(gateway, "key-sln", "sln"))
        nursery.start_soon(listen, caller)
        nursery.start_soon(speak, caller)
        await wait_for(lambda: gateway.routes["phone"].state == "up" and len(heard) >= 10)
        observer = await Device().join(nursery, gateway, "desk", name="Observer")
        await trio.sleep(0.2)  # the room has told the gateway's device about the observer
        await observer.ws.send_message(json.dumps({"event": "message", "topic": "keys", "data": {"dtmf": "9"}}))
        await wait_for(lambda: tone_frames(np.concatenate(heard), "9") and len(tone_frames(np.concatenate(heard[-3:]), "9")) == 0)
        count = len(heard)
        await wait_for(lambda: len(heard) >= count + 10)
        voipbin = gateway.routes["phone"].route.endpoints[0]
        nursery.cancel_scope.cancel()
    pcm = np.concatenate(heard)
    frames = tone_frames(pcm, "9")
    assert len(frames) == 5 and frames == list(range(frames[0], frames[0] + 5)), frames  # 100 ms, one piece
    start_at = 160 * frames[0]
    on = pcm[start_at : start_at + 800]
    power = {f: goertzel_power(on, f) for f in DTMF_FREQUENCIES}
    assert min(power[852], power[1477]) > 1000 * max(p for f, p in power.items() if f not in (852, 1477))
    pause = pcm[start_at + 800 : start_at + 1200]
    assert not pause.any()  # at least 50 ms of silence after the tone
    assert np.abs(pcm[max(0, start_at - 4000) : start_at]).max(initial=0) > 1000, (start_at, stats(gateway))  # speech before
    assert np.abs(pcm[start_at + 1280 : start_at + 5280]).max() > 1000  # and after
    assert [e.data for e in route_events(gateway, "phone", "dtmf")] == [{"digit": "9"}]
    assert voipbin.stats.dtmf_out == 1
