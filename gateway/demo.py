"""The demo: a phone caller and a person in a voice channel talk to each other, all on loopback.

One process runs three routes (README, "The demo"):

- `phone-call`: a VoIPBIN-compatible call (listen role): the caller plays recorded speech, and
  what the caller hears is recorded to `caller-hears.wav`;
- `voice-channel`: an Argon-compatible voice channel (listen role) with a person in it who
  plays another recorded voice (identity `person`); what the channel hears from the bridge is
  recorded to `channel.ogg` and `channel.wav`;
- `support-line`: the bridge, through the real dial adapters: VoIPBIN media stream client
  (u-law 8 kHz) ↔ codec graph ↔ Argon bot (StreamToken, then `/audio/duplex` hearing `person`:
  Opus 48 kHz both ways; the call is coded at 8 kHz input, narrowband).

It ends when the caller's speech ends and prints, for each direction, frames, loss and a
speech-similarity figure: the share of the source's 250 ms speech blocks found in the recording,
by waveform correlation where the path keeps the waveform (channel → caller: Opus coded at 48
kHz, then u-law), by short-time spectra where it does not (caller → channel: the 8 kHz call is
Opus-coded at 8 kHz input, narrowband SILK, which keeps the spectrum but not the phase).
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

import numpy as np
import trio

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.quality import (
    SPECTRAL_FOUND,
    blockwise_alignment,
    read_wav,
    spectral_alignment,
    write_wav,
)
from gateway.runtime import Runtime
from gateway.server import serve_http, serve_media

ASSETS = Path(__file__).parent / "assets"
DEFAULT_AUDIO = ASSETS / "or105.wav"
DEFAULT_PERSON = ASSETS / "or109.wav"
CALL_ID = "652af662-eb45-11ee-b1a5-6fde165f9226"
SPACE_ID = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL_ID = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
CALLER_TAIL_S = 1.0  # silence after the caller's speech: what the channel says last still arrives
PERSON_TAIL_S = 2.0  # the person's clip outlasts the caller's, so the call's end ends the demo
PERSON_HEADROOM_S = 0.5  # the person's words end this long before the call, to reach the caller

DEMO_CONFIG = string.Template("""\
server:
  http: 127.0.0.1:$http_port
  media: 127.0.0.1:$media_port
services:
  voipbin: {api_url: "http://127.0.0.1:$media_port", token: "$voipbin_token"}
  argon: {api_url: "http://127.0.0.1:$http_port", bot_token: "$bot_token", jwt_secret: "$jwt_secret"}
routes:
  - name: phone-call                     # the caller: a VoIPBIN-compatible call
    endpoints:
      - voipbin: {role: listen, name: call, call_id: $call_id, codec: $listen_codec}
      - file: {name: caller, path: "$audio", rate: 8000}
      - record: {name: heard, path: "$out/caller-hears.wav", rate: 8000, hears: [call]}
  - name: voice-channel                  # the channel: an Argon-compatible voice channel
    endpoints:
      - argon: {role: listen, space_id: $space_id, channel_id: $channel_id, stereo: $stereo}
$person_endpoint      - record: {name: ogg, path: "$out/channel.ogg", channels: $channels, hears: [argon]}
      - record: {name: wav, path: "$out/channel.wav", rate: 48000, channels: $channels, hears: [argon]}
  - name: support-line                   # the bridge, through the real dial adapters
    endpoints:
      - voipbin: {call_id: $call_id, encapsulation: $encapsulation}
      - argon: {space_id: $space_id, channel_id: $channel_id, stereo: $stereo, hear: person,
                frame_duration_ms: $frame_ms, track_name: Support line, track_source: microphone}
