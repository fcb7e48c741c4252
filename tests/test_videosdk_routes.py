"""VideoSDK end to end over real loopback WebSockets, all in one gateway process.

- A VideoSDK room (the gateway's listen role, playing one speaker and recording the room)
  and a VoIPBIN call (listen role, playing another speaker and recording the call) are
  bridged by a route of the two dial adapters: each side's speech must arrive intact on the
  other side, and the bridge must deliver media frames to the room at one per 20 ms, with no
  bursts and no drift.
- A VideoSDK device (a file played through the dial adapter) reaches an Argon voice channel
  through a route of the VideoSDK listen role and the Argon dial adapter: PCM16 8 kHz in,
  valid Opus 48 kHz packets out, the speech intact in the channel's recording.
"""

from __future__ import annotations

import numpy as np
import opuslib
import pytest
import trio

import gateway.adapters.argon.room as argon_room
from audio_checks import best_alignment, blockwise_alignment, read_wav, write_wav
from conftest import ASSETS
from gateway.adapters.argon.wire import validate_opus_packet
from gateway.adapters.videosdk import frames as vsdk_frames
from harness import SECRETS, start
from test_argon_errors import CHANNEL, SPACE

RATE = 8000
SPEECH_S = 1.0  # seconds of speech each side says


def speech(asset: str, at_s: float) -> np.ndarray:
    pcm, rate = read_wav(ASSETS / asset)
    assert rate == RATE
    return pcm[int(at_s * RATE) : int((at_s + SPEECH_S) * RATE)]


def padded(pcm: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    zeros = lambda s: np.zeros((int(s * RATE), 1), np.int16)  # noqa: E731
    return np.concatenate([zeros(before_s), pcm, zeros(after_s)])


def stats(gateway) -> dict:
    return {f"{name}/{e.name}": e.stats.as_dict() for name, st in gateway.routes.items() for e in st.route.endpoints}


def assert_speech_arrived(source: np.ndarray, received_path, gateway, *, max_lag_s: float = 0.3) -> float:
    """`source` is in the recording, block by block (0.2 s), a little late at most. Noise, a
    wrong byte order or rate, or the other side's speech instead fail every block."""
    received, rate = read_wav(received_path)
    corr, lag = best_alignment(source, RATE, received, rate)
    assert -0.1 < lag < max_lag_s, f"speech arrived {lag * 1000:.0f} ms off (corr {corr:.2f}): {stats(gateway)}"
    blocks = blockwise_alignment(source, RATE, received, rate, block_s=0.2)
    good = sum(b > 0.9 for b in blocks)
    assert len(blocks) >= 4 and good >= 0.8 * len(blocks), f"blocks {np.round(blocks, 2)}: {stats(gateway)}"
    return lag


ROOM_AND_CALL = """\
routes:
  - name: room                       # a VideoSDK room: one speaker, and a recording of the room
    endpoints:
      - videosdk: {role: listen, room_id: standup}
      - file: {path: "$room_voice", rate: 8000}
      - record: {path: "$out/room.wav", rate: 8000}
  - name: call                       # a VoIPBIN call: the caller, and a recording of the call
    endpoints:
      - voipbin: {role: listen, call_id: call-7, codec: slin}
      - file: {path: "$caller_voice", rate: 8000}
      - record: {path: "$out/call.wav", rate: 8000}
  - name: bridge                     # the gateway: VideoSDK device <-> VoIPBIN media stream
    endpoints:
      - videosdk: {room_id: standup, participant_name: Phone bridge}
      - voipbin: {call_id: call-7, encapsulation: sln}
"""


async def test_room_and_call_hear_each_other_at_a_steady_pace(tmp_path, monkeypatch, caplog):
    """The room speaks first and the caller later (silence pads each clip), so each recording
    holds its own speaker early and the other side's speech late, and the speech each side
    sent is checked in the other side's recording."""
    room_speech, caller_speech = speech("or105.wav", 0.9), speech("or109.wav", 1.9)
    room_clip = padded(room_speech, 0.2, 1.5)  # speaks 0.2-1.2 s, ends first
    caller_clip = padded(caller_speech, 1.4, 0.4)  # speaks 1.4-2.4 s
    write_wav(tmp_path / "room_voice.wav", room_clip, RATE)
    write_wav(tmp_path / "caller_voice.wav", caller_clip, RATE)

    arrivals: list[float] = []  # when each media frame from the bridge reached the room
    real_receive = vsdk_frames.IngestServer.receive

    def spy(self, message):  # the real parser runs; we note when media arrived
        events = real_receive(self, message)
        if events and isinstance(events[0], vsdk_frames.Media):
            arrivals.append(trio.current_time())
        return events

    monkeypatch.setattr(vsdk_frames.IngestServer, "receive", spy)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROOM_AND_CALL, out=tmp_path, room_voice=tmp_path / "room_voice.wav",
                              caller_voice=tmp_path / "caller_voice.wav")
        with trio.fail_after(20):
            for name in ("room", "call", "bridge"):
                await gateway.routes[name].sessions_done.wait()
        nursery.cancel_scope.cancel()

    # the room's speech reached the call, and the caller's speech reached the room
    assert_speech_arrived(padded(room_speech, 0.2, 0), tmp_path / "call.wav", gateway)
    assert_speech_arrived(padded(caller_speech, 1.4, 0), tmp_path / "room.wav", gateway)
    bridge_room, bridge_call = gateway.routes["bridge"].route.endpoints
    assert bridge_room.stats.frames_out >= 100 and bridge_call.stats.frames_out >= 100
    assert gateway.routes["bridge"].route.stats.ended_by.startswith("videosdk: meeting left")

    # pacing at the room: one frame per 20 ms, no bursts, no drift
    times = np.array(arrivals[5:])  # after start-up
    assert len(times) >= 100, stats(gateway)
    gaps = np.diff(times)
    assert 0.018 < np.median(gaps) < 0.022
    assert np.percentile(gaps, 99) < 0.045, np.round(np.sort(gaps)[-5:], 3)
    bunched = np.min(times[4:] - times[:-4])  # 5 frames (100 ms of audio) within ...
    assert bunched > 0.01, f"a burst: 5 frames within {bunched * 1000:.1f} ms"
    # no drift: between stalls of a loaded machine (the pacer re-anchors after a stall of more
    # than 2 ptimes rather than burst; p99 above allows at most one), frames come every 20 ms
    steady = gaps[gaps < 0.045]
    assert abs(steady.mean() - 0.020) < 0.0004, f"mean gap {steady.mean() * 1000:.2f} ms over {len(steady)} frames"
    for secret in SECRETS:
        assert secret not in caplog.text


