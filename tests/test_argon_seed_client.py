"""The Argon seed's TypeScript example (tests/seed_clients/argon_stream.mjs: the spec's script,
unchanged but for its URL, token, ids and input file) against our Argon listen role, run for
real with node and ffmpeg.

The example asks our REST role for a StreamToken, opens the bare `ingressUrl?token=…&stereo=
true&frame_duration_ms=20&track_name=music` and pipes `ffmpeg -f opus` into `ws.send(chunk)`:
an Ogg Opus stream cut wherever the pipe read ended, sent as fast as ffmpeg makes it, then
`ws.close()`. The channel's route records what the channel hears. What a user checks: the
whole speech is in the recording, in order and intact; it plays at real time (ffmpeg sent it
in a burst, the route queued it: the recording is not squeezed, and the client closing early
does not cut it); one warning line names the Ogg stream; node exits 0.
"""

from __future__ import annotations

import numpy as np
import trio

from audio_checks import active_duration, best_alignment, blockwise_alignment, read_wav, write_wav
from gateway.codecs.ogg import OggOpusDemuxer
from harness import BOT_TOKEN, start
from seed_clients import ARGON_STREAM, argon_env, require_ffmpeg, run_node
from test_seed_clients import Timed, cut

SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
BOT_USER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
BOTS = ', listen_bots: [{token: "%s", user_id: %s, username: music_bot}]' % (BOT_TOKEN, BOT_USER)
NODE_TIMEOUT = 90.0  # s: node's and ffmpeg's first start on a cold machine, plus the stream itself
FFMPEG_TIMEOUT = 60.0  # s: one ffmpeg run of a few seconds of audio, on a cold machine
SPEECH_S = 2.5  # the file the example plays (a cut of or105.wav)
SPEECH_DBFS = -40.0  # a 10 ms block this loud is speech (the file's hiss is at -51 dBFS)

CHANNEL_ROUTE = """
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {name: heard, path: "$out/channel.wav", rate: 8000}
""" % (SPACE, CHANNEL)


async def ffmpeg_packets(wav) -> int:
    """How many Opus packets the example's ffmpeg command makes of `wav` (demuxed here)."""
    with trio.fail_after(FFMPEG_TIMEOUT):
        done = await trio.run_process(
            [require_ffmpeg(), "-i", str(wav), "-f", "opus", "-ar", "48000", "-ac", "2", "-frame_duration", "20", "pipe:1"],
            capture_stdout=True, capture_stderr=True)
    return len(OggOpusDemuxer().feed(done.stdout))


async def test_argon_typescript_example_is_heard_whole_at_real_time(tmp_path, caplog):
    require_ffmpeg()
    clip, rate = cut("or105.wav", 0.5, SPEECH_S)
    clip = clip[:, 0]
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    write_wav(client_dir / "speech.wav", clip, rate)
    timed = Timed()

    def prepare(gateway):
        channel, heard = gateway.routes["channel"].route.endpoints
        timed.on_emit(channel)
        timed.on_send(heard)

    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CHANNEL_ROUTE, argon_extra=BOTS, prepare=prepare, out=str(tmp_path))
        state = gateway.routes["channel"]
        env = argon_env(f"http://127.0.0.1:{gateway.runtime.http.port}", BOT_TOKEN, SPACE, CHANNEL)
        with trio.fail_after(NODE_TIMEOUT + 15):
            status, stdout, stderr = await run_node(ARGON_STREAM, env=env, cwd=client_dir, timeout=NODE_TIMEOUT)
            await state.sessions_done.wait()  # the bot left; the route played out what it queued
        nursery.cancel_scope.cancel()

    route = state.route
    channel, heard = route.endpoints
    summary = {e.name: e.stats.as_dict() for e in route.endpoints}
    assert status == 0, (status, stdout, stderr)
    assert route.stats.ended_by.startswith("argon: every bot left the channel"), route.stats.ended_by

    # one warning line names the Ogg stream (and what the gateway does about it)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    ogg_warnings = [m for m in warnings if "Ogg" in m]
    assert len(ogg_warnings) == 1, warnings
    assert "sends an Ogg stream" in ogg_warnings[0] and "TypeScript example" in ogg_warnings[0]
    assert BOT_USER in ogg_warnings[0]

    # the session was the example's (the seed's bare ingress URL; stereo, 20 ms, track "music"),
    # and it sent every packet ffmpeg made, the first ones too, faster than real time
    params = channel.params
    assert params is not None and params.legacy and params.stereo and params.frame_duration_ms == 20
    assert params.track_name == "music"
    packets = len(timed.emitted)
    made = await ffmpeg_packets(client_dir / "speech.wav")
    assert packets == channel.stats.frames_in == made, (made, summary)
    assert abs(packets * 0.020 - SPEECH_S) < 0.1, summary
    burst = timed.emitted[-1] - timed.emitted[0]
    assert burst < SPEECH_S / 2, f"the example's {packets} packets arrived over {burst:.3f} s"

    # the recording holds the whole speech, in order and intact (block by block)
    recording, rec_rate = read_wav(tmp_path / "channel.wav")
    recording = recording[:, 0]
    assert rec_rate == 8000 and heard.stats.dropped == 0 and heard.stats.late == 0, summary
    blocks = blockwise_alignment(clip, rate, recording, 8000)
    assert len(blocks) >= 5 and min(blocks) >= 0.9, (np.round(blocks, 3), summary)
    _, lag = best_alignment(clip, rate, recording, 8000)
    start_at = round(lag * 8000)
    assert 0 <= start_at < 8000 * 0.2, f"the speech starts {lag:.3f} s into the recording: {summary}"
    # ...as long as the file: the speech in it lasts as long, and the recording holds all of it
    # (the example's `-ac 2` spreads the mono file over two channels at -3 dB each: the speech
    # is measured against the recording's own level; the file's -51 dBFS hiss is not speech)
    aligned = recording[start_at : start_at + len(clip)].astype(np.float64)
    gain_db = 10 * np.log10(np.mean(aligned**2) / np.mean(clip.astype(np.float64) ** 2))
    spoken = active_duration(clip, rate, SPEECH_DBFS)
    assert abs(active_duration(recording, 8000, SPEECH_DBFS + gain_db) - spoken) <= 0.03, (gain_db, spoken)
    assert len(recording) >= start_at + len(clip) - 160, (len(recording) / 8000, summary)

    # ...played at real time: the frames holding the speech went out one per 20 ms, although
    # the client had sent it all in a burst (and closed) long before
    first, last = start_at // 160, (start_at + len(clip) - 1) // 160
    span = timed.sent[last] - timed.sent[first]
    expected = (last - first) * 0.020
    assert abs(span - expected) < 0.03 * expected + 0.04, f"{last - first + 1} frames played in {span:.3f} s"
    assert timed.sent[last] - timed.emitted[-1] > SPEECH_S / 2, "played out before the burst was over?"
