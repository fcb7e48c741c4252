"""Argon calls, end to end over real loopback sockets: a user calls the bot.

Our Argon listen role plays Argon (`call: BOT_USER_ID` rings the bot when its route's caller
connects: `callIncoming` on the events stream, Accept, `/audio/duplex` in the call's room) and
our VoIPBIN listen role plays the phone. Under test: the dial side's `calls: incoming`, which
answers calls one session each, bridged to a VoIPBIN call, and refuses callers not in `from:`;
and the listen side against a bot written the way Argon's reference bot is.
"""

from __future__ import annotations

import numpy as np
import trio

from audio_checks import SPECTRAL_FOUND, assert_blocks_found, blockwise_blocks, spectral_blocks
from gateway.codecs import OpusDecoder
from gateway.codecs.formats import OPUS_48K, EncodedFrame
from harness import BOT_TOKEN, SECRETS, Timeline, start
from reference_bot import ReferenceBot
from test_agent_routes import check_speech, clip
from voice_clients import Caller

BOT_USER = "5b0e3f5e-6a3b-4c8e-9d55-0f2d9a1c7e11"
BOTS = ', listen_bots: [{token: "%s", user_id: %s, username: desk_bot}]' % (BOT_TOKEN, BOT_USER)

CALLS = """
routes:
  - name: app-user              # an Argon user calling the bot (a VoIPBIN client stands in for the app)
    endpoints:
      - voipbin: {role: listen, name: user, identity: user-7, call_id: user-7}
      - argon: {role: listen, call: %s}
  - name: phone                 # the phone line the bot bridges calls to
    endpoints:
      - voipbin: {role: listen, name: call, call_id: desk-1}
      - file: {name: agent, path: "$agent", rate: 8000}
      - record: {name: heard, path: "$out/phone-hears.wav", rate: 8000, hears: [call]}
  - name: answer
    endpoints:
      - argon: {calls: incoming$callers}
      - voipbin: {call_id: desk-1, encapsulation: audiosocket}
""" % BOT_USER


def check_heard(reference: np.ndarray, ref_rate: int, received: np.ndarray, rate: int, what: str,
                waveform: bool = True, context: object = "", starvation=None, timeline=None) -> None:
    """`received` (at `rate`) holds the reference speech, block by block: by waveform
    correlation, or (`waveform` False) by short-time spectra (`spectral_alignment`), for what
    an Argon bot codes from an 8 kHz phone at 8 kHz input: narrowband SILK, which keeps the
    spectrum but not the waveform. `starvation`, `timeline`: blocks the machine's stalls
    reached are not judged (audio_checks.assert_blocks_found)."""
    if waveform:
        blocks, found = blockwise_blocks(reference, ref_rate, received, rate), 0.85
    else:
        blocks, found = spectral_blocks(reference, ref_rate, received, rate), SPECTRAL_FOUND
    assert_blocks_found(blocks, found, what, starvation=starvation, timeline=timeline, context=context)


async def test_incoming_call_is_bridged_to_a_phone_call_both_ways(tmp_path, caplog, stalls):
    caplog.set_level("INFO")
    starvation = stalls.starvation  # a loaded machine: the speech blocks its stalls reached are not judged
    agent, agent_pcm, rate = clip(tmp_path, "agent.wav", "or109.wav", 0.2, 3.0)
    user_pcm = clip(tmp_path, "user.wav", "or105.wav", 0.3, 2.0)[1]
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALLS, argon_extra=BOTS, agent=agent, out=str(tmp_path), callers="")
        answer = gateway.routes["answer"]
        assert answer.state == "waiting"
        user = Caller(gateway, "user-7")
        with trio.fail_after(15):
            await user.connect(nursery)  # the user calls: the bot is rung
            await gateway.routes["app-user"].route.up.wait()
            assert answer.state == "up" and len(answer.calls) == 1
            await trio.sleep(0.2)
            # streaming (gateway.admission): the user's and the bot's sockets, the phone's, the answered call
            admission = gateway.runtime.admission
            with trio.fail_after(10):  # each leg reports itself up as its own task gets there
                while admission.streaming < 4:
                    await trio.sleep(0.02)
            assert admission.streaming == 4 and admission.sessions == 4
            heard = next(e for e in gateway.routes["phone"].route.endpoints if e.name == "heard")
            await user.speak(user_pcm)
            # hang up once the phone has heard it all: the recorder hears 0.3 s of quiet (the
            # speech crosses three pacers and an Opus leg; a loaded loop may queue some of it)
            with trio.fail_after(10):
                quiet = 0
                while quiet < 15:
                    await trio.sleep(0.02)
                    quiet = quiet + 1 if heard.stats.level_dbfs < -70 else 0
            await user.hang_up()  # callEnded: the answering session ends, the phone is hung up
            await gateway.routes["phone"].sessions_done.wait()
            while answer.calls:
                await trio.sleep(0.05)
            while admission.streaming:  # all down: the media clock stops ticking
                await trio.sleep(0.05)
        assert answer.state == "waiting"  # ready for the next call
        nursery.cancel_scope.cancel()
    check_speech(user_pcm, rate, tmp_path / "phone-hears.wav", min_seconds=1.8, what="Argon user → phone",
                 stalls=stalls)
    # the answering bot codes the phone's 8 kHz at 8 kHz input (opus_input_rate: auto); the
    # user hears the phone's file from the call's answer (~0.8 s into its recording) to its
    # hang-up (~2.6 s): 1.75 s of it, 7 speech blocks
    check_heard(agent_pcm[: int(1.75 * rate)], rate, user.recording(), 8000, "phone → Argon user", waveform=False,
                starvation=starvation, timeline=user.timeline())
    session_events = [e.kind for _, e in answer.route.stats.recent_events]
    assert "ready" in session_events and "subscribed" in session_events
    assert "the caller hung up (callEnded)" in answer.route.stats.ended_by
    argon_in, phone_out = answer.route.endpoints
    assert argon_in.stats.connects == 1 and argon_in.stats.frames_in > 50  # one call, stats of its session
    assert not any(secret in caplog.text for secret in SECRETS)


