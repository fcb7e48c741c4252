"""Two-way phone ↔ Argon voice channel, end to end over real loopback sockets.

The gateway plays every part: a VoIPBIN-compatible call (voipbin listen: a caller clip, a
recorder of what the caller hears), an Argon-compatible voice channel (argon listen: people in
it are its routes' endpoints, each with an `identity`), and the bridge under test (voipbin dial
↔ argon dial with `hear:`), which hears the channel over `/audio/duplex` and publishes into it.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

from audio_checks import (
    assert_blocks_found,
    blockwise_alignment,
    blockwise_blocks,
    read_wav,
    write_wav,
)
from conftest import ASSETS
from gateway.adapters.argon import room as room_module
from gateway.demo import start_demo
from harness import SECRETS, start
from test_agent_routes import check_speech, clip
from voice_clients import Caller

SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def locate(clip: np.ndarray, recording: np.ndarray, rate: int) -> float:
    """Where in `recording` (seconds) `clip` best matches (normalized cross-correlation, FFT)."""
    a = clip.astype(np.float64).reshape(-1)
    b = recording.astype(np.float64).reshape(-1)
    size = 1 << (len(a) + len(b)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)[: len(b) - len(a) + 1]
    energy = np.convolve(b * b, np.ones(len(a)), "valid") + 1e-9
    return float(np.argmax(xcorr / np.sqrt(energy))) / rate


def events_of(route) -> list:
    return [event for _, event in route.stats.recent_events]


async def test_phone_and_channel_hear_each_other_with_hear_user_id(tmp_path, stalls):
    """The demo's conversation, short: the caller's speech reaches the channel, the person's
    speech in the channel reaches the caller, each intact."""
    caller, caller_pcm, rate = clip(tmp_path, "caller.wav", "or105.wav", 0.3, 2.5)
    person, person_pcm, _ = clip(tmp_path, "person.wav", "or109.wav", 0.2, 2.0)
    async with trio.open_nursery() as nursery:
        gateway = await start_demo(nursery, audio=caller, person=person, out=str(tmp_path))
        with trio.fail_after(20):
            await gateway.routes["support-line"].sessions_done.wait()
            await gateway.routes["phone-call"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    # the bot codes the 8 kHz call at 8 kHz input (narrowband SILK: the spectrum, not the waveform)
    check_speech(caller_pcm, rate, tmp_path / "channel.wav", min_seconds=2.0, what="caller → channel", waveform=False,
                 stalls=stalls)
    check_speech(person_pcm, rate, tmp_path / "caller-hears.wav", min_seconds=1.8, what="channel → caller",
                 stalls=stalls)
    bridge = gateway.routes["support-line"].route
    call, bot = bridge.endpoints
    # the bot heard the person as Opus packets on its duplex session and played them out
    assert bot.stats.frames_in >= 90 and bot.stats.connects == 1
    kinds = [e.kind for e in events_of(bridge)]
    assert "ready" in kinds and "subscribed" in kinds
    subscribed = next(e for e in events_of(bridge) if e.kind == "subscribed")
    assert subscribed.data["participant"] == "person"
    # the channel forwarded the person's lane only once someone heard it, as Opus of 20 ms
    channel = gateway.routes["voice-channel"].route.endpoints[0]
    assert channel.stats.frames_out >= 90
    assert call.stats.frames_out >= 90  # the caller heard the channel, 20 ms at a time


FOLLOW = """
routes:
  - name: phone                       # the phone: a caller clip; what it hears is recorded
    endpoints:
      - voipbin: {role: listen, name: call, call_id: phone-1}
      - file: {name: caller, path: "$caller", rate: 8000}
      - record: {name: heard, path: "$out/phone-hears.wav", rate: 8000, hears: [call]}
  - name: alice                       # alice is in the channel while her client is connected
    endpoints:
      - argon: {role: listen, space_id: %(space)s, channel_id: %(channel)s}
      - voipbin: {role: listen, name: alice, identity: alice, call_id: alice-1}
  - name: bob
    endpoints:
      - argon: {role: listen, space_id: %(space)s, channel_id: %(channel)s}
      - voipbin: {role: listen, name: bob, identity: bob, call_id: bob-1}
  - name: bridge
    endpoints:
      - voipbin: {call_id: phone-1, encapsulation: rtp}
      - argon: {space_id: %(space)s, channel_id: %(channel)s, hear: follow}