""")


def demo_config(http_port: int, media_port: int, *, audio: str, out: str, person: str | None = None,
                encapsulation: str = "rtp", frame_ms: int = 20, stereo: bool = False,
                listen_codec: str = "auto") -> GatewayConfig:
    person_endpoint = (f'      - file: {{name: person, identity: person, path: "{person}", rate: 48000, '
                       f'channels: {2 if stereo else 1}}}\n') if person else ""
    text = DEMO_CONFIG.substitute(
        http_port=http_port, media_port=media_port, audio=audio, person_endpoint=person_endpoint, out=out,
        encapsulation=encapsulation, frame_ms=frame_ms, stereo=str(stereo).lower(), channels=2 if stereo else 1,
        voipbin_token=secrets.token_urlsafe(16), bot_token=secrets.token_urlsafe(16), jwt_secret=secrets.token_urlsafe(32),
        call_id=CALL_ID, space_id=SPACE_ID, channel_id=CHANNEL_ID, listen_codec=listen_codec,
    )
    return GatewayConfig.from_text(text, "<demo>")


async def start_gateway(nursery: trio.Nursery, make_config, prepare=None) -> Gateway:
    """Bind `server.http` and `server.media` on ephemeral loopback ports, then build the config
    with `make_config(http_port, media_port)` and start its routes (the demo's and the tests'
    way to run routes that point at the same process's listen roles)."""
    runtime = Runtime(GatewayConfig.from_text("server: {http: '127.0.0.1:0', media: '127.0.0.1:0'}", "<local>"))
    http_port = await nursery.start(serve_http, runtime.http, "127.0.0.1", 0)
    media_port = await nursery.start(serve_media, runtime.media, "127.0.0.1", 0)
    gateway = Gateway(make_config(http_port, media_port), runtime)
    gateway.build()
    if prepare is not None:
        prepare(gateway)  # tests: instrument routes before they start
    await nursery.start(gateway.run)
    return gateway


def padded(source: str | Path, out: Path, name: str, tail_s: float, *, at_least_s: float = 0.0,
           speech_at_most_s: float | None = None) -> Path:
    """`source` (a WAV file), cut to `speech_at_most_s` seconds when longer, with `tail_s`
    seconds of silence after it (and more, up to `at_least_s` in all), written to out/name."""
    pcm, rate = read_wav(source)
    if speech_at_most_s is not None:
        pcm = pcm[: max(rate // 10, int(speech_at_most_s * rate))]
    tail = max(int(tail_s * rate), int(at_least_s * rate) - len(pcm))
    path = Path(out) / name
    write_wav(path, np.concatenate([pcm, np.zeros((tail, pcm.shape[1]), dtype=np.int16)]), rate)
    return path


async def start_demo(nursery: trio.Nursery, *, audio: str, out: str, person: str | None = None,
                     encapsulation: str = "rtp", frame_ms: int = 20, stereo: bool = False,
                     listen_codec: str = "auto") -> Gateway:
    """The demo's three routes on ephemeral ports. `audio` is what the caller says, `person`
    what the person in the channel says (None: nobody speaks in the channel, the bridge is
    heard one way). The person's clip is written to `out/person-says.wav`: no longer than the
    call (their words must reach the caller before the call ends), then padded with silence to
    outlast it (a participant whose file ends ends the channel's session), so the call's end
    ends the demo."""
    if person and person.endswith(".wav") and audio.endswith(".wav"):
        caller_pcm, caller_rate = read_wav(audio)
        call_s = len(caller_pcm) / caller_rate
        person = str(padded(person, Path(out), "person-says.wav", PERSON_TAIL_S, at_least_s=call_s + PERSON_TAIL_S,
                            speech_at_most_s=call_s - PERSON_HEADROOM_S))
    return await start_gateway(nursery, lambda http_port, media_port: demo_config(
        http_port, media_port, audio=audio, person=person, out=out, encapsulation=encapsulation,
        frame_ms=frame_ms, stereo=stereo, listen_codec=listen_codec))


async def run_demo(audio: str | None, out: str, encapsulation: str, frame_ms: int, stereo: bool,
                   person: str | None = None) -> int:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    caller_src = Path(audio or DEFAULT_AUDIO).resolve()
    person_src = Path(person or DEFAULT_PERSON).resolve()
    caller = padded(caller_src, out_dir, "caller-says.wav", CALLER_TAIL_S) if caller_src.suffix == ".wav" else caller_src
    print(f"demo: the caller says {caller_src.name}; the person in the voice channel says {person_src.name}")
    print(f"demo: VoIPBIN call ({encapsulation}, u-law 8 kHz) ⇄ gateway ⇄ Argon channel (Opus 48 kHz "
          f"{'stereo' if stereo else 'mono'}, {frame_ms} ms, /audio/duplex hearing the person)")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        gateway = await start_demo(nursery, audio=str(caller), person=str(person_src), out=str(out_dir),
                                   encapsulation=encapsulation, frame_ms=frame_ms, stereo=stereo)
        routes = gateway.routes
        with trio.move_on_after(120) as timeout:
            await routes["support-line"].sessions_done.wait()
            await routes["phone-call"].sessions_done.wait()
            await routes["voice-channel"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    said = out_dir / "person-says.wav"  # what the person said: their clip, cut to the call
    return report(gateway, str(caller_src), str(said if said.exists() else person_src), out_dir, elapsed,
                  timed_out=timeout.cancelled_caught)


def media_duration(path: Path) -> float:
    """Seconds of audio in a file (0 when missing or empty), read back with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            return sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].rate
    except (OSError, av.error.FFmpegError, IndexError):
        return 0.0


def similarity(source: str, recording: Path, *, waveform: bool = True) -> float:
    """The share of the source's speech blocks (250 ms) found in the recording (1.0: every
    block arrived intact): with `waveform`, a waveform correlation above 0.9
    (`blockwise_alignment`, for a path that keeps the waveform); else a short-time spectral
    correlation above SPECTRAL_FOUND (`spectral_alignment`, for a path through a parametric
    codec: Opus's SILK). A broken path (noise, wrong byte order or rate, silence) scores
    near 0 either way."""
    try:
        ref, ref_rate = read_wav(source)
        got, rate = read_wav(recording)
    except (OSError, EOFError, ValueError):
        return 0.0
    if waveform:
        blocks, found = blockwise_alignment(ref, ref_rate, got, rate), 0.9
    else:
        blocks, found = spectral_alignment(ref, ref_rate, got, rate), SPECTRAL_FOUND
    return sum(b > found for b in blocks) / len(blocks) if blocks else 0.0


def report(gateway: Gateway, caller_src: str, person_src: str, out_dir: Path, elapsed: float, *, timed_out: bool) -> int:
    """Print what happened; returns the exit status (0 when each side heard the other)."""
    r = {name: state.route for name, state in gateway.routes.items()}
    call, caller, _ = r["phone-call"].endpoints
    channel, person, _, _ = r["voice-channel"].endpoints
    bridge_call, bridge_bot = r["support-line"].endpoints
    wav = out_dir / "channel.wav"
    heard = out_dir / "caller-hears.wav"
    # the call (8 kHz) is Opus-coded at 8 kHz input by the bridge's Argon bot (opus_input_rate:
    # auto): narrowband SILK, whose waveform is not the source's; the channel's own Opus (48 kHz)
    # and u-law keep the person's
    to_channel = similarity(caller_src, wav, waveform=False) if caller_src.endswith(".wav") else float("nan")
    to_caller = similarity(person_src, heard) if person_src.endswith(".wav") else float("nan")
    lost_in = call.stats.frames_out - bridge_call.stats.frames_in
    # the channel forwards the person until it learns the bot hung up: a packet or two may be
    # on the wire when the bridge closes (the person's speech was over by then: padded silence)
    in_flight = max(0, channel.stats.frames_out - bridge_bot.stats.frames_in)
    print()
    print("caller → channel")
    print(f"  call (VoIPBIN listen)   frames sent to the gateway      {call.stats.frames_out:6d}")
    print(f"  gateway VoIPBIN dial    frames received                 {bridge_call.stats.frames_in:6d}   (lost {lost_in})")
    print(f"  gateway Argon dial      Opus packets published          {bridge_bot.stats.frames_out:6d}"
          f"   ({bridge_bot.stats.late} late, {bridge_bot.stats.dropped} dropped)")
    print(f"  channel (Argon listen)  Opus packets received           {channel.stats.frames_in:6d}")
    print(f"  recording {wav.name}: {media_duration(wav):.2f} s; speech similarity {to_channel:.0%}")
    print("channel → caller")
    print(f"  channel (Argon listen)  packets of the person forwarded {channel.stats.frames_out:6d}")
    print(f"  gateway Argon dial      packets heard                   {bridge_bot.stats.frames_in:6d}"
          f"   ({bridge_bot.stats.concealed} concealed, {in_flight} in flight at hang-up)")
    print(f"  gateway VoIPBIN dial    frames sent to the call         {bridge_call.stats.frames_out:6d}"
          f"   ({bridge_call.stats.late} late)")
    print(f"  call (VoIPBIN listen)   frames received                 {call.stats.frames_in:6d}")
    print(f"  recording {heard.name}: {media_duration(heard):.2f} s; speech similarity {to_caller:.0%}")
    print("routes: " + "; ".join(f"{n}: {s.route.stats.ended_by or s.state}" for n, s in gateway.routes.items()))
    print(f"wall time {elapsed:.1f} s; recordings in {out_dir}")
    ok = (not timed_out and lost_in == 0 and in_flight <= 3 and channel.stats.frames_in > 0
          and not to_channel < 0.8 and not to_caller < 0.8)
    print("demo:", "OK" if ok else "FAILED" + (" (timed out)" if timed_out else ""))
    return 0 if ok else 1
