"""Concurrency benchmark: N phone-to-channel bridge routes in one gateway process.

Run:  .venv/bin/python bench/bench_routes.py [--routes 1,10,50,100] [--seconds 10]

Two processes, so the gateway's CPU and memory are measured alone:

- this script is the **peer**: it plays the services with the gateway's own listen roles,
  built from a config like the demo's (`VoipbinListen`, `ArgonListen`, `serve_http`,
  `serve_media`) but driven by hand instead of by routes: N VoIPBIN-compatible calls
  (`/v1.0/calls/{id}/media_stream`, rtp, u-law) each send recorded speech
  (`gateway/assets/or105.wav`, 8 kHz, looped; call i starts at its own place in the file) as
  one 20 ms frame per message on absolute deadlines, the N calls staggered evenly over the
  20 ms period (independent calls do not tick in phase); N Argon-compatible channels answer
  StreamToken and take the Opus ingress.
- the **gateway** is a subprocess, `python -m gateway run CONFIG`, with N routes `bridge-i`:
  voipbin dial (call i, rtp) → argon dial (channel i, mono, 20 ms), pointed at the peer.

Argon allows 5 StreamToken calls per minute per bot, which would take 20 minutes to start 100
routes: both configs set the documented `services.argon.stream_token_per_minute: 1000`.

Every timestamp comes from one clock, the peer's trio clock: the send time of each call frame
(taken just before `VoipbinListen.send`, kept when the frame went out) and the arrival time of
each channel packet (in the `emit` that `ArgonListen.run` calls for each packet it receives).

What is measured, per N, over a steady-state window of `--seconds` that starts `--warmup`
seconds after the last channel received its first packet:

- **CPU**: user + system time of the gateway process (/proc/PID/stat, all threads) over the
  window, per route-second (ms of CPU per second of one route) and as % of one core.
- **peak RSS**: VmHWM of the gateway process (/proc/PID/status) at the end of the window.
- **packets**: expected N x window / 20 ms; received = channel packets that arrived in it.
- **late**: channel packets that arrived more than 20 ms after their slot on a regular 20 ms
  grid, the grid of each channel phased on the median of (arrival_k - k x 20 ms) over the
  window: packets delivered more than one ptime behind the route's own clock (a stall of the
  gateway's loop, or a gateway that cannot keep up). The gateway's internal `late` counter
  (slots concealed with silence) is not visible from outside; its effect is `lost`.
- **lost**: call frames whose audio did not reach the channel: the decoded channel audio is
  near silence (< -20 dB relative) where the call's frame had speech (> -45 dBFS). This is
  what the gateway's `late` (concealed) plus `dropped` counters cost a listener, seen from
  outside.
- **latency**: the channel packets are decoded (Opus) and brought to 8 kHz (zero-phase FFT
  decimation: no delay of its own), and cross-correlated against the audio the call sent, per
  0.5 s block (a block without a clear peak, a pause, keeps the last offset; the search looks
  up to 4 s back). That gives, for each packet, the call audio it carries, to a fraction of a
  sample, whatever the gateway dropped while routes came up. A call frame's samples count as
  captured in real time over the 20 ms before the frame was sent, so

      latency = packet arrival - moment the newest call sample in the packet existed
              = arrival - send time of the frame holding that sample + the rest of that
                frame after it

  i.e. transport and processing plus the delay of the audio itself (resampler group delay,
  Opus lookahead, whatever the route's playout buffer holds): the latency the gateway adds,
  the ~15 ms budget. The same method run offline on the gateway's own chain (no I/O, no
  waiting) gives its algorithmic delay, printed first: what is above it is processing, queues
  and pacing. p50/p95/p99/max are over every packet of every route in the window.

Also reported: the host's phase in the heading (`_common.wake_probe`: the CPU an echo in
Python costs after an idle pause and back to back; it moves from hour to hour on this VM:
compare per-call figures only between runs with similar readings), the peer's own CPU (% of
one core) and how late its sends left against their deadlines (p99, and the max in the
notes): when the peer itself stalls or is saturated, its timestamps, not only the gateway,
move. The machine has 2 cores: one per process; the peer freezes its existing objects out of
the garbage collector before each run.

After the table, the issue-12 figures **per call** (bench/_common.py `compare_row`): lost,
late, latency p50/p99 and p99 beyond the chain's algorithmic delay, "behind" (packets sent in
the window − packets received in it), CPU % of one core ÷ N, and RSS per call beyond an idle
gateway: (VmRSS at the end of the window − VmRSS of a gateway with the same services and no
routes, measured once before the first N) ÷ N.

`--compare-ffmpeg`: after the gateway at each N (never at the same time), N ffmpeg processes,
one per call, doing the route's transcoding in real time: RTP u-law 8 kHz in over UDP from this
script (the same audio and pacing as the calls), decode, libopus 20 ms mono at the call's 8 kHz
with the argon dial's encoder settings (`FFMPEG_OPUS`), RTP out over UDP back to this script,
which analyses the packets like the channels' (bench/_common.py `run_ffmpeg`). Measured: CPU
of all the processes, Σ RSS and Σ PSS ÷ N, and whether they keep real time (behind, late).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import attrs
import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common  # noqa: E402
from _common import (  # noqa: E402, F401 - names other scripts and notebooks import from here
    BLOCK,
    FRAME,
    GATEWAY,
    LATE_AFTER,
    LOST_RATIO,
    MIN_RHO,
    PTIME,
    RATE,
    ROOT,
    SEARCH,
    SPEECH_RMS,
    STOP_TIMEOUT,
    FfInput,
    FfOutput,
    Started as _Started,
    Totals,
    analyze_ffmpeg,
    analyze_stream,
    best_offset,
    cpu_seconds,
    ffmpeg_cpu_pct_per_call,
    ffmpeg_missing,
    idle_gateway_rss,
    peak_rss_mib,
    rms,
    rss_mib,
    run_ffmpeg,
    stop_process,
)
from gateway.adapters.argon.dial import DEFAULT_COMPLEXITY, DEFAULT_EXPECTED_LOSS_PCT  # noqa: E402
from gateway.codecs import G711Encoder, OpusDecoder, plan  # noqa: E402
from gateway.codecs.formats import OPUS_48K, PCM16_8K, AudioFrame, EncodedFrame  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.errors import ConfigError  # noqa: E402
from gateway.mediaclock import Waker  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402
from gateway.server import serve_http, serve_media  # noqa: E402

AUDIO = ROOT / "gateway" / "assets" / "or105.wav"
OUT_RATIO = 6  # 48 kHz channel audio / 8 kHz call audio
SPACE_ID = "550e8400-e29b-41d4-a716-446655440000"
STREAM_TOKENS_PER_MINUTE = 1000  # services.argon.stream_token_per_minute on both sides

CONNECT_TIMEOUT = 30.0  # seconds for every route to deliver its first packet (plus PER_ROUTE)
CONNECT_PER_ROUTE = 0.2  # seconds added to CONNECT_TIMEOUT per route
SEND_MARGIN = 60.0  # seconds of source audio beyond warm-up + window (bounds the send loops)

# --compare-ffmpeg: the argon dial's Opus encoder (gateway/adapters/argon/dial.py defaults,
# for a phone call: input at the call's 8 kHz, no resampler; application audio, complexity
# auto = 1 at 8 kHz, bitrate floor 32 kb/s, VBR, in-band FEC tuned for 10 % loss), the same
# job as ffmpeg arguments. Until the twelfth measurement (bench/README.md) both used the
# 48 kHz path at complexity 5 and 51 kb/s.
FFMPEG_OPUS = ("-ac", "1", "-c:a", "libopus", "-application", "audio",
               "-b:a", "32k", "-vbr", "on", "-compression_level", "1", "-frame_duration", "20",
               "-fec", "1", "-packet_loss", "10")


# ------------------------------------------------------------------------------ the peer
@attrs.define
class CallLog:
    """What call i sent."""

    start: int
    """Sample of the looped source where the call's frame 0 begins."""
    sends: list[float] = attrs.Factory(list)
    """Trio time at which frame k went out (index k)."""
    lags: list[float] = attrs.Factory(list)
    """How late frame k left against its deadline, seconds."""
    ended: str = ""