""" % {"space": SPACE, "channel": CHANNEL}


async def test_hear_follow_hears_each_participant_in_turn(tmp_path, monkeypatch, caplog, stalls):
    """A participant joins, leaves, another joins: the phone hears each in turn; each change of
    target reopens the bot's duplex session, and the channel hears the caller throughout with
    no gap over 100 ms."""
    caplog.set_level("INFO")
    rate = 8000
    caller = str(tmp_path / "caller.wav")  # 16 s: outlasts the test
    write_wav(caller, np.concatenate([read_wav(ASSETS / name)[0] for name in ("or105.wav", "or109.wav")]), rate)
    # each long enough (~10 speech blocks) that a packet concealed under load costs one block
    alice_pcm = read_wav(ASSETS / "or109.wav")[0][int(0.2 * rate): int(2.7 * rate)]
    bob_pcm = read_wav(ASSETS / "or105.wav")[0][int(4.0 * rate): int(6.5 * rate)]
    published: list[float] = []  # when the room got each packet the bridge's bot published
    real_publish = room_module.Room.publish

    def publish(self, session, packet, samples):
        if session.path.publishes and "voipbin" not in session.identity:
            published.append(trio.current_time())
        return real_publish(self, session, packet, samples)

    monkeypatch.setattr(room_module.Room, "publish", publish)
    starvation = stalls.starvation  # a loaded machine: the speech blocks and gaps its stalls reached are not judged
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, FOLLOW, caller=caller, out=str(tmp_path))
        bridge = gateway.routes["bridge"]
        with trio.fail_after(10):
            await bridge.route.up.wait()
        await trio.sleep(0.3)
        for name, pcm in (("alice", alice_pcm), ("bob", bob_pcm)):
            person = Caller(gateway, f"{name}-1")
            with trio.fail_after(10):
                await person.connect(nursery)
                await gateway.routes[name].route.up.wait()
                await trio.sleep(0.3)  # voiceJoin → the bot reopens its duplex session
                await person.speak(pcm)
                await trio.sleep(0.3)
                await person.hang_up()
                await gateway.routes[name].sessions_done.wait()
            gateway.routes[name].sessions_done = trio.Event()
            await trio.sleep(0.3)
            assert person.recording().size > 0.5 * rate  # alice and bob heard the caller
        nursery.cancel_scope.cancel()
    heard, _ = read_wav(tmp_path / "phone-hears.wav")
    alice_at, bob_at = locate(alice_pcm, heard, rate), locate(bob_pcm, heard, rate)
    assert 0 < alice_at < bob_at - 2.5, (alice_at, bob_at)  # alice's words, then bob's
    for pcm, at in ((alice_pcm, alice_at), (bob_pcm, bob_at)):
        part = heard[int(at * rate): int(at * rate) + len(pcm)]
        assert_blocks_found(blockwise_blocks(pcm, rate, part, rate), 0.85, f"phone hears {at:.2f} s in",
                            starvation=starvation, timeline=stalls.timeline(tmp_path / "phone-hears.wav"),
                            offset_s=int(at * rate) / rate)
    follows = [e.data["target"] for e in events_of(bridge.route) if e.kind == "follow"]
    assert follows == ["alice", "bob"], follows
    assert "target_left" in [e.kind for e in events_of(bridge.route)]
    bot = bridge.route.endpoints[1]
    assert bot.stats.connects == 3  # connect, then duplex with alice, then duplex with bob
    gaps = np.diff(np.array(published))
    # but for the gaps that met a stretch in which another process kept this one off the cores
    judged = [gap for at, gap in zip(published, gaps) if not starvation.overlaps(at, at + gap)]
    assert len(judged) > 200 and max(judged) <= 0.1, (
        f"publish gap {max(judged) * 1000:.0f} ms of {len(judged)} judged (starved: {starvation.stretches})")
    assert not any(secret in caplog.text for secret in SECRETS)


async def test_hear_only_records_a_participant_on_subscribe(tmp_path):
    """`publish: false`: the bot only hears (`/audio/subscribe`), here to record a person."""
    person, person_pcm, rate = clip(tmp_path, "person.wav", "or109.wav", 0.2, 2.0)
    routes = """
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - file: {name: person, identity: person, path: "$person", rate: 48000}
  - name: recorder
    endpoints:
      - argon: {space_id: %s, channel_id: %s, hear: person, publish: false}
      - record: {path: "$out/recorded.wav", rate: 8000}
""" % (SPACE, CHANNEL, SPACE, CHANNEL)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, person=person, out=str(tmp_path))
        with trio.fail_after(15):
            await gateway.routes["channel"].sessions_done.wait()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    check_speech(person_pcm, rate, tmp_path / "recorded.wav", min_seconds=1.8, what="person → recorder")
    bot = gateway.routes["recorder"].route.endpoints[0]
    assert bot.egress is None and bot.stats.frames_out == 0
    kinds = [e.kind for e in events_of(gateway.routes["recorder"].route)]
    assert kinds[:1] == ["waiting"] or "subscribed" in kinds


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff\xff", bytes(range(7, 60))], ids=["code3-truncated", "junk"])
async def test_malformed_opus_from_the_participant_is_concealed_not_fatal(tmp_path, monkeypatch, garbage):
    """A participant's client sends a malformed Opus packet now and then: the bot conceals it
    (counted), the call goes on."""
    caller, caller_pcm, rate = clip(tmp_path, "caller.wav", "or105.wav", 0.3, 2.5)
    person, person_pcm, _ = clip(tmp_path, "person.wav", "or109.wav", 0.2, 2.0)
    real_forward = room_module.Room.forward
    count = [0]

    def forward(self, identity, packet):
        if identity == "person":
            count[0] += 1
            if count[0] in (10, 45, 80):  # three bad packets in the person's speech
                packet = garbage
        return real_forward(self, identity, packet)

    monkeypatch.setattr(room_module.Room, "forward", forward)
    async with trio.open_nursery() as nursery:
        gateway = await start_demo(nursery, audio=caller, person=person, out=str(tmp_path))
        with trio.fail_after(20):
            await gateway.routes["support-line"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    bot = gateway.routes["support-line"].route.endpoints[1]
    assert bot.playout.stats.malformed == 3 and bot.stats.concealed >= 3
    assert gateway.routes["support-line"].route.stats.ended_by.startswith("voipbin")  # not the bot
    # the speech reached the caller: each bad packet costs at most its own block
    heard, _ = read_wav(tmp_path / "caller-hears.wav")
    blocks = blockwise_alignment(person_pcm, rate, heard, rate)
    assert len(blocks) >= 4 and sum(b > 0.85 for b in blocks) >= len(blocks) - 3, np.round(blocks, 2)