DEVICE_TO_CHANNEL = """\
routes:
  - name: device                     # a VideoSDK device: recorded speech through the dial adapter
    endpoints:
      - file: {path: "$clip", rate: 8000}
      - videosdk: {room_id: field-12, participant_name: Field Device 12, participant_metadata: {deviceId: dev_12}}
  - name: bridge                     # the gateway: VideoSDK ingest server -> Argon bot
    endpoints:
      - videosdk: {role: listen, room_id: field-12}
      - argon: {space_id: %s, channel_id: %s, track_name: Field device}
  - name: channel                    # the Argon voice channel, recorded
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/channel.wav", rate: 48000}
""" % (SPACE, CHANNEL, SPACE, CHANNEL)


async def test_device_speech_reaches_an_argon_channel_as_opus(tmp_path, speech_clip, monkeypatch):
    packets = []

    real_check = argon_room.BotSession._check

    def spy(packet):  # the listen role's own check runs; we keep what it saw, described
        samples = real_check(packet)
        packets.append((packet, validate_opus_packet(packet)))
        return samples

    monkeypatch.setattr(argon_room.BotSession, "_check", staticmethod(spy))
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DEVICE_TO_CHANNEL, out=tmp_path, clip=speech_clip)
        with trio.fail_after(20):
            for name in ("device", "bridge", "channel"):
                await gateway.routes[name].sessions_done.wait()
        nursery.cancel_scope.cancel()

    device_dial = gateway.routes["device"].route.endpoints[1]
    room_side = gateway.routes["bridge"].route.endpoints[0]
    assert device_dial.stats.frames_out == pytest.approx(100, abs=2)  # 2 s of 20 ms frames
    assert room_side.stats.bytes_in == room_side.stats.frames_in * 320  # PCM16 8 kHz, 20 ms
    assert gateway.routes["bridge"].route.stats.ended_by == "videosdk: stop"  # the device said stop
    # every Opus message is one valid 20 ms mono packet, for (nearly) all of the speech
    assert 80 <= len(packets) <= 102
    decoder = opuslib.Decoder(48000, 1)
    for packet, info in packets:
        assert info.duration_ms == 20 and not info.stereo
        assert len(decoder.decode(packet, 5760)) == 960 * 2
    source, rate = read_wav(speech_clip)
    received, received_rate = read_wav(tmp_path / "channel.wav")
    assert received_rate == 48000
    _, lag = best_alignment(source, rate, received, received_rate)
    assert -0.5 < lag < 0.3, f"speech {lag * 1000:.0f} ms off: {stats(gateway)}"
    blocks = blockwise_alignment(source, rate, received, received_rate)
    assert len(blocks) >= 4 and sum(b > 0.9 for b in blocks) >= 0.8 * len(blocks), np.round(blocks, 2)
