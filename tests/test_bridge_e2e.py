"""Phone call → voice channel, end to end over real loopback WebSockets.

A VoIPBIN-compatible call (the gateway's listen role) plays recorded speech; the gateway's
VoIPBIN dial adapter receives it, the codec graph turns u-law / slin 8 kHz into Opus 48 kHz
packets (coded at 8 kHz input: narrowband SILK), and the Argon dial adapter streams it
(StreamToken, then the ingress) into an Argon-compatible channel (listen role) that records it.
Checks: the speech arrives intact (block by block, by short-time spectra: SILK keeps the
spectrum, not the waveform), in full (duration), and every Opus message is one valid packet of
the configured duration and channel count.
"""

from __future__ import annotations

import opuslib
import pytest
import trio

import gateway.adapters.argon.room as argon_room
from audio_checks import (
    SPECTRAL_FOUND,
    assert_blocks_found,
    best_alignment,
    read_wav,
    spectral_blocks,
)
from gateway.adapters.argon.wire import validate_opus_packet
from gateway.demo import start_demo

CLIP_S = 2.0


async def bridge(tmp_path, clip, **options):
    async with trio.open_nursery() as nursery:
        gateway = await start_demo(nursery, audio=str(clip), out=str(tmp_path), **options)
        with trio.fail_after(20):
            await gateway.routes["support-line"].sessions_done.wait()
            await gateway.routes["voice-channel"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    return gateway


def stats(gateway):
    return {f"{name}/{e.name}": e.stats.as_dict() for name, st in gateway.routes.items() for e in st.route.endpoints}


def check_speech_arrived(tmp_path, clip, gateway, stalls):
    """The speech is in the channel's recording: quarter second by quarter second, in order,
    with little delay. Audio that queued while the bridge was still connecting is kept (the
    latency it added is won back in pauses, so later speech may come a little early in the
    recording: tests/test_argon_startup.py checks the start-up case itself, with an ingress
    that takes 1 s); a packet concealed under load costs one block. Noise, a wrong byte order
    or a wrong rate fail every block. The call is coded at 8 kHz input (narrowband SILK), so
    the blocks are judged by short-time spectra (`spectral_alignment`), not the waveform; but
    for the blocks a stall of the machine reached (`stalls`: the fixture)."""
    source, source_rate = read_wav(clip)
    received, rate = read_wav(tmp_path / "channel.wav")
    corr, lag = best_alignment(source, source_rate, received, rate)
    assert -0.5 < lag < 0.3, f"speech arrived {lag * 1000:.0f} ms off in the recording: {stats(gateway)}"
    assert_blocks_found(spectral_blocks(source, source_rate, received, rate), SPECTRAL_FOUND, "speech", min_blocks=4,
                        starvation=stalls.starvation, timeline=stalls.timeline(tmp_path / "channel.wav"),
                        context=stats(gateway))
    # nothing lost once the bridge was up: the recording runs to the end of the speech. It
    # may run longer by the slots the path filled in under load (a jitter buffer growing, a
    # pacer's late slot: each plays its audio 20 ms later) and shorter by the pause packets
    # left out to win that back; the endpoints count both
    counted = [e.stats for st in gateway.routes.values() for e in st.route.endpoints]
    inserted = sum(s.concealed + s.late for s in counted) * 0.020
    shortened = sum(s.skipped for s in counted) * 0.020
    beyond = len(received) / rate - (len(source) / source_rate + lag)
    assert -0.1 - shortened < beyond < 0.1 + inserted, f"recording {beyond * 1000:+.0f} ms off: {stats(gateway)}"
    return corr


@pytest.mark.parametrize("encapsulation", ["rtp", "sln", "audiosocket"])
@pytest.mark.parametrize("codec", ["ulaw", "slin"])
async def test_call_reaches_channel_each_encapsulation_and_codec(tmp_path, speech_clip, encapsulation, codec,
                                                                 stalls):
    gateway = await bridge(tmp_path, speech_clip, encapsulation=encapsulation, listen_codec=codec)
    call_side, channel_side = gateway.routes["support-line"].route.endpoints
    # the dial adapter detected the call's codec from the payload size and answered in it
    assert call_side.stats.frames_in == pytest.approx(CLIP_S / 0.02, abs=2)
    assert call_side.stats.bytes_in == call_side.stats.frames_in * (160 if codec == "ulaw" else 320)
    # the call's end ends the bridge: AudioSocket says hangup, rtp/sln close the socket
    ended_by = gateway.routes["support-line"].route.stats.ended_by
    assert ended_by == "voipbin: hangup" if encapsulation == "audiosocket" else ended_by.startswith("voipbin: closed")
    check_speech_arrived(tmp_path, speech_clip, gateway, stalls)
    assert channel_side.stats.late <= 5  # a loaded 2-core CI machine may conceal a packet or two


@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
@pytest.mark.parametrize("frame_ms", [10, 20, 40, 60])
async def test_every_opus_message_is_one_valid_packet(tmp_path, speech_clip, monkeypatch, stereo, frame_ms, stalls):
    packets = []

    real_check = argon_room.BotSession._check

    def spy(packet):  # the listen role's own check runs; we keep what it saw, described
        samples = real_check(packet)
        packets.append((packet, validate_opus_packet(packet)))
        return samples

    monkeypatch.setattr(argon_room.BotSession, "_check", staticmethod(spy))
    gateway = await bridge(tmp_path, speech_clip, frame_ms=frame_ms, stereo=stereo)
    channels = 2 if stereo else 1
    # every packet of the call's audio (what queued while the Argon side connected too, less
    # the pauses shortened to win that latency back), and never more than the call sent
    # (nothing duplicated): its 20 ms frames, the slots the bridge's jitter buffer concealed
    # (a slot it inserted to grow under load, the tail before the close), the packets the
    # Argon side's pacer filled in when audio was late (a stalled loop), the last one padded,
    # and the encoder's flush
    expected = CLIP_S * 1000 / frame_ms
    sent_by_call = gateway.routes["phone-call"].route.endpoints[0].stats.frames_out
    call_side, argon_side = gateway.routes["support-line"].route.endpoints
    concealed, late = call_side.stats.concealed, argon_side.stats.late
    assert 0.8 * expected <= len(packets) <= (sent_by_call + concealed) * 20 / frame_ms + late + 2, (
        len(packets), concealed, late)
    decoder = opuslib.Decoder(48000, channels)
    for packet, info in packets:
        assert len(packet) > 2
        assert info.duration_ms == frame_ms and info.stereo == stereo
        pcm = decoder.decode(packet, 5760)
        assert len(pcm) == 48 * frame_ms * channels * 2  # one packet of exactly frame_ms
    channel = gateway.routes["voice-channel"].route.endpoints[0]
    assert channel.params.frame_duration_ms == frame_ms and channel.params.stereo == stereo
    check_speech_arrived(tmp_path, speech_clip, gateway, stalls)
    if stereo:
        pcm, _ = read_wav(tmp_path / "channel.wav")
        assert pcm.shape[1] == 2