@attrs.define
class ChannelLog:
    """What channel i received."""

    arrivals: list[float] = attrs.Factory(list)
    """Trio time at which packet k arrived (index k)."""
    packets: list[bytes] = attrs.Factory(list)
    ended: str = ""


@attrs.define
class Run:
    """One N: raw logs and process measurements."""

    n: int
    seconds: float
    calls: list[CallLog]
    channels: list[ChannelLog]
    source: np.ndarray
    """The looped speech every call plays (call i from `calls[i].start`)."""
    window: tuple[float, float] = (0.0, 0.0)
    cpu_s: float = math.nan
    peer_cpu_s: float = math.nan
    rss_mib: float = math.nan
    """VmHWM (peak) at the end of the window"""
    rss_end_mib: float = math.nan
    """VmRSS at the end of the window"""
    up: int = 0
    connect_s: float = math.nan
    returncode: int | None = None
    log_lines: list[str] = attrs.Factory(list)


def load_speech() -> np.ndarray:
    """or105.wav: 8 kHz mono int16."""
    with wave.open(str(AUDIO)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
            raise SystemExit(f"{AUDIO}: expected 8 kHz mono 16-bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def load_source(seconds: float) -> np.ndarray:
    """The speech looped to at least `seconds` plus one more copy (room for each call's start)."""
    pcm = load_speech()
    return np.tile(pcm, math.ceil(seconds * RATE / len(pcm)) + 1)


def peer_config(n: int, voipbin_token: str, bot_token: str, jwt_secret: str) -> GatewayConfig:
    """The stand-ins' config. The channels must hand on the bot's Opus packets exactly as they
    arrived: where the argon listen endpoint has its own playout with PLC (`concealment`,
    default true, which emits decoded audio), it is turned off (as in bench_loss.py)."""
    probe = _peer_config(n, voipbin_token, bot_token, jwt_secret, ", concealment: false")
    try:
        Gateway(probe, Runtime(probe)).build()
    except ConfigError:  # a checkout whose channel hands packets on as they are anyway
        return _peer_config(n, voipbin_token, bot_token, jwt_secret, "")
    return probe


def _peer_config(n: int, voipbin_token: str, bot_token: str, jwt_secret: str, channel_extra: str) -> GatewayConfig:
    lines = [
        "server: {http: '127.0.0.1:0', media: '127.0.0.1:0'}",
        "services:",
        f"  voipbin: {{token: '{voipbin_token}'}}",
        f"  argon: {{bot_token: '{bot_token}', jwt_secret: '{jwt_secret}', "
        f"stream_token_per_minute: {STREAM_TOKENS_PER_MINUTE}}}",
        "routes:",
    ]
    for i in range(n):
        lines += [
            f"  - name: peer-{i}",  # never run as a route: the bench drives both endpoints
            "    endpoints:",
            # idle_timeout_s 0: the gateway sends the call nothing (the channel is silent), and a
            # route admitted at boot must not be closed at 60 s while held ones are still starting
            f"      - voipbin: {{role: listen, call_id: {call_id(i)}, encapsulation: rtp, codec: ulaw, idle_timeout_s: 0}}",
            f"      - argon: {{role: listen, space_id: {SPACE_ID}, channel_id: {channel_id(i)}{channel_extra}}}",
        ]
    return GatewayConfig.from_text("\n".join(lines) + "\n", "<bench peer>")


def services_yaml(http_port: int, media_port: int, voipbin_token: str, bot_token: str) -> str:
    return (
        "services:\n"
        f"  voipbin: {{api_url: 'http://127.0.0.1:{media_port}', token: '{voipbin_token}'}}\n"
        f"  argon: {{api_url: 'http://127.0.0.1:{http_port}/api/bot', bot_token: '{bot_token}', "
        f"stream_token_per_minute: {STREAM_TOKENS_PER_MINUTE}}}\n"
    )


def gateway_config(n: int, http_port: int, media_port: int, voipbin_token: str, bot_token: str) -> str:
    lines = [services_yaml(http_port, media_port, voipbin_token, bot_token).rstrip("\n")]
    lines += _common.server_yaml()
    lines.append("routes:")
    for i in range(n):
        lines += [
            f"  - name: bridge-{i}",
            "    restart: never",
            "    endpoints:",
            f"      - voipbin: {{call_id: {call_id(i)}, encapsulation: rtp}}",
            f"      - argon: {{space_id: {SPACE_ID}, channel_id: {channel_id(i)}, frame_duration_ms: 20}}",
        ]
    return "\n".join(lines) + "\n"


def call_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def channel_id(i: int) -> str:
    return f"6ba7b810-9dad-41d1-80b4-{i:012d}"


async def call_task(ep, log: CallLog, source: np.ndarray, first_tick: float) -> None:
    """Accept the gateway's media stream for one call, then send frame k at its deadline."""
    connected = trio.Event()

    async def pace() -> None:
        await connected.wait()
        now = trio.current_time()
        start = first_tick + math.ceil((now - first_tick) / PTIME) * PTIME
        frames = (len(source) - log.start) // FRAME
        sends, lags, stats = log.sends, log.lags, ep.stats
        try:
            waker = Waker()  # the gateway's timer heap: no cancel scope per frame (gateway.mediaclock)
            for k in range(frames):
                deadline = start + k * PTIME
                await waker.wait(deadline)
                a = log.start + k * FRAME
                frame = AudioFrame(source[a : a + FRAME].reshape(FRAME, 1), RATE, k * FRAME)
                before = stats.frames_out
                t = trio.current_time()
                await ep.send(frame)
                if stats.frames_out == before:
                    log.ended = log.ended or "send dropped: stream gone"
                    return
                sends.append(t)
                lags.append(t - deadline)
        except Exception as err:  # the gateway went away; the run is ending
            log.ended = log.ended or f"send: {err!r}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pace)
        try:
            await ep.run(lambda frame: None, task_status=_Started(connected))
            log.ended = log.ended or "ended"
        except Exception as err:
            log.ended = log.ended or str(err) or repr(err)
        nursery.cancel_scope.cancel()


async def channel_task(ep, log: ChannelLog) -> None:
    """Take the gateway's ingress for one channel; log each packet's arrival time."""
    arrivals, packets, now = log.arrivals, log.packets, trio.current_time

    def emit(frame: EncodedFrame) -> None:
        if not isinstance(frame, EncodedFrame):  # the channel must not decode (peer_config)
            raise RuntimeError(f"the channel stand-in emitted {type(frame).__name__}, not the bot's Opus packets")
        arrivals.append(now())
        packets.append(frame.payload)

    try:
        await ep.run(emit)
        log.ended = "ended"
    except Exception as err:
        log.ended = str(err) or repr(err)


async def run_once(n: int, seconds: float, warmup: float, workdir: Path) -> Run:
    voipbin_token, bot_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    config = peer_config(n, voipbin_token, bot_token, secrets.token_urlsafe(32))
    runtime = Runtime(config)
    peer = Gateway(config, runtime)
    peer.build()  # registers the listen paths; the routes themselves are never run
    calls = [peer.routes[f"peer-{i}"].route.endpoints[0] for i in range(n)]
    channels = [peer.routes[f"peer-{i}"].route.endpoints[1] for i in range(n)]
    connect_timeout = CONNECT_TIMEOUT + CONNECT_PER_ROUTE * n
    source = load_source(connect_timeout + warmup + seconds + SEND_MARGIN)
    speech_frames = len(load_speech()) // FRAME  # or105.wav: 420 frames (8.4 s)
    run = Run(
        n, seconds,
        calls=[CallLog(start=(i * 97 % speech_frames) * FRAME) for i in range(n)],
        channels=[ChannelLog() for _ in range(n)],
        source=source,
    )
    log_path = workdir / f"gateway-{n}.log"
    async with trio.open_nursery() as nursery:
        http_port = await nursery.start(serve_http, runtime.http, "127.0.0.1", 0)
        media_port = await nursery.start(serve_media, runtime.media, "127.0.0.1", 0)
        tick0 = trio.current_time()
        for i in range(n):
            # Call i ticks at tick0 + i/n x 20 ms + k x 20 ms: evenly staggered phases.
            nursery.start_soon(call_task, calls[i], run.calls[i], source, tick0 + i * PTIME / n)
            nursery.start_soon(channel_task, channels[i], run.channels[i])
        config_path = workdir / f"gateway-{n}.yaml"
        config_path.write_text(gateway_config(n, http_port, media_port, voipbin_token, bot_token))
        with open(log_path, "wb") as log_file:
            started = trio.current_time()
            proc = await trio.lowlevel.open_process(
                _common.gateway_command(config_path),
                cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            with trio.move_on_after(connect_timeout):
                while proc.poll() is None:
                    if all(c.arrivals for c in run.channels):
                        break
                    await trio.sleep(0.05)
            firsts = [c.arrivals[0] for c in run.channels if c.arrivals]
            run.up = len(firsts)
            if firsts and proc.poll() is None:
                run.connect_s = max(firsts) - started
                # routes held by admission may never come up: then the window starts when the
                # wait for them ended, never before (its CPU and packets are counted from t0)
                t0 = max(max(firsts) + warmup, trio.current_time())
                run.window = (t0, t0 + seconds)
                await trio.sleep_until(t0)
                cpu0, peer0 = cpu_seconds(proc.pid), cpu_seconds("self")
                await trio.sleep_until(t0 + seconds)
                if proc.poll() is None:
                    run.cpu_s = cpu_seconds(proc.pid) - cpu0
                    run.peer_cpu_s = cpu_seconds("self") - peer0
                    run.rss_mib = peak_rss_mib(proc.pid)
                    run.rss_end_mib = rss_mib(proc.pid)
        finally:
            run.returncode = await stop_process(proc, STOP_TIMEOUT)
            nursery.cancel_scope.cancel()
    run.log_lines = log_path.read_text(errors="replace").splitlines()
    return run


# -------------------------------------------------------------------------- the analysis
@attrs.define
class Result:
    n: int
    up: int
    cpu_ms_per_route_s: float
    cpu_pct: float
    rss_mib: float
    expected: int
    received: int
    late: int
    lost: int
    checked: int
    latencies_ms: np.ndarray
    route_p50_ms: np.ndarray
    slips: int
    unaligned: int
    silent_routes: int
    peer_cpu_pct: float
    peer_lag_p99_ms: float
    peer_lag_max_ms: float
    connect_s: float
    warnings: list[str]
    totals: Totals = attrs.Factory(Totals)
    rss_end_mib: float = math.nan
    held: int = 0
    """Routes the gateway's admission held back at least once (its log's "not starting yet")."""
    admission_closed: int = 0
    """Times the gateway's admission closed (its log's "admission closed")."""


def decimate(y48: np.ndarray) -> np.ndarray:
    """48 kHz → 8 kHz by truncating the spectrum: zero phase, so no delay of its own."""
    return _common.decimate(y48, OUT_RATIO)


def chain_delay_ms() -> tuple[float, float]:
    """The route's codec chain (voipbin PCM 8 kHz → Opus 20 ms at 8 kHz input with the argon
    dial's defaults, as Route plans it: no resampler) run offline on the speech, measured
    with the latency method: (measured, declared) ms."""
    encode = plan(PCM16_8K, OPUS_48K, opus_input_rate=RATE, opus_complexity=DEFAULT_COMPLEXITY, opus_fec=True,
                  opus_expected_loss_pct=DEFAULT_EXPECTED_LOSS_PCT)
    decoder = OpusDecoder(1)
    x = load_speech()
    out = []
    for k in range(len(x) // FRAME):
        frame = AudioFrame(x[k * FRAME : (k + 1) * FRAME].reshape(FRAME, 1), RATE, k * FRAME)
        out += [decoder.process(packet)[0].pcm[:, 0] for packet in encode.process(frame)]
    y = decimate(np.concatenate(out))
    off, _ = best_offset(y, RATE, len(y) - RATE, x.astype(np.float64), -FRAME, FRAME)
    return off / RATE * 1000, encode.delay_ms


def decode_channel(packets: list[bytes]) -> np.ndarray:
    """A channel's Opus packets (every one from the first, to keep the decoder's state),
    decoded and brought to 8 kHz."""
    decoder = OpusDecoder(1)
    pcm = [decoder.process(EncodedFrame(p, OPUS_48K, 960, 0))[0].pcm[:, 0] for p in packets]
    sizes = np.array([len(p) for p in pcm])
    if np.any(sizes != FRAME * OUT_RATIO):
        raise RuntimeError(f"channel packets of {sorted(set(sizes.tolist()))} samples; expected 20 ms")
    return decimate(np.concatenate(pcm))


def analyze(run: Run) -> Result:
    """Each route's stream (bench/_common.py `analyze_stream`: late, lost, latency), summed."""
    stats = [
        analyze_stream(call.sends, call.lags, channel.arrivals, lambda channel=channel: decode_channel(channel.packets),
                       run.source[call.start :], run.window)
        for call, channel in zip(run.calls, run.channels)
    ]
    totals = Totals.of(stats)
    lags = totals.lags
    warnings = [line for line in run.log_lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    held, closed = _common.admission_seen(run.log_lines)
    cpu = run.cpu_s
    return Result(
        n=run.n,
        up=run.up,
        cpu_ms_per_route_s=cpu / (max(run.up, 1) * run.seconds) * 1000,
        cpu_pct=cpu / run.seconds * 100,
        rss_mib=run.rss_mib,
        expected=int(round(run.n * run.seconds / PTIME)),
        received=totals.received,
        late=totals.late,
        lost=totals.lost,
        checked=totals.checked,
        latencies_ms=totals.latencies_ms,
        route_p50_ms=totals.stream_p50_ms,
        slips=totals.slips,
        unaligned=totals.unaligned,
        silent_routes=totals.silent,
        peer_cpu_pct=run.peer_cpu_s / run.seconds * 100,
        peer_lag_p99_ms=float(np.percentile(lags, 99) * 1000) if lags else math.nan,
        peer_lag_max_ms=float(np.max(lags) * 1000) if lags else math.nan,
        held=held,
        admission_closed=closed,
        connect_s=run.connect_s,
        warnings=warnings,
        totals=totals,
        rss_end_mib=run.rss_end_mib,
    )


# ------------------------------------------------------------------------------- output
HEADER = (
    f"{'routes':>6} {'up':>4} {'CPU ms/':>8} {'CPU %':>6} {'peak RSS':>8} {'packets':>13} {'late':>5} "
    f"{'lost':>9} {'latency ms':^27} {'peer':>5} {'peer lag':>8}\n"
    f"{'':>6} {'':>4} {'route-s':>8} {'1 core':>6} {'MiB':>8} {'exp/recv':>13} {'':>5} "
    f"{'/checked':>9} {'p50':>6} {'p95':>6} {'p99':>6} {'max':>6} {'CPU %':>5} {'p99 ms':>8}"
)


def row(r: Result) -> str:
    lat = r.latencies_ms
    p50, p95, p99 = (np.percentile(lat, q) for q in (50, 95, 99)) if len(lat) else (math.nan,) * 3
    mx = lat.max() if len(lat) else math.nan
    return (
        f"{r.n:>6} {r.up:>4} {r.cpu_ms_per_route_s:>8.2f} {r.cpu_pct:>6.1f} {r.rss_mib:>8.1f} "
        f"{f'{r.expected}/{r.received}':>13} {r.late:>5} {f'{r.lost}/{r.checked}':>9} "
        f"{p50:>6.1f} {p95:>6.1f} {p99:>6.1f} {mx:>6.1f} {r.peer_cpu_pct:>5.0f} {r.peer_lag_p99_ms:>8.1f}"
    )


def details(r: Result) -> str:
    parts = [f"N={r.n}: routes up in {r.connect_s:.1f} s; peer sends up to {r.peer_lag_max_ms:.1f} ms late"]
    if len(r.route_p50_ms):
        parts.append(
            f"per-route median latency {r.route_p50_ms.min():.1f}..{r.route_p50_ms.max():.1f} ms "
            f"({np.count_nonzero(r.route_p50_ms > np.median(r.route_p50_ms) + 10)} routes >10 ms above the median)"
        )
    if r.slips or r.unaligned:
        parts.append(f"{r.slips} changes of the audio offset (audio dropped), "
                     f"{r.unaligned} blocks of {BLOCK} packets without a clear match (pauses, or a backlog > {SEARCH:g} s)")
    if r.silent_routes:
        parts.append(f"{r.silent_routes} routes' channels silent for the whole window (no latency to measure)")
    if (note := _common.admission_note(r.n, r.up, r.held, r.admission_closed)) is not None:
        parts.append(note)
    parts.append(f"{len(r.warnings)} gateway log warnings/errors")
    return "; ".join(parts)


# ------------------------------------------------------------------------ --compare-ffmpeg
def ffmpeg_job(n: int, seconds: float, warmup: float) -> tuple[list[FfInput], list[FfOutput], int]:
    """What one ffmpeg per call does: RTP u-law 8 kHz in (call i's audio, as the gateway's
    calls send it), decode, Opus 20 ms mono from 8 kHz input (FFMPEG_OPUS), RTP out."""
    connect_timeout = CONNECT_TIMEOUT + CONNECT_PER_ROUTE * n
    source = load_source(connect_timeout + warmup + seconds + SEND_MARGIN)
    speech_frames = len(load_speech()) // FRAME
    starts = [(i * 97 % speech_frames) * FRAME for i in range(n)]  # as run_once's calls
    ulaw = G711Encoder().process(AudioFrame(source.reshape(-1, 1), RATE, 0))[0].payload
    inputs = [FfInput("0 PCMU/8000", ulaw, FRAME, 1, source, starts)]

    def decode(payloads: list[bytes]) -> tuple[np.ndarray, list[int], float]:
        decoder = OpusDecoder(1)
        pcm = [decoder.process(EncodedFrame(p, OPUS_48K, 960, 0))[0].pcm[:, 0] for p in payloads]
        y = decimate(np.concatenate(pcm)) if pcm else np.zeros(0)
        return y, [len(p) for p in pcm], float(OUT_RATIO)

    outputs = [FfOutput(0, FFMPEG_OPUS, decode, "Opus")]
    frames = (len(source) - max(starts)) // FRAME
    return inputs, outputs, frames


async def ffmpeg_once(n: int, seconds: float, warmup: float, workdir: Path) -> _common.FfRun:
    inputs, outputs, frames = ffmpeg_job(n, seconds, warmup)
    return await run_ffmpeg(n, seconds, warmup, workdir, inputs, outputs,
                            CONNECT_TIMEOUT + CONNECT_PER_ROUTE * n, frames)


def ffmpeg_side(ff: _common.FfRun) -> _common.Side:
    totals = analyze_ffmpeg(ff) if ff.window != (0.0, 0.0) else [Totals()]
    return _common.Side("ffmpeg", ff.n, ff.up, totals, ffmpeg_cpu_pct_per_call(ff), ff.rss_mib / ff.n,
                        ff.pss_mib / ff.n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default="1,10,50,100", help="comma-separated route counts (default 1,10,50,100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady-state window per count, s (default 10)")
    parser.add_argument("--warmup", type=float, default=_common.WARMUP_S,
                        help=f"s after the last route is up before the window "
                             f"(default {_common.WARMUP_S:g}: the jitter buffer's convergence, _common.WARMUP_S)")
    parser.add_argument("--keep", metavar="DIR", help="keep the gateway configs and logs in DIR")
    parser.add_argument("--workers", default="auto", help="gateway run --workers (default auto: one per CPU; 1: one process)")
    _common.add_profile_option(parser)
    parser.add_argument("--compare-ffmpeg", action="store_true",
                        help="after the gateway at each N, N ffmpeg processes doing the same transcoding per call")
    _common.add_admission_options(parser)
    args = parser.parse_args(argv)
    _common.WORKERS = args.workers
    _common.use_profile(args)
    _common.use_admission(args)
    counts = [int(c) for c in args.routes.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.seconds <= 0:
        parser.error("--routes needs positive counts and --seconds a positive duration")
    if args.compare_ffmpeg and (why := ffmpeg_missing(("libopus",))):
        parser.error(f"--compare-ffmpeg: {why}")

    logging.basicConfig(level=logging.ERROR, format="peer %(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    print(f"bench_routes: N phone-to-channel routes (VoIPBIN rtp u-law 8 kHz → Opus 48 kHz mono 20 ms), "
          f"{args.seconds:g} s window after {args.warmup:g} s warm-up; {os.cpu_count()} CPUs")
    print("late: packets > 20 ms behind the channel's 20 ms grid; lost: call frames with speech that reached "
          "the channel as silence; latency: packet arrival - capture of the newest call audio in it "
          "(cross-correlation, see the docstring)")
    measured, declared = chain_delay_ms()
    print(f"algorithmic delay of the chain, offline, same method: {measured:.2f} ms "
          f"(its stages declare {declared:.2f} ms: the Opus lookahead; no resampler at 8 kHz input)\n")
    results = []
    sides: list[_common.Side] = []
    with tempfile.TemporaryDirectory(prefix="bench_routes_") as tmp:
        workdir = Path(args.keep).resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        idle = trio.run(idle_gateway_rss, services_yaml(9, 9, "idle", "idle"), workdir)
        print(f"idle gateway (same services, no routes): VmRSS {idle:.1f} MiB")
        print(_common.wake_line() + "\n")
        print(HEADER, flush=True)
        for n in counts:
            # The peer's own garbage collector must not stall its clock: what exists now is
            # frozen out of the collections that run during the measurement.
            gc.collect()
            gc.freeze()
            run = trio.run(run_once, n, args.seconds, args.warmup, workdir)
            if not run.up or run.window == (0.0, 0.0):
                print(f"{n:>6} {run.up:>4}  gateway did not come up (exit {run.returncode}); log tail:")
                print("\n".join("    " + line for line in run.log_lines[-15:]), flush=True)
                continue
            result = analyze(run)
            results.append(result)
            print(row(result), flush=True)
            sides.append(_common.Side("gateway", n, result.up, [result.totals], result.cpu_pct / n,
                                      (result.rss_end_mib - idle) / n, codec_delay_ms=[measured]))
            if args.compare_ffmpeg:
                gc.collect()
                ff = trio.run(ffmpeg_once, n, args.seconds, args.warmup, workdir)
                sides.append(ffmpeg_side(ff))
                print(_common.ffmpeg_line(ff), flush=True)
    print()
    for r in results:
        print(details(r))
        for line in r.warnings[:5]:
            print("    " + line[:200])
    _common.print_per_call(sides, ["call → channel (u-law 8 kHz → Opus 48 kHz)"])
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