async def test_a_caller_not_in_from_is_rejected_with_the_reason(tmp_path, caplog):
    caplog.set_level("INFO")
    agent, _, _ = clip(tmp_path, "agent.wav", "or109.wav", 0.2, 1.0)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALLS, argon_extra=BOTS, agent=agent, out=str(tmp_path),
                              callers=", from: [someone-else]")
        user = Caller(gateway, "user-7")
        with trio.fail_after(15):
            await user.connect(nursery)
            await gateway.routes["app-user"].sessions_done.wait()
        assert gateway.routes["answer"].state == "waiting" and not gateway.routes["answer"].calls
        nursery.cancel_scope.cancel()
    ended = gateway.routes["app-user"].route.stats.ended_by
    assert "bot rejected the call: not accepted from this caller" in ended, ended
    assert gateway.routes["phone"].route.stats.sessions == 0  # the phone was never dialed
    assert "rejecting (not accepted from this caller)" in caplog.text


async def test_reference_bot_flow_talks_to_a_phone_caller_through_the_listen_role(tmp_path, stalls):
    """Argon's reference bot flow (events stream → callIncoming → Accept → /audio/duplex with
    the caller as target → paced Opus back → close 1000) against our listen role, bridged to a
    VoIPBIN-compatible caller: speech checked each way."""
    import av

    _, bot_pcm, rate = clip(tmp_path, "bot.wav", "or109.wav", 0.2, 2.5)
    ogg = tmp_path / "bot.ogg"
    with av.open(str(tmp_path / "bot.wav")) as source, av.open(str(ogg), "w", format="ogg") as sink:
        stream = sink.add_stream("libopus", rate=48000, layout="mono")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for frame in source.decode(audio=0):
            for out in resampler.resample(frame):
                for packet in stream.encode(out):
                    sink.mux(packet)
        for packet in stream.encode(None):
            sink.mux(packet)
    caller_pcm = clip(tmp_path, "caller.wav", "or105.wav", 0.3, 2.0)[1]
    routes = """
routes:
  - name: call-the-bot
    endpoints:
      - voipbin: {role: listen, name: caller, identity: caller-2, call_id: caller-2}
      - argon: {role: listen, call: %s}
""" % BOT_USER
    starvation = stalls.starvation  # a loaded machine: the speech blocks its stalls reached are not judged
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, argon_extra=BOTS)
        bot = ReferenceBot(f"http://127.0.0.1:{gateway.runtime.http.port}", BOT_TOKEN, str(ogg))
        await nursery.start(bot.run)
        caller = Caller(gateway, "caller-2")
        with trio.fail_after(20):
            await caller.connect(nursery)
            nursery.start_soon(caller.speak, caller_pcm)
            await bot.ended.wait()  # the bot played its file and closed with 1000
            await gateway.routes["call-the-bot"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    assert bot.accepted["callerId"] == "caller-2" and bot.close_code == 1000
    assert [s["status"] for s in bot.statuses][:1] == ["subscribed"] or "subscribed" in [s["status"] for s in bot.statuses]
    # what the bot heard: the caller's speech, as 20 ms Opus packets
    decoder = OpusDecoder(1)
    pcm = np.concatenate([decoder.process(EncodedFrame(p, OPUS_48K, 960))[0].pcm[:, 0] for p in bot.received])
    route = gateway.routes["call-the-bot"].route
    counters = ("frames_in", "frames_out", "late", "dropped", "skipped", "concealed", "late_packets", "jitter_depth_ms")
    context = {ep.name: {k: v for k, v in ep.stats.as_dict().items() if k in counters} for ep in route.endpoints}
    bot_heard = Timeline(48000, ((at, 960) for at in bot.received_at))
    check_heard(caller_pcm[: int(1.5 * rate)], rate, pcm, 48000, "caller → bot", context=context,
                starvation=starvation, timeline=bot_heard)
    check_heard(bot_pcm[: int(2.0 * rate)], rate, caller.recording(), 8000, "bot → caller", context=context,
                starvation=starvation, timeline=caller.timeline())
    assert gateway.routes["call-the-bot"].route.stats.ended_by == "argon: bot hung up (desk_bot closed (1000 bye))"
