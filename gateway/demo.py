"""The demo: a recorded phone caller heard in a voice channel, all on loopback.

One process runs three routes (README, "Demo"):

- `phone-call`: a VoIPBIN-compatible call (listen role) whose caller plays recorded speech;
- `voice-channel`: an Argon-compatible voice channel (listen role), recorded to Ogg/Opus and WAV;
- `support-line`: the bridge, through the real dial adapters: VoIPBIN media stream client →
  codec graph (u-law 8 kHz → PCM 48 kHz → Opus) → Argon StreamToken + ingress client.

It ends when the speech ends and prints what happened.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

import trio

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.runtime import Runtime
from gateway.server import serve_http, serve_media

ASSETS = Path(__file__).parent / "assets"
DEFAULT_AUDIO = ASSETS / "or105.wav"
CALL_ID = "652af662-eb45-11ee-b1a5-6fde165f9226"
SPACE_ID = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL_ID = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"

DEMO_CONFIG = string.Template("""\
server:
  http: 127.0.0.1:$http_port
  media: 127.0.0.1:$media_port
services:
  voipbin: {api_url: "http://127.0.0.1:$media_port", token: "$voipbin_token"}
  argon: {api_url: "http://127.0.0.1:$http_port/api/bot", bot_token: "$bot_token", jwt_secret: "$jwt_secret"}
routes:
  - name: phone-call                     # the caller: speech played into a VoIPBIN-compatible call
    endpoints:
      - file: {path: "$audio", rate: 8000}
      - voipbin: {role: listen, call_id: $call_id, codec: $listen_codec}
  - name: voice-channel                  # the channel: an Argon-compatible ingress, recorded
    endpoints:
      - argon: {role: listen, space_id: $space_id, channel_id: $channel_id, stereo: $stereo}
      - record: {name: ogg, path: "$out/channel.ogg", channels: $channels}
      - record: {name: wav, path: "$out/channel.wav", rate: 48000, channels: $channels}
  - name: support-line                   # the bridge, through the real dial adapters
    endpoints:
      - voipbin: {call_id: $call_id, encapsulation: $encapsulation}
      - argon: {space_id: $space_id, channel_id: $channel_id, stereo: $stereo,
                frame_duration_ms: $frame_ms, track_name: Support line, track_source: microphone}
""")


def demo_config(http_port: int, media_port: int, *, audio: str, out: str, encapsulation: str = "rtp",
                frame_ms: int = 20, stereo: bool = False, listen_codec: str = "auto") -> GatewayConfig:
    text = DEMO_CONFIG.substitute(
        http_port=http_port, media_port=media_port, audio=audio, out=out, encapsulation=encapsulation,
        frame_ms=frame_ms, stereo=str(stereo).lower(), channels=2 if stereo else 1,
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


async def start_demo(nursery: trio.Nursery, *, audio: str, out: str, encapsulation: str = "rtp",
                     frame_ms: int = 20, stereo: bool = False, listen_codec: str = "auto") -> Gateway:
    """The demo's three routes on ephemeral ports."""
    return await start_gateway(nursery, lambda http_port, media_port: demo_config(
        http_port, media_port, audio=audio, out=out, encapsulation=encapsulation,
        frame_ms=frame_ms, stereo=stereo, listen_codec=listen_codec))


async def run_demo(audio: str | None, out: str, encapsulation: str, frame_ms: int, stereo: bool) -> int:
    audio = str(Path(audio or DEFAULT_AUDIO).resolve())
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo: caller plays {audio}")
    print(f"demo: VoIPBIN call ({encapsulation}, u-law 8 kHz) → gateway → Argon channel (Opus 48 kHz "
          f"{'stereo' if stereo else 'mono'}, {frame_ms} ms)")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        gateway = await start_demo(nursery, audio=audio, out=str(out_dir), encapsulation=encapsulation,
                                   frame_ms=frame_ms, stereo=stereo)
        routes = gateway.routes
        with trio.move_on_after(120) as timeout:
            await routes["support-line"].sessions_done.wait()
            await routes["voice-channel"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    return report(gateway, audio, out_dir, elapsed, timed_out=timeout.cancelled_caught)


def media_duration(path: Path) -> float:
    """Seconds of audio in a file (0 when missing or empty), read back with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            return sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].rate
    except (OSError, av.error.FFmpegError, IndexError):
        return 0.0


def report(gateway: Gateway, audio: str, out_dir: Path, elapsed: float, *, timed_out: bool) -> int:
    """Print what happened; returns the exit status (0 when the speech reached the channel)."""
    r = {name: state.route for name, state in gateway.routes.items()}
    file_ep, call_ep = r["phone-call"].endpoints
    bridge_call, bridge_channel = r["support-line"].endpoints
    channel = r["voice-channel"].endpoints[0]
    source_s = media_duration(Path(audio))
    recorded = {p: media_duration(p) for p in (out_dir / "channel.ogg", out_dir / "channel.wav")}
    print()
    print(f"caller (file)          frames played into the call  {file_ep.stats.frames_in:6d}")
    print(f"call (VoIPBIN listen)  frames sent to the gateway   {call_ep.stats.frames_out:6d}")
    print(f"gateway VoIPBIN dial   frames received              {bridge_call.stats.frames_in:6d}")
    print(f"gateway Argon dial     Opus packets sent            {bridge_channel.stats.frames_out:6d}"
          f"   ({bridge_channel.stats.late} late, {bridge_channel.stats.dropped} dropped)")
    print(f"channel (Argon listen) Opus packets received        {channel.stats.frames_in:6d}")
    for path, seconds in recorded.items():
        print(f"recording {path}: {seconds:.2f} s")
    print("routes: " + "; ".join(f"{n}: {s.route.stats.ended_by or s.state}" for n, s in gateway.routes.items()))
    lost = call_ep.stats.frames_out - bridge_call.stats.frames_in
    print(f"speech {source_s:.2f} s, wall time {elapsed:.1f} s; lost {lost} of {call_ep.stats.frames_out} frames "
          f"between call and gateway, {bridge_channel.stats.late} concealed into the channel")
    ok = (not timed_out and lost == 0 and channel.stats.frames_in > 0
          and all(seconds >= source_s - 0.1 for seconds in recorded.values()))
    print("demo:", "OK" if ok else "FAILED" + (" (timed out)" if timed_out else ""))
    return 0 if ok else 1
