"""Speech quality under network impairment: PESQ of a caller's speech reaching an Argon channel.

Run:  .venv/bin/python bench/bench_loss.py [--quick] [--repeats 3] [--jobs 1] [--keep DIR]

Needs the `pesq` package (ITU-T P.862, compiled with gcc), which is not a runtime dependency
of the gateway:  .venv/bin/pip install pesq

The path measured, every hop on loopback (bench/README.md, "bench_loss.py"):

    call (VoIPBIN stand-in, this process) ── ImpairProxy (bench/impair.py, this process)
        ── gateway (subprocess: route voipbin dial, rtp u-law 8 kHz → argon dial, Opus 48 kHz
           mono 20 ms) ── channel (Argon stand-in, this process)

- The **call** is the gateway's own VoIPBIN-compatible listen endpoint (`VoipbinListen`, rtp,
  u-law), driven by hand as in bench_routes.py: one RTP packet per 20 ms on absolute
  deadlines. It sends LEAD_FRAMES packets of digital silence (2 s; more, until the channel
  has heard the route's first packet), then the utterances (recorded speech at 8 kHz, real time), each
  followed by GAP_S of silence.
- The **proxy** sits between the gateway's voipbin dial and the call and impairs the direction
  towards the gateway (bench/impair.py: message = RTP packet; loss, Gilbert-Elliott bursts,
  jitter, adjacent swaps). The gateway's media towards the call passes unimpaired.
- The **channel** is the gateway's own Argon-compatible voice channel (`ArgonListen`): it
  answers StreamToken and takes the bot's Opus ingress. What "reaches the channel" is every
  Opus packet the bot published, decoded with libopus in arrival order (the channel's
  WebSocket is TCP: in order, nothing lost on the way), brought to 8 kHz by a zero-phase FFT
  decimation: what a participant's decoder would play.

For each utterance the recording is cross-correlated with the utterance as read from its file
(the reference), which gives where it starts in the recording; from the packet arrival times
that is a **delay**: from the call sending the utterance's first frame to the channel
receiving its first sample (the packet's arrival + the sample's place in the packet). PESQ
(P.862 narrowband, 8 kHz; `pesq.pesq(8000, ref, deg, "nb")`, the raw MOS-LQO mapping of
P.862.1) compares the reference with the same length of recording from there (PESQ does its
own fine alignment and follows delay changes within the utterance).

Conditions (the impairment, bench/impair.py `Impairment`): none; 5 % random loss; 15 % bursty
loss (Gilbert-Elliott, mean burst 3 packets); jitter ±30 ms (delay 30 ms + uniform ±30 ms per
packet, packets delivered in the order of their release times, so about a quarter arrive after
a later one); 1 % reordering (adjacent swaps). Every condition uses the same seeds in both
modes, so the two modes meet exactly the same lost, delayed and swapped packets.

Modes: **concealment** is the gateway's defaults for the voipbin endpoint; **silence fill**
sets `concealment: false` and `jitter_buffer_ms: 0` on it, each only where the endpoint
accepts the option (checked by building the config in this process before the runs; a
gateway without them has only silence fill, and both modes are the same there).

The gateway's counters come from its control API (`GET /v1/routes` on its `server.http`)
right before it is stopped: the voipbin endpoint's concealed / reordered / duplicates /
late_packets and the argon endpoint's late (slots the route filled with silence because audio
was late). Runs go one after another by default (`--jobs 1`); `--jobs N` runs N at once, each
with its own gateway process, when the machine keeps real time (the table prints the call's
and the proxy's own send lag so that can be checked).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import attrs
import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import Started as _Started, stop_process  # noqa: E402
from gateway.codecs import G711Decoder, G711Encoder, OpusDecoder, plan  # noqa: E402
from gateway.codecs.formats import OPUS_48K, PCM16_8K, PCMU_8K, AudioFrame, EncodedFrame  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.errors import ConfigError  # noqa: E402
from gateway.quality import read_wav  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402
from gateway.server import serve_http, serve_media  # noqa: E402
from impair import Impairment, ImpairProxy  # noqa: E402

ASSETS = ROOT / "gateway" / "assets"
UTTERANCES = (ASSETS / "or105.wav", ASSETS / "or109.wav")  # 8 kHz mono speech, 8.4 s and 8.0 s
RATE = 8000  # Hz, the call side and PESQ narrowband
FRAME = 160  # samples: 20 ms at 8 kHz
PTIME = 0.020  # seconds per RTP packet and per Opus packet
OUT_RATIO = 6  # 48 kHz channel audio / 8 kHz
CALL_ID = "00000000-0000-4000-8000-00000000b011"
SPACE_ID = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL_ID = "6ba7b810-9dad-41d1-80b4-00000000b011"
STREAM_TOKENS_PER_MINUTE = 1000  # services.argon.stream_token_per_minute on both sides
GATEWAY = [sys.executable, "-m", "gateway", "--log-level", "info", "run"]  # + the config path

LEAD_FRAMES = 100  # packets of silence (2 s) before the speech; more if the channel has not heard the route yet
GAP_S = 1.0  # s of silence after each utterance
SETTLE_S = 0.5  # s after the last frame before the counters are read
CONNECT_TIMEOUT = 20.0  # s for the channel to hear the route's first packet
STOP_TIMEOUT = 5.0  # s for the gateway to exit on SIGTERM before SIGKILL
SEARCH_BEFORE_S = 0.1  # the utterance is searched from this long before the send-time guess...
SEARCH_AFTER_S = 1.5  # ...to this long after it (delay + jitter buffer + a start-up backlog)


@attrs.frozen
class Condition:
    key: str
    label: str
    impairment: Impairment


CONDITIONS = (
    Condition("none", "0 %", Impairment()),
    Condition("random5", "5 % random", Impairment(loss_pct=5.0)),
    Condition("bursty15", "15 % bursty (burst 3)", Impairment(burst_loss_pct=15.0, mean_burst=3.0)),
    Condition("jitter30", "±30 ms jitter", Impairment(jitter_ms=30.0, jitter="uniform")),
    Condition("reorder1", "1 % reordering", Impairment(reorder_pct=1.0)),
    Condition("dup1", "1 % duplicates", Impairment(duplicate_pct=1.0)),  # not run by default
)
DEFAULT_CONDITIONS = ("none", "random5", "bursty15", "jitter30", "reorder1")
MODES = ("concealment", "silence fill")
SILENCE_FILL_OPTIONS = {"concealment": "false", "jitter_buffer_ms": "0"}  # voipbin endpoint, when accepted


# ------------------------------------------------------------------------------ the gateway
def gateway_config(proxy_port: int, http_port: int, voipbin_token: str, bot_token: str, voipbin_extra: str = "") -> str:
    return (
        "server: {http: '127.0.0.1:0'}\n"
        "services:\n"
        f"  voipbin: {{api_url: 'http://127.0.0.1:{proxy_port}', token: '{voipbin_token}'}}\n"
        f"  argon: {{api_url: 'http://127.0.0.1:{http_port}/api/bot', bot_token: '{bot_token}', "
        f"stream_token_per_minute: {STREAM_TOKENS_PER_MINUTE}}}\n"
        "routes:\n"
        "  - name: bridge\n"
        "    restart: never\n"
        "    endpoints:\n"
        f"      - voipbin: {{call_id: {CALL_ID}, encapsulation: rtp{voipbin_extra}}}\n"
        f"      - argon: {{space_id: {SPACE_ID}, channel_id: {CHANNEL_ID}, frame_duration_ms: 20}}\n"
    )


def accepted_options(src: Path, workdir: Path) -> dict[str, str]:
    """The silence-fill options the voipbin dial endpoint accepts in the gateway at `src`, each
    tried alone with `python -m gateway check` (exit 0: the config is valid)."""
    def builds(extra: str) -> bool:
        path = workdir / "probe.yaml"
        path.write_text(gateway_config(1, 2, "probe-token", "probe-bot", extra))
        done = subprocess.run([sys.executable, "-m", "gateway", "check", str(path)], cwd=str(src),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        return done.returncode == 0

    if not builds(""):
        raise SystemExit(f"bench_loss: the bench's gateway config does not pass `gateway check` in {src}")
    return {key: value for key, value in SILENCE_FILL_OPTIONS.items() if builds(f", {key}: {value}")}


def mode_options(mode: str, accepted: dict[str, str]) -> str:
    if mode == "concealment":
        return ""
    return "".join(f", {k}: {v}" for k, v in accepted.items())


# --------------------------------------------------------------------------------- the peer
def peer_config(voipbin_token: str, bot_token: str) -> GatewayConfig:
    """The stand-ins' config (never run as a route: the bench drives both endpoints). The
    channel must hand on the bot's Opus packets exactly as they arrived: where the argon listen
    endpoint has its own playout with PLC (`concealment`, default true), it is turned off."""
    def text(channel_extra: str) -> str:
        return (
            "server: {http: '127.0.0.1:0', media: '127.0.0.1:0'}\n"
            "services:\n"
            f"  voipbin: {{token: '{voipbin_token}'}}\n"
            f"  argon: {{bot_token: '{bot_token}', jwt_secret: '{secrets.token_urlsafe(32)}', "
            f"stream_token_per_minute: {STREAM_TOKENS_PER_MINUTE}}}\n"
            "routes:\n"
            "  - name: peer\n"
            "    endpoints:\n"
            f"      - voipbin: {{role: listen, call_id: {CALL_ID}, encapsulation: rtp, codec: ulaw, idle_timeout_s: 0}}\n"
            f"      - argon: {{role: listen, space_id: {SPACE_ID}, channel_id: {CHANNEL_ID}{channel_extra}}}\n"
        )

    probe = GatewayConfig.from_text(text(", concealment: false"), "<bench peer>")
    try:
        Gateway(probe, Runtime(probe)).build()
    except ConfigError:  # a checkout whose channel hands packets on as they are anyway
        return GatewayConfig.from_text(text(""), "<bench peer>")
    return probe


def load_utterance(path: Path) -> np.ndarray:
    pcm, rate = read_wav(path)
    if rate != RATE or pcm.shape[1] != 1:
        raise SystemExit(f"{path}: expected 8 kHz mono")
    return pcm[:, 0].astype(np.int16)


@attrs.define
class Program:
    """What the call says after its lead-in: the utterances, each followed by GAP_S of silence."""

    pcm: np.ndarray
    starts: list[int]
    """Frame index (in `pcm`, 20 ms frames) where each utterance starts."""
    utterances: list[np.ndarray]

    @classmethod
    def build(cls, utterances: list[np.ndarray]) -> Program:
        parts, starts, at = [], [], 0
        gap = np.zeros(int(GAP_S * RATE), dtype=np.int16)
        for u in utterances:
            u = np.concatenate([u, np.zeros(-len(u) % FRAME, dtype=np.int16)])  # whole frames
            starts.append(at // FRAME)
            parts += [u, gap]
            at += len(u) + len(gap)
        return cls(np.concatenate(parts), starts, utterances)

    @property
    def frames(self) -> int:
        return len(self.pcm) // FRAME


@attrs.define
class RunLog:
    """One run (condition x mode x repeat): what was sent and heard, and the counters."""

    condition: Condition
    mode: str
    repeat: int
    options: str
    sends: list[float] = attrs.Factory(list)
    """Trio time at which program frame k went out."""
    lags: list[float] = attrs.Factory(list)
    """How late each call frame (lead-in included) left against its deadline, s."""
    arrivals: list[float] = attrs.Factory(list)
    """Trio time at which channel packet k arrived."""
    packets: list[bytes] = attrs.Factory(list)
    routes: dict = attrs.Factory(dict)
    """GET /v1/routes of the gateway at the end (empty when it could not be read)."""
    proxy: dict = attrs.Factory(dict)
    proxy_lags: list[float] = attrs.Factory(list)
    lead_frames: int = 0
    """Packets of silence the call sent before the program (LEAD_FRAMES unless the route was slow)."""
    error: str = ""
    returncode: int | None = None
    log_lines: list[str] = attrs.Factory(list)
    wall_s: float = 0.0


async def call_task(ep, log: RunLog, program: Program, heard: trio.Event, done: trio.Event) -> None:
    """Accept the gateway's media stream; send LEAD_FRAMES of silence (more, until the channel
    has `heard` the route), then the program; `done` once it was sent."""
    connected = trio.Event()
    silence = AudioFrame(np.zeros((FRAME, 1), dtype=np.int16), RATE, 0)

    async def pace() -> None:
        await connected.wait()
        start = trio.current_time()
        k = 0
        try:
            # Lead-in: silence, while the route and the channel come up. A fixed number of
            # packets, so that program frame p is message LEAD_FRAMES + p of the stream in
            # every run: the same seed then drops the same speech in both modes.
            while k < LEAD_FRAMES or not heard.is_set():
                deadline = start + k * PTIME
                await trio.sleep_until(deadline)
                log.lags.append(trio.current_time() - deadline)
                await ep.send(silence)
                k += 1
            log.lead_frames = k
            for p in range(program.frames):
                deadline = start + (k + p) * PTIME
                await trio.sleep_until(deadline)
                now = trio.current_time()
                log.lags.append(now - deadline)
                log.sends.append(now)
                await ep.send(AudioFrame(program.pcm[p * FRAME : (p + 1) * FRAME].reshape(FRAME, 1), RATE, 0))
        except Exception as err:  # the gateway went away: the run is over
            log.error = log.error or f"call send: {err!r}"
        done.set()
        await trio.sleep_forever()  # keep the stream open until the gateway is stopped

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pace)
        try:
            await ep.run(lambda frame: None, task_status=_Started(connected))
        except Exception as err:
            if not done.is_set():
                log.error = log.error or f"call: {err}"
        done.set()
        nursery.cancel_scope.cancel()


async def channel_task(ep, log: RunLog, first: trio.Event, done: trio.Event) -> None:
    arrivals, packets, now = log.arrivals, log.packets, trio.current_time

    def emit(frame) -> None:
        if not isinstance(frame, EncodedFrame):  # the channel must not decode (peer_config)
            raise RuntimeError(f"the channel stand-in emitted {type(frame).__name__}, not the bot's Opus packets")
        arrivals.append(now())
        packets.append(frame.payload)
        first.set()

    try:
        await ep.run(emit)
    except Exception as err:
        if not done.is_set():  # the bot leaving once the program was sent is the run's end
            log.error = log.error or f"channel: {err}"


async def read_routes(port: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.get(f"http://127.0.0.1:{port}/v1/routes")
        response.raise_for_status()
        return response.json()


async def wait_for_port(log_path: Path, proc, timeout: float) -> int | None:
    """The gateway's server.http port, from its log line "REST listening on HOST:PORT"."""
    pattern = re.compile(r"REST listening on [^ ]+:(\d+)")
    with trio.move_on_after(timeout):
        while proc.poll() is None:
            match = pattern.search(log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            await trio.sleep(0.05)
    return None


async def run_once(log: RunLog, program: Program, workdir: Path, src: Path) -> None:
    began = time.monotonic()
    voipbin_token, bot_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    config = peer_config(voipbin_token, bot_token)
    runtime = Runtime(config)
    peer = Gateway(config, runtime)
    peer.build()  # registers the listen paths; the route itself is never run
    call_ep, channel_ep = peer.routes["peer"].route.endpoints
    impairment = attrs.evolve(log.condition.impairment, seed=log.repeat)
    tag = f"{log.condition.key}-{log.mode.replace(' ', '_')}-{log.repeat}"
    log_path = workdir / f"gateway-{tag}.log"
    first, done = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        http_port = await nursery.start(serve_http, runtime.http, "127.0.0.1", 0)
        media_port = await nursery.start(serve_media, runtime.media, "127.0.0.1", 0)
        proxy = ImpairProxy(f"ws://127.0.0.1:{media_port}", impairment)
        proxy_port = await nursery.start(proxy.serve)
        nursery.start_soon(call_task, call_ep, log, program, first, done)
        nursery.start_soon(channel_task, channel_ep, log, first, done)
        config_path = workdir / f"gateway-{tag}.yaml"
        config_path.write_text(gateway_config(proxy_port, http_port, voipbin_token, bot_token, log.options))
        with open(log_path, "wb") as log_file:
            proc = await trio.lowlevel.open_process(
                [*GATEWAY, str(config_path)], cwd=str(src), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            rest_port = await wait_for_port(log_path, proc, CONNECT_TIMEOUT)
            with trio.move_on_after(CONNECT_TIMEOUT):
                await first.wait()
            if not first.is_set():
                log.error = log.error or "the channel heard nothing from the route"
            else:
                await done.wait()
                await trio.sleep(SETTLE_S)
                if rest_port is not None and proc.poll() is None:
                    try:
                        log.routes = await read_routes(rest_port)
                    except Exception as err:  # noqa: BLE001 - reported, the audio still counts
                        log.error = log.error or f"GET /v1/routes: {err!r}"
        finally:
            log.returncode = await stop_process(proc, STOP_TIMEOUT)
            nursery.cancel_scope.cancel()
    links = [link for link in proxy.links if link.path.endswith("/media_stream")]
    if links:
        link = links[0]
        log.proxy = {**link.schedule.as_dict(), "out_of_order": link.queue.out_of_order,
                     "to_gateway": link.to_client, "connections": len(links)}
        log.proxy_lags = link.lags
    log.log_lines = log_path.read_text(errors="replace").splitlines()
    log.wall_s = time.monotonic() - began


# ---------------------------------------------------------------------------- the analysis
def decimate(y48: np.ndarray) -> np.ndarray:
    """48 kHz → 8 kHz by truncating the spectrum: zero phase, so no delay of its own."""
    return _common.decimate(y48, OUT_RATIO)


def decode_channel(packets: list[bytes]) -> np.ndarray:
    """Every Opus packet in arrival order, decoded at 48 kHz mono, then at 8 kHz (float)."""
    decoder = OpusDecoder(1)
    pcm = [decoder.process(EncodedFrame(p, OPUS_48K, 960, 0))[0].pcm[:, 0] for p in packets]
    sizes = {len(p) for p in pcm}
    if sizes - {FRAME * OUT_RATIO}:
        raise RuntimeError(f"channel packets of {sorted(sizes)} samples; expected 20 ms")
    return decimate(np.concatenate(pcm)) if pcm else np.zeros(0)


def locate(y: np.ndarray, x: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """The start L in [lo, hi] maximizing the normalized correlation of y[L : L + len(x)]
    with x; returns (L, correlation)."""
    lo, hi = max(0, lo), max(0, min(hi, len(y) - 1))
    seg = y[lo : hi + len(x)]
    if len(seg) < len(x) // 2 or hi < lo:
        return lo, 0.0
    seg = np.concatenate([seg, np.zeros(max(0, hi - lo + len(x) - len(seg)))])
    nfft = 1 << (len(seg) + len(x)).bit_length()
    c = np.fft.irfft(np.fft.rfft(seg, nfft) * np.conj(np.fft.rfft(x, nfft)), nfft)[: hi - lo + 1]
    energy = np.concatenate(([0.0], np.cumsum(seg * seg)))
    window = energy[len(x) : len(x) + hi - lo + 1] - energy[: hi - lo + 1]
    rho = c / np.sqrt(np.maximum(window, 1e-9) * max(float(x @ x), 1e-9))
    t = int(np.argmax(rho))
    return lo + t, float(rho[t])


def pesq_nb(ref: np.ndarray, deg: np.ndarray) -> float:
    from pesq import PesqError, pesq

    try:
        return float(pesq(RATE, ref.astype(np.float32), deg.astype(np.float32), "nb"))
    except PesqError:
        return math.nan


@attrs.define
class Scored:
    log: RunLog
    pesq: list[float]
    delay_ms: list[float]
    rho: list[float]
    counters: dict


def endpoint_counters(routes: dict) -> dict:
    out: dict = {}
    for route in routes.get("routes", []):
        for ep in route.get("endpoints", []):
            if ep.get("kind") == "voipbin":
                for key in ("frames_in", "concealed", "reordered", "duplicates", "late_packets",
                            "jitter_ms", "jitter_depth_ms"):
                    out[key] = ep.get(key)
            elif ep.get("kind") == "argon":
                out["late_slots"] = ep.get("late")
                out["argon_dropped"] = ep.get("dropped")
                out["skipped"] = ep.get("skipped")
    return out


def score(log: RunLog, program: Program) -> Scored:
    pesqs, delays, rhos = [], [], []
    y = decode_channel(log.packets)
    arrivals = np.asarray(log.arrivals)
    for u, start in zip(program.utterances, program.starts):
        x = u.astype(np.float64)
        if len(log.sends) <= start or not len(arrivals):
            pesqs.append(math.nan)
            delays.append(math.nan)
            rhos.append(0.0)
            continue
        sent = log.sends[start]
        j0 = int(np.searchsorted(arrivals, sent))
        guess = FRAME * j0
        at, rho = locate(y, x, guess - int(SEARCH_BEFORE_S * RATE), guess + int(SEARCH_AFTER_S * RATE))
        j, o = divmod(at, FRAME)
        delays.append((arrivals[min(j, len(arrivals) - 1)] + o / RATE - sent) * 1000)
        deg = y[at : at + len(x)]
        deg = np.concatenate([deg, np.zeros(len(x) - len(deg))])
        pesqs.append(pesq_nb(x, deg))
        rhos.append(rho)
    return Scored(log, pesqs, delays, rhos, endpoint_counters(log.routes))


def offline_chain_pesq(utterances: list[np.ndarray]) -> list[float]:
    """PESQ of the codec chain alone, no network: u-law encode/decode → 48 kHz (the route's
    plan) → Opus 20 ms (argon dial's complexity 5) → libopus decode → 8 kHz."""
    out = []
    for u in utterances:
        enc, dec = G711Encoder(), G711Decoder()
        up = plan(PCM16_8K, OPUS_48K.as_pcm())
        opus = plan(OPUS_48K.as_pcm(), OPUS_48K, opus_complexity=5)
        decoder = OpusDecoder(1)
        pcm48 = []
        x = np.concatenate([u, np.zeros(-len(u) % FRAME + 2 * FRAME, dtype=np.int16)])
        for k in range(len(x) // FRAME):
            frame = AudioFrame(x[k * FRAME : (k + 1) * FRAME].reshape(FRAME, 1), RATE, k * FRAME)
            coded = enc.process(frame)[0]
            pcm = dec.process(EncodedFrame(coded.payload, PCMU_8K, FRAME, k * FRAME))[0]
            for f48 in up.process(pcm):
                pcm48 += [decoder.process(p)[0].pcm[:, 0] for p in opus.process(f48)]
        y = decimate(np.concatenate(pcm48))
        at, _ = locate(y, u.astype(np.float64), 0, FRAME)
        out.append(pesq_nb(u.astype(np.float64), y[at : at + len(u)]))
    return out


# ------------------------------------------------------------------------------ the output
def fmt(v: float, spec: str = ".2f") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summarize(results: list[Scored]) -> list[str]:
    header = (f"{'condition':<22} {'mode':<12} {'PESQ':>5} {'min':>5} {'max':>5} {'n':>2} {'delay':>6} "
              f"{'lost':>5} {'swap':>4} {'ooo':>4} {'conc':>5} {'reord':>5} {'dup':>4} {'late':>4} {'slots':>5} "
              f"{'jb ms':>5} {'lag':>5}")
    unit = (f"{'':<22} {'':<12} {'mean':>5} {'':>5} {'':>5} {'':>2} {'ms':>6} "
            f"{'proxy':>5} {'':>4} {'':>4} {'gw':>5} {'':>5} {'':>4} {'in':>4} {'late':>5} {'':>5} {'ms':>5}")
    lines = [header, unit]
    for cond in CONDITIONS:
        for mode in MODES:
            group = [r for r in results if r.log.condition.key == cond.key and r.log.mode == mode]
            if not group:
                continue
            scores = [p for r in group for p in r.pesq if not math.isnan(p)]
            delays = [d for r in group for d in r.delay_ms if not math.isnan(d)]

            def total(key: str, source: str = "counters") -> str:
                values = [(r.counters if source == "counters" else r.log.proxy).get(key) for r in group]
                values = [v for v in values if isinstance(v, (int, float))]
                return str(int(sum(values))) if values else "-"

            lag = max((float(np.percentile(r.log.lags, 99)) * 1000 for r in group if r.log.lags), default=math.nan)
            depth = [r.counters.get("jitter_depth_ms") for r in group]
            depth = [d for d in depth if isinstance(d, (int, float))]
            lines.append(
                f"{cond.label:<22} {mode:<12} {fmt(np.mean(scores) if scores else math.nan):>5} "
                f"{fmt(min(scores) if scores else math.nan):>5} {fmt(max(scores) if scores else math.nan):>5} "
                f"{len(scores):>2} {fmt(np.median(delays) if delays else math.nan, '.1f'):>6} "
                f"{total('dropped', 'proxy'):>5} {total('swapped', 'proxy'):>4} {total('out_of_order', 'proxy'):>4} "
                f"{total('concealed'):>5} {total('reordered'):>5} {total('duplicates'):>4} "
                f"{total('late_packets'):>4} {total('late_slots'):>5} "
                f"{(str(int(max(depth))) if depth else '-'):>5} {fmt(lag, '.1f'):>5}"
            )
    return lines


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per condition and mode (a few minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="seeds per condition and mode (default 3; --quick: 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each with its own gateway (default 1)")
    parser.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS),
                        help=f"comma-separated, of {', '.join(c.key for c in CONDITIONS)} "
                             f"(default {','.join(DEFAULT_CONDITIONS)})")
    parser.add_argument("--modes", default="both", choices=("both", "concealment", "silence"))
    parser.add_argument("--gateway-src", metavar="DIR", default=str(ROOT),
                        help="run the gateway from this source tree (a directory holding gateway/, e.g. a "
                             "snapshot from `git archive HEAD gateway | tar -x -C DIR`); default: this checkout")
    parser.add_argument("--keep", metavar="DIR", help="keep gateway configs, logs and per-run JSON in DIR")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    keys = [k.strip() for k in args.conditions.split(",") if k.strip()]
    unknown = set(keys) - {c.key for c in CONDITIONS}
    if unknown or repeats < 1 or args.jobs < 1:
        parser.error(f"unknown conditions {sorted(unknown)}" if unknown else "--repeats and --jobs must be >= 1")
    modes = list(MODES) if args.modes == "both" else ["concealment" if args.modes == "concealment" else "silence fill"]
    try:
        import pesq  # noqa: F401
    except ImportError:
        raise SystemExit("bench_loss needs the pesq package (ITU-T P.862): .venv/bin/pip install pesq") from None

    logging.basicConfig(level=logging.ERROR, format="peer %(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    src = Path(args.gateway_src).resolve()
    if not (src / "gateway" / "__main__.py").exists():
        parser.error(f"--gateway-src {src}: no gateway/ package there")
    tmp = tempfile.TemporaryDirectory(prefix="bench_loss_")
    workdir = Path(args.keep).resolve() if args.keep else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    accepted = accepted_options(src, workdir)
    codecs = src / "gateway" / "codecs"
    print(f"bench_loss: PESQ (P.862 nb) of the caller's speech reaching the Argon channel; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} x {cpu_model()}, "
          f"Python {platform.python_version()}")
    print(f"gateway from {src}: jitter.py {'present' if (codecs / 'jitter.py').exists() else 'absent'}, "
          f"plc.py {'present' if (codecs / 'plc.py').exists() else 'absent'}; voipbin endpoint accepts "
          f"{', '.join(f'{k}' for k in accepted) or 'neither concealment nor jitter_buffer_ms'}")
    print("modes: concealment = the endpoint's defaults; silence fill = "
          + (", ".join(f"{k}: {v}" for k, v in accepted.items()) or "the same config (no such options here)"))
    utterances = [load_utterance(p) for p in UTTERANCES]
    program = Program.build(utterances)
    chain = offline_chain_pesq(utterances)
    print(f"utterances: {', '.join(f'{p.name} ({len(u) / RATE:.1f} s)' for p, u in zip(UTTERANCES, utterances))}; "
          f"PESQ of the codec chain alone (offline, no network): {', '.join(fmt(c) for c in chain)}")
    conditions = [c for c in CONDITIONS if c.key in keys]
    logs = [RunLog(c, m, r, mode_options(m, accepted)) for r in range(repeats) for c in conditions for m in modes]
    print(f"{len(logs)} runs of {(LEAD_FRAMES + program.frames) * PTIME:.0f} s of call each, {args.jobs} at a time", flush=True)

    results: list[Scored] = []
    with tmp:

        async def run_all() -> None:
            limiter = trio.CapacityLimiter(args.jobs)

            async def one(log: RunLog) -> None:
                async with limiter:
                    await run_once(log, program, workdir, src)
                scored = score(log, program)
                results.append(scored)
                lag99 = np.percentile(log.lags, 99) * 1000 if log.lags else math.nan
                plag99 = np.percentile(log.proxy_lags, 99) * 1000 if log.proxy_lags else math.nan
                if log.lead_frames != LEAD_FRAMES:
                    log.error = log.error or f"lead-in stretched to {log.lead_frames} packets: the loss pattern moved"
                print(f"  {log.condition.label:<22} {log.mode:<12} seed {log.repeat}: PESQ "
                      f"{' '.join(fmt(p) for p in scored.pesq)}, delay {' '.join(fmt(d, '.1f') for d in scored.delay_ms)} ms, "
                      f"match {' '.join(fmt(r) for r in scored.rho)}; call lag p99 {fmt(lag99, '.1f')} ms, "
                      f"proxy lag p99 {fmt(plag99, '.1f')} ms; {log.wall_s:.0f} s"
                      + (f"; {log.error}" if log.error else ""), flush=True)
                if args.keep:
                    (workdir / f"run-{log.condition.key}-{log.mode.replace(' ', '_')}-{log.repeat}.json").write_text(
                        json.dumps({"pesq": scored.pesq, "delay_ms": scored.delay_ms, "proxy": log.proxy,
                                    "routes": log.routes, "error": log.error}, indent=1))

            async with trio.open_nursery() as nursery:
                for log in logs:
                    nursery.start_soon(one, log)
                    await trio.sleep(0.01)  # start in order

        gc.collect()
        gc.freeze()
        trio.run(run_all)
        for r in results:
            warnings = [line for line in r.log.log_lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
            if warnings:
                print(f"  gateway warnings ({r.log.condition.key}/{r.log.mode}/{r.log.repeat}): {len(warnings)}; first: "
                      f"{warnings[0][:160]}")
    print()
    for line in summarize(results):
        print(line)
    print(f"\nPESQ: P.862 narrowband MOS-LQO, mean over {len(utterances)} utterances x {repeats} seeds; delay: median ms "
          "from the call sending an utterance's first frame to the channel receiving it; lost/swap/ooo: packets the "
          "proxy dropped, swapped, and delivered after a later one; conc/reord/dup/late in: the gateway's voipbin "
          "endpoint (concealed, reordered, duplicates, late_packets); slots late: argon endpoint slots filled with "
          "silence for late audio; jb ms: jitter-buffer depth at the end (max over runs); lag: the call's p99 send "
          "lag, ms (max over runs; more than a few ms: the machine stalled the run)")
    print(f"total {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
