"""Concurrency benchmark, two-way: N phone ↔ agent routes in one gateway process.

Run:  .venv/bin/python bench/bench_two_way.py [--routes 1,10,50,100] [--seconds 10] [--compare-ffmpeg]

The method of bench_routes.py (read its docstring first), with audio both ways and no Opus:

- this script is the **peer**: N VoIPBIN-compatible calls (`VoipbinListen`, rtp, u-law 8 kHz,
  `jitter_buffer_ms: 0` and `concealment: false`, so it hands on each packet the gateway sends
  as it arrives) and N agent-compatible services (`AgentListen`, the gateway's own agent listen
  role: token endpoint on `server.http`, PCM16 16 kHz WebSocket on `server.media`). Call i
  sends `gateway/assets/or105.wav` (8 kHz, looped) and agent i sends
  `/work/shared/audio/speech16k.wav` (16 kHz), both one 20 ms frame per message on absolute
  deadlines, the N routes staggered over 20 ms, each from its own place in its source.
  speech16k.wav is 3.1 s: too short a loop for the correlation's 4 s search, so the agent
  plays it forwards, backwards, inverted forwards and inverted backwards (a 12.4 s loop with
  no positive repeat inside it).
- the **gateway** is a subprocess with N routes `bridge-i`: voipbin dial (call i, rtp) ↔ agent
  dial (api key i; each agent listen endpoint accepts only its own key, which pairs agent dial
  i with agent i). The agent dial keeps its default `bursty: true` (the route queues the
  agent's audio and plays it at real time; `--live-agent` sets `bursty: false`).

Per direction (call → agent: u-law 8 kHz → PCM16 16 kHz; agent → call: PCM16 16 kHz → u-law
8 kHz), over the window: frames sent and packets received, late, lost, latency p50/p99/max,
measured as in bench_routes.py on the received audio brought to 8 kHz (the agent's 16 kHz by a
zero-phase FFT decimation; the agent's source likewise, as the reference); and for the
gateway, CPU (% of one core, and ms per route-second), peak RSS, and RSS per call beyond an
idle gateway. The chain's own delay (the resamplers' group delay, declared by the planned
stages) is printed first; "p99+" in the per-call table is p99 minus it.

`--compare-ffmpeg`: after the gateway at each N, N ffmpeg processes, **one per call with two
streams** (two RTP inputs from this process: the call's u-law 8 kHz and the agent's L16 16 kHz;
two RTP outputs back: L16 16 kHz towards the agent, u-law 8 kHz towards the call). One process
per call is what a deployment would run for one call, as one route is one call in the gateway;
two processes per call would count ffmpeg's per-process baseline (~ its RSS when idle) twice.
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
from pathlib import Path

import attrs
import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common  # noqa: E402
from _common import (  # noqa: E402
    FRAME,
    PTIME,
    RATE,
    ROOT,
    FfInput,
    FfOutput,
    Started,
    Totals,
    analyze_ffmpeg,
    analyze_stream,
    chunk_arrivals,
    cpu_seconds,
    decimate,
    ffmpeg_cpu_pct_per_call,
    ffmpeg_missing,
    idle_gateway_rss,
    peak_rss_mib,
    rss_mib,
    run_ffmpeg,
    stop_process,
)
from bench_routes import call_id, load_source, load_speech  # noqa: E402
from gateway.codecs import G711Decoder, G711Encoder, plan  # noqa: E402
from gateway.codecs.formats import PCM16_8K, PCM16_16K, PCMU_8K, AudioFrame, EncodedFrame  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.mediaclock import Waker  # noqa: E402
from gateway.quality import read_wav  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402
from gateway.server import serve_http, serve_media  # noqa: E402

AGENT_AUDIO = Path("/work/shared/audio/speech16k.wav")
AGENT_RATE = 16000
AGENT_FRAME = 320  # samples: 20 ms at 16 kHz
AGENT_RATIO = AGENT_RATE // RATE

CONNECT_TIMEOUT = 30.0  # seconds for every stream to deliver its first packet (plus PER_ROUTE)
CONNECT_PER_ROUTE = 0.2
SEND_MARGIN = 60.0  # seconds of source audio beyond warm-up + window
DIRECTIONS = ["call → agent (u-law 8 kHz → PCM16 16 kHz)", "agent → call (PCM16 16 kHz → u-law 8 kHz)"]


# ------------------------------------------------------------------------------ sources
def load_agent_unit() -> np.ndarray:
    """speech16k.wav forwards, backwards, inverted forwards, inverted backwards: 16 kHz int16."""
    pcm, rate = read_wav(AGENT_AUDIO)
    if rate != AGENT_RATE or pcm.shape[1] != 1:
        raise SystemExit(f"{AGENT_AUDIO}: expected 16 kHz mono")
    x = pcm[:, 0].astype(np.int32)
    x = x[: len(x) - len(x) % AGENT_FRAME]
    unit = np.concatenate([x, x[::-1], -x, -x[::-1]])
    return np.clip(unit, -32768, 32767).astype(np.int16)


def load_agent_source(seconds: float) -> np.ndarray:
    unit = load_agent_unit()
    return np.tile(unit, math.ceil(seconds * AGENT_RATE / len(unit)) + 1)


# ------------------------------------------------------------------------------- configs
def agent_key(i: int, salt: str) -> str:
    return f"bench-{salt}-{i}"


def peer_config(n: int, voipbin_token: str, salt: str) -> GatewayConfig:
    lines = [
        "server: {http: '127.0.0.1:0', media: '127.0.0.1:0'}",
        "services:",
        f"  voipbin: {{token: '{voipbin_token}'}}",
        "routes:",
    ]
    for i in range(n):
        lines += [
            f"  - name: peer-{i}",  # never run as a route: the bench drives both endpoints
            "    endpoints:",
            f"      - voipbin: {{role: listen, call_id: {call_id(i)}, encapsulation: rtp, codec: ulaw, "
            "jitter_buffer_ms: 0, concealment: false, idle_timeout_s: 0}",
            f"      - agent: {{role: listen, api_keys: ['{agent_key(i, salt)}']}}",
        ]
    return GatewayConfig.from_text("\n".join(lines) + "\n", "<bench peer>")


def services_yaml(media_port: int, voipbin_token: str) -> str:
    return f"services:\n  voipbin: {{api_url: 'http://127.0.0.1:{media_port}', token: '{voipbin_token}'}}\n"


def gateway_config(n: int, http_port: int, media_port: int, voipbin_token: str, salt: str, live: bool) -> str:
    lines = [services_yaml(media_port, voipbin_token).rstrip("\n"), *_common.server_yaml(), "routes:"]
    extra = ", bursty: false" if live else ""
    for i in range(n):
        lines += [
            f"  - name: bridge-{i}",
            "    restart: never",
            "    endpoints:",
            f"      - voipbin: {{call_id: {call_id(i)}, encapsulation: rtp}}",
            f"      - agent: {{api_url: 'http://127.0.0.1:{http_port}', api_key: '{agent_key(i, salt)}'{extra}}}",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the peer
@attrs.define
class Side:
    """One end of route i in the peer (the call or the agent): what it sent and received."""

    start: int
    """Sample of its looped source (at its own rate) where its frame 0 begins."""
    sends: list[float] = attrs.Factory(list)
    lags: list[float] = attrs.Factory(list)
    arrivals: list[float] = attrs.Factory(list)
    pcm: list[np.ndarray] = attrs.Factory(list)
    """Received frames (int16, at its own rate)."""
    ended: str = ""
    ended_at: float = math.inf
    """trio time at which its stream ended (the gateway stopping it after the window is normal)"""


@attrs.define
class Run:
    n: int
    seconds: float
    calls: list[Side]
    agents: list[Side]
    call_source: np.ndarray
    agent_source: np.ndarray
    window: tuple[float, float] = (0.0, 0.0)
    cpu_s: float = math.nan
    peer_cpu_s: float = math.nan
    rss_mib: float = math.nan
    rss_end_mib: float = math.nan
    up: int = 0
    connect_s: float = math.nan
    returncode: int | None = None
    log_lines: list[str] = attrs.Factory(list)


async def side_task(ep, log: Side, source: np.ndarray, frame: int, rate: int, first_tick: float,
                    on_connected=None) -> None:
    """Run one listen endpoint: log each frame it receives; once connected send frame k of
    `source` (from `log.start`) at its deadline."""
    connected = trio.Event()
    arrivals, pcm, now = log.arrivals, log.pcm, trio.current_time

    def emit(f) -> None:
        arrivals.append(now())
        pcm.append(np.array(f.pcm[:, 0]))

    async def pace() -> None:
        await connected.wait()
        t = trio.current_time()
        start = first_tick + math.ceil((t - first_tick) / PTIME) * PTIME
        frames = (len(source) - log.start) // frame
        sends, lags, stats = log.sends, log.lags, ep.stats
        try:
            waker = Waker()  # the gateway's timer heap: no cancel scope per frame (gateway.mediaclock)
            for k in range(frames):
                deadline = start + k * PTIME
                await waker.wait(deadline)
                a = log.start + k * frame
                f = AudioFrame(source[a : a + frame].reshape(frame, 1), rate, k * frame)
                before = stats.frames_out
                t = trio.current_time()
                await ep.send(f)
                if stats.frames_out == before:
                    log.ended = log.ended or "send dropped: stream gone"
                    log.ended_at = min(log.ended_at, trio.current_time())
                    return
                sends.append(t)
                lags.append(t - deadline)
        except Exception as err:  # the gateway went away; the run is ending
            log.ended = log.ended or f"send: {err!r}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pace)
        try:
            await ep.run(emit, task_status=Started(connected, on_connected))
            log.ended = log.ended or "ended"
        except Exception as err:
            log.ended = log.ended or str(err) or repr(err)
        log.ended_at = min(log.ended_at, trio.current_time())
        nursery.cancel_scope.cancel()


async def run_once(n: int, seconds: float, warmup: float, workdir: Path, live: bool) -> Run:
    voipbin_token, salt = secrets.token_urlsafe(16), secrets.token_hex(4)
    config = peer_config(n, voipbin_token, salt)
    runtime = Runtime(config)
    peer = Gateway(config, runtime)
    peer.build()  # registers the listen paths; the routes themselves are never run
    call_eps = [peer.routes[f"peer-{i}"].route.endpoints[0] for i in range(n)]
    agent_eps = [peer.routes[f"peer-{i}"].route.endpoints[1] for i in range(n)]
    connect_timeout = CONNECT_TIMEOUT + CONNECT_PER_ROUTE * n
    total = connect_timeout + warmup + seconds + SEND_MARGIN
    call_source, agent_source = load_source(total), load_agent_source(total)
    call_frames = len(load_speech()) // FRAME
    agent_frames = len(load_agent_unit()) // AGENT_FRAME
    run = Run(
        n, seconds,
        calls=[Side(start=(i * 97 % call_frames) * FRAME) for i in range(n)],
        agents=[Side(start=(i * 89 % agent_frames) * AGENT_FRAME) for i in range(n)],
        call_source=call_source, agent_source=agent_source,
    )
    log_path = workdir / f"gateway-two-way-{n}.log"
    async with trio.open_nursery() as nursery:
        http_port = await nursery.start(serve_http, runtime.http, "127.0.0.1", 0)
        media_port = await nursery.start(serve_media, runtime.media, "127.0.0.1", 0)
        tick0 = trio.current_time()
        for i in range(n):
            phase = tick0 + i * PTIME / n
            nursery.start_soon(side_task, call_eps[i], run.calls[i], call_source, FRAME, RATE, phase)
            # the agent answers half a period out of phase with its call (independent services)
            nursery.start_soon(side_task, agent_eps[i], run.agents[i], agent_source, AGENT_FRAME, AGENT_RATE,
                               phase + PTIME / 2, agent_eps[i].on_route_up)
        config_path = workdir / f"gateway-two-way-{n}.yaml"
        config_path.write_text(gateway_config(n, http_port, media_port, voipbin_token, salt, live))
        with open(log_path, "wb") as log_file:
            started = trio.current_time()
            proc = await trio.lowlevel.open_process(
                _common.gateway_command(config_path),
                cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            streams = run.calls + run.agents
            with trio.move_on_after(connect_timeout):
                while proc.poll() is None and not all(s.arrivals for s in streams):
                    await trio.sleep(0.05)
            firsts = [s.arrivals[0] for s in streams if s.arrivals]
            run.up = sum(bool(c.arrivals and a.arrivals) for c, a in zip(run.calls, run.agents))
            if firsts and proc.poll() is None:
                run.connect_s = max(firsts) - started
                t0 = max(max(firsts) + warmup, trio.current_time())  # never before the wait for the routes ended
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
            run.returncode = await stop_process(proc)
            nursery.cancel_scope.cancel()
    run.log_lines = log_path.read_text(errors="replace").splitlines()
    return run


# -------------------------------------------------------------------------- the analysis
def agent_reference(agent_source: np.ndarray) -> np.ndarray:
    """The agent's source at 8 kHz (zero-phase decimation), the reference of agent → call."""
    return decimate(agent_source, AGENT_RATIO)


def chain_delays_ms() -> list[float]:
    """Declared algorithmic delay of each direction's planned chain (resamplers; G.711 has none)."""
    return [plan(PCM16_8K, PCM16_16K).delay_ms, plan(PCM16_16K, PCM16_8K).delay_ms]


@attrs.define
class Result:
    run: Run
    directions: list[Totals]
    warnings: list[str]

    @property
    def cpu_pct(self) -> float:
        return self.run.cpu_s / self.run.seconds * 100


def analyze(run: Run, ref8: np.ndarray) -> Result:
    to_agent, to_call = [], []
    for call, agent in zip(run.calls, run.agents):
        def decode_agent(agent=agent) -> np.ndarray:
            return decimate(np.concatenate(agent.pcm).astype(np.float64), AGENT_RATIO) if agent.pcm else np.zeros(0)

        def decode_call(call=call) -> np.ndarray:
            return np.concatenate(call.pcm).astype(np.float64) if call.pcm else np.zeros(0)

        arrivals = chunk_arrivals(agent.arrivals, [len(p) for p in agent.pcm], AGENT_RATIO)
        to_agent.append(analyze_stream(call.sends, call.lags, arrivals, decode_agent,
                                       run.call_source[call.start :], run.window))
        arrivals = chunk_arrivals(call.arrivals, [len(p) for p in call.pcm], 1)
        to_call.append(analyze_stream(agent.sends, agent.lags, arrivals, decode_call,
                                      ref8[agent.start // AGENT_RATIO :], run.window))
    warnings = [line for line in run.log_lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    return Result(run, [Totals.of(to_agent), Totals.of(to_call)], warnings)


# ------------------------------------------------------------------------------- output
def _f(v: float, spec: str = ".1f") -> str:
    return "-" if math.isnan(v) else format(v, spec)


HEADER = (
    f"{'routes':>6} {'up':>4} {'CPU ms/':>8} {'CPU %':>6} {'peak RSS':>8} {'RSS/call':>8}"
    + "".join(f" | {d.split(' (')[0]:^45}" for d in DIRECTIONS)
    + f" | {'peer':>5} {'peer lag':>8}\n"
    f"{'':>6} {'':>4} {'route-s':>8} {'1 core':>6} {'MiB':>8} {'MiB':>8}"
    + f" | {'sent/recv':>13} {'late':>5} {'lost':>9} {'p50':>5} {'p99':>5} {'max':>5}" * 2
    + f" | {'CPU %':>5} {'p99 ms':>8}"
)


def row(r: Result, idle: float) -> str:
    run = r.run
    text = (f"{run.n:>6} {run.up:>4} {run.cpu_s / (max(run.up, 1) * run.seconds) * 1000:>8.2f} {r.cpu_pct:>6.1f} "
            f"{run.rss_mib:>8.1f} {(run.rss_end_mib - idle) / run.n:>8.2f}")
    for t in r.directions:
        mx = float(t.latencies_ms.max()) if len(t.latencies_ms) else math.nan
        text += (f" | {f'{t.sent}/{t.received}':>13} {t.late:>5} {f'{t.lost}/{t.checked}':>9} "
                 f"{_f(t.percentile(50)):>5} {_f(t.percentile(99)):>5} {_f(mx):>5}")
    lags = [lag for t in r.directions for lag in t.lags]
    lag99 = float(np.percentile(lags, 99) * 1000) if lags else math.nan
    return text + f" | {run.peer_cpu_s / run.seconds * 100:>5.0f} {_f(lag99):>8}"


def details(r: Result) -> str:
    run = r.run
    lags = [lag for t in r.directions for lag in t.lags]
    parts = [f"N={run.n}: both directions up in {run.connect_s:.1f} s; peer sends up to "
             f"{_f(max(lags) * 1000 if lags else math.nan)} ms late"]
    for name, t in zip(("call → agent", "agent → call"), r.directions):
        bits = []
        if len(t.stream_p50_ms):
            bits.append(f"per-route median latency {t.stream_p50_ms.min():.1f}..{t.stream_p50_ms.max():.1f} ms")
        if t.slips or t.unaligned:
            bits.append(f"{t.slips} offset changes, {t.unaligned} unmatched blocks")
        if t.silent:
            bits.append(f"{t.silent} streams silent all window")
        if bits:
            parts.append(f"{name}: " + ", ".join(bits))
    if (note := _common.admission_note(run.n, run.up, *_common.admission_seen(run.log_lines))) is not None:
        parts.append(note)
    ended = [s.ended for s in run.calls + run.agents if s.ended_at < run.window[1]]
    if ended:
        parts.append(f"{len(ended)} peer streams ended before the end of the window (first: {ended[0][:120]})")
    parts.append(f"{len(r.warnings)} gateway log warnings/errors")
    return "; ".join(parts)


# ------------------------------------------------------------------------ --compare-ffmpeg
FFMPEG_TO_AGENT = ("-ac", "1", "-af", "aresample=16000", "-c:a", "pcm_s16be")
FFMPEG_TO_CALL = ("-ac", "1", "-af", "aresample=8000", "-c:a", "pcm_mulaw")


def ffmpeg_job(n: int, seconds: float, warmup: float) -> tuple[list[FfInput], list[FfOutput], int]:
    """One ffmpeg per call: inputs 0 (the call's u-law 8 kHz) and 1 (the agent's L16 16 kHz),
    outputs L16 16 kHz (from input 0, towards the agent) and u-law 8 kHz (from input 1)."""
    total = CONNECT_TIMEOUT + CONNECT_PER_ROUTE * n + warmup + seconds + SEND_MARGIN
    call_source, agent_source = load_source(total), load_agent_source(total)
    call_frames = len(load_speech()) // FRAME
    agent_frames = len(load_agent_unit()) // AGENT_FRAME
    call_starts = [(i * 97 % call_frames) * FRAME for i in range(n)]
    agent_starts = [(i * 89 % agent_frames) * FRAME for i in range(n)]  # in 8 kHz samples
    ulaw = G711Encoder().process(AudioFrame(call_source.reshape(-1, 1), RATE, 0))[0].payload
    inputs = [
        FfInput("0 PCMU/8000", ulaw, FRAME, 1, call_source, call_starts),
        FfInput("96 L16/16000/1", agent_source.astype(">i2").tobytes(), AGENT_FRAME, 2,
                agent_reference(agent_source), agent_starts),
    ]

    def decode_l16(payloads: list[bytes]) -> tuple[np.ndarray, list[int], float]:
        pcm = [np.frombuffer(p[: len(p) - len(p) % 2], dtype=">i2") for p in payloads]
        y = decimate(np.concatenate(pcm).astype(np.float64), AGENT_RATIO) if pcm else np.zeros(0)
        return y, [len(p) for p in pcm], float(AGENT_RATIO)

    def decode_ulaw(payloads: list[bytes]) -> tuple[np.ndarray, list[int], float]:
        decoder = G711Decoder()
        pcm = [decoder.process(EncodedFrame(p, PCMU_8K, len(p), 0))[0].pcm[:, 0] for p in payloads]
        y = np.concatenate(pcm).astype(np.float64) if pcm else np.zeros(0)
        return y, [len(p) for p in pcm], 1.0

    outputs = [FfOutput(0, FFMPEG_TO_AGENT, decode_l16, "L16"), FfOutput(1, FFMPEG_TO_CALL, decode_ulaw, "PCMU")]
    frames = min((len(call_source) - max(call_starts)) // FRAME,
                 (len(agent_source) - AGENT_RATIO * max(agent_starts)) // AGENT_FRAME)
    return inputs, outputs, frames


async def ffmpeg_once(n: int, seconds: float, warmup: float, workdir: Path) -> _common.FfRun:
    inputs, outputs, frames = ffmpeg_job(n, seconds, warmup)
    return await run_ffmpeg(n, seconds, warmup, workdir, inputs, outputs,
                            CONNECT_TIMEOUT + CONNECT_PER_ROUTE * n, frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default="1,10,50,100", help="comma-separated route counts (default 1,10,50,100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady-state window per count, s (default 10)")
    parser.add_argument("--warmup", type=float, default=_common.WARMUP_S,
                        help=f"s after the last stream is up before the window "
                             f"(default {_common.WARMUP_S:g}: the jitter buffer's convergence, _common.WARMUP_S)")
    parser.add_argument("--live-agent", action="store_true", help="agent dial with bursty: false (default: the endpoint's bursty: true)")
    parser.add_argument("--keep", metavar="DIR", help="keep the gateway configs and logs in DIR")
    parser.add_argument("--workers", default="auto", help="gateway run --workers (default auto: one per CPU; 1: one process)")
    _common.add_profile_option(parser)
    parser.add_argument("--compare-ffmpeg", action="store_true",
                        help="after the gateway at each N, N ffmpeg processes (one per call, two streams)")
    _common.add_admission_options(parser)
    args = parser.parse_args(argv)
    _common.WORKERS = args.workers
    _common.use_profile(args)
    _common.use_admission(args)
    counts = [int(c) for c in args.routes.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.seconds <= 0:
        parser.error("--routes needs positive counts and --seconds a positive duration")
    if not AGENT_AUDIO.exists():
        parser.error(f"{AGENT_AUDIO}: the agent's speech is missing")
    if args.compare_ffmpeg and (why := ffmpeg_missing(("pcm_s16be", "pcm_mulaw"))):
        parser.error(f"--compare-ffmpeg: {why}")

    logging.basicConfig(level=logging.ERROR, format="peer %(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    print(f"bench_two_way: N phone ↔ agent routes (VoIPBIN rtp u-law 8 kHz ↔ agent PCM16 16 kHz, agent dial "
          f"bursty: {'false' if args.live_agent else 'true'}), {args.seconds:g} s window after {args.warmup:g} s "
          f"warm-up; {os.cpu_count()} CPUs")
    print("late: packets > 20 ms behind their stream's 20 ms grid; lost: sent frames with speech that arrived as "
          "silence; latency: arrival - capture of the newest sent audio in the packet (bench_routes.py's method)")
    delays = chain_delays_ms()
    print(f"algorithmic delay of the chains (declared by the planned stages): call → agent {delays[0]:.2f} ms, "
          f"agent → call {delays[1]:.2f} ms")
    results: list[Result] = []
    sides: list[_common.Side] = []
    with tempfile.TemporaryDirectory(prefix="bench_two_way_") as tmp:
        workdir = Path(args.keep).resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        idle = trio.run(idle_gateway_rss, services_yaml(9, "idle"), workdir)
        print(f"idle gateway (same services, no routes): VmRSS {idle:.1f} MiB")
        print(_common.wake_line() + "\n")
        print(HEADER, flush=True)
        for n in counts:
            gc.collect()
            gc.freeze()
            run = trio.run(run_once, n, args.seconds, args.warmup, workdir, args.live_agent)
            if not run.up or run.window == (0.0, 0.0):
                print(f"{n:>6} {run.up:>4}  gateway did not come up (exit {run.returncode}); log tail:")
                print("\n".join("    " + line for line in run.log_lines[-15:]), flush=True)
                ended = [s.ended for s in run.calls + run.agents if s.ended]
                if ended:
                    print(f"    peer: {ended[0][:200]}")
                continue
            result = analyze(run, agent_reference(run.agent_source))
            results.append(result)
            print(row(result, idle), flush=True)
            sides.append(_common.Side("gateway", n, run.up, result.directions, result.cpu_pct / n,
                                      (run.rss_end_mib - idle) / n, codec_delay_ms=delays))
            if args.compare_ffmpeg:
                gc.collect()
                ff = trio.run(ffmpeg_once, n, args.seconds, args.warmup, workdir)
                totals = analyze_ffmpeg(ff) if ff.window != (0.0, 0.0) else [Totals(), Totals()]
                sides.append(_common.Side("ffmpeg", n, ff.up, totals, ffmpeg_cpu_pct_per_call(ff),
                                          ff.rss_mib / n, ff.pss_mib / n))
                print(_common.ffmpeg_line(ff), flush=True)
    print()
    for r in results:
        print(details(r))
        for line in r.warnings[:5]:
            print("    " + line[:200])
    _common.print_per_call(sides, DIRECTIONS)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
