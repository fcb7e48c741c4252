"""What the route benchmarks share (bench_routes.py, bench_two_way.py, bench_loss.py).

- process measurements from /proc (CPU seconds, RSS, PSS) and stopping a subprocess;
- the RSS of an idle gateway (a `python -m gateway run` with the same services and no routes);
- the per-stream analysis of bench_routes.py (late, lost, latency by cross-correlation, see
  its docstring), for any stream brought to 8 kHz in 20 ms chunks;
- `--compare-ffmpeg`: N `ffmpeg` processes doing a route's transcoding per call in real time,
  fed RTP over UDP on absolute 20 ms deadlines and read back as RTP over UDP, measured and
  analysed the same way as the gateway (bench/README.md, "--compare-ffmpeg").
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import trio

WARMUP_S = 8.0
"""Default seconds between the last stream's first packet and the window: the VoIPBIN jitter
buffer starts at START_DEPTH_MS (40 ms, room for one swapped pair) and falls to its target
(about 8 ms on loopback) at SHRINK_MS_PER_S (5 ms/s), which takes about 6.5 s. A window that
starts earlier measures that convergence, not the steady state: `--routes 1 --warmup 1` gave
p99 56.5 ms with 63 packets late on the grid, `--warmup 8` p99 25.7 ms and none late."""

ROOT = Path(__file__).resolve().parent.parent
RATE = 8000  # Hz: every stream is analysed at 8 kHz
FRAME = 160  # samples: 20 ms at 8 kHz
PTIME = 0.020  # seconds per frame and per packet
GATEWAY = [sys.executable, "-m", "gateway", "--log-level", "info", "run"]  # + the config path
WORKERS = "auto"
"""`gateway run --workers` of the benchmarks (their `--workers` option sets it)."""


PROFILE_DIR: Path | None = None
"""`--cprofile DIR` of the benchmarks: the gateway runs under cProfile, one `<config>.prof` per
gateway started (read with `pstats`; with `--workers 1`, as workers are processes of their own)."""


def add_profile_option(parser: argparse.ArgumentParser) -> None:
    """`--cprofile DIR` on a route benchmark's parser; `use_profile(args)` applies it."""
    parser.add_argument("--cprofile", metavar="DIR", type=Path,
                        help="run the gateway under cProfile, DIR/<config>.prof per gateway (use with --workers 1)")


def use_profile(args: argparse.Namespace) -> None:
    """Set `PROFILE_DIR` from `--cprofile` (creating the directory)."""
    global PROFILE_DIR
    if args.cprofile is not None:
        args.cprofile.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR = args.cprofile.resolve()


ADMISSION: dict[str, int] = {"admission_cpu_percent": 0, "admission_machine_cpu_percent": 0}
"""The gateway's `server:` admission budgets in the benchmarks' configs (0: the gateway's
default, none), from `--admission-cpu` / `--admission-machine-cpu` (`use_admission`)."""


def add_admission_options(parser: argparse.ArgumentParser) -> None:
    """`--admission-cpu` and `--admission-machine-cpu` on a route benchmark's parser."""
    parser.add_argument("--admission-cpu", type=int, default=0, metavar="PERCENT",
                        help="the gateway's server.admission_cpu_percent (default 0: none; the admission "
                             "demonstration past capacity, --routes 300, uses 60)")
    parser.add_argument("--admission-machine-cpu", type=int, default=0, metavar="PERCENT",
                        help="the gateway's server.admission_machine_cpu_percent (default 0: none): a budget "
                             "over all the machine's cores, the bench's peer included")


def use_admission(args: argparse.Namespace) -> None:
    """Set `ADMISSION` from the options `add_admission_options` added."""
    ADMISSION["admission_cpu_percent"] = args.admission_cpu
    ADMISSION["admission_machine_cpu_percent"] = args.admission_machine_cpu


def server_yaml() -> list[str]:
    """The config's `server:` line for the `ADMISSION` budgets that are set (none: [])."""
    set_ = {k: v for k, v in ADMISSION.items() if v}
    return ["server: {" + ", ".join(f"{k}: {v}" for k, v in set_.items()) + "}"] if set_ else []


_HELD = re.compile(r"\[([^\[\]]+)\] not starting yet:")


def admission_seen(log_lines: list[str]) -> tuple[int, int]:
    """(held, closed) from a gateway's log: the dial routes its admission held back at least
    once ("not starting yet", one per route name), and the times admission closed."""
    held = {m.group(1) for line in log_lines if (m := _HELD.search(line))}  # "...route[w0]: [bridge-3] not starting yet: ..."
    return len(held), sum("admission closed" in line for line in log_lines)


def admission_note(n: int, up: int, held: int, closed: int) -> str | None:
    """The benchmarks' details line for admission, or None when it never closed nor held."""
    if not (held or closed):
        return None
    return (f"admission closed {closed} time(s) and held {held} route start(s) back; "
            f"{n - up} routes never came up (held: dial routes wait for admission)")


def gateway_command(config: Path | str) -> list[str]:
    """`python -m gateway run CONFIG --workers WORKERS` (under cProfile with `PROFILE_DIR`)."""
    if PROFILE_DIR is None:
        return [*GATEWAY, str(config), "--workers", WORKERS]
    out = PROFILE_DIR / f"{Path(config).stem}.prof"
    return [GATEWAY[0], "-m", "cProfile", "-o", str(out), *GATEWAY[1:], str(config), "--workers", WORKERS]
STOP_TIMEOUT = 5.0  # seconds for a process to exit on SIGTERM before SIGKILL
IDLE_SETTLE_S = 2.0  # seconds an idle gateway runs before its RSS is read

LATE_AFTER = 0.020  # seconds behind the stream's 20 ms grid that make a packet late
BLOCK = 25  # packets per correlation block (0.5 s)
SEARCH = 4.0  # seconds of backlog searched by the correlation (< half the loop of the source)
MIN_RHO = 0.5  # normalized correlation below which a block has no usable peak (a pause)
SPEECH_RMS = 180.0  # int16 RMS (-45 dBFS): a sent frame with less is not checked for loss
LOST_RATIO = 0.1  # received RMS below this fraction of the sent one's (-20 dB): the audio is lost


# ------------------------------------------------------------------------------ processes
class Started:
    """A task_status stand-in: sets an event (and calls `then`) when the endpoint is connected."""

    def __init__(self, event: trio.Event, then: Callable[[], None] | None = None) -> None:
        self._event = event
        self._then = then

    def started(self, value: object = None) -> None:
        self._event.set()
        if self._then is not None:
            self._then()


def family(pid: int | str) -> list[int]:
    """`pid` and every process under it (a `gateway run --workers N` supervisor's workers),
    from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [int(pid)]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _cpu_one(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of a process (all its threads) and of every process under
    it now (a supervisor's workers), from /proc/PID/stat. "self": this process alone (the
    bench's peer; the gateway and ffmpeg it started are measured on their own)."""
    if pid == "self":
        return _cpu_one(os.getpid())
    return sum(_cpu_one(p) for p in family(pid))


def _kib(path: str, key: str) -> float:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return math.nan


def _summed(pid: int, path: str, key: str) -> float:
    values = [_kib(path.format(pid=p), key) for p in family(pid)]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / 1024 if values else math.nan


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the peak resident set, MiB, of the process and every process under it (summed)."""
    return _summed(pid, "/proc/{pid}/status", "VmHWM:")


def rss_mib(pid: int) -> float:
    """VmRSS: the resident set now, MiB, of the process and every process under it (shared
    library pages counted in full in each)."""
    return _summed(pid, "/proc/{pid}/status", "VmRSS:")


def pss_mib(pid: int) -> float:
    """Pss: the resident set with each shared page divided among the processes mapping it,
    MiB, of the process and every process under it."""
    return _summed(pid, "/proc/{pid}/smaps_rollup", "Pss:")


async def stop_process(proc: trio.Process, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, up to `timeout` s for the process to exit, then SIGKILL; its return code.
    Shielded: safe in a `finally` of a cancelled scope."""
    with trio.CancelScope(shield=True):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await proc.wait()
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
    return proc.returncode


WAKE_ROUNDS = 400  # round trips per wake_probe variant
WAKE_GAP_S = 0.002  # pause before each round trip of the idle variant: long enough for the CPU to go idle


def wake_probe(rounds: int = WAKE_ROUNDS) -> tuple[float, float]:
    """The host's cost of a wake-up, in µs of CPU per message: (idle, hot). A forked child
    echoes 64-byte messages on a socketpair with blocking recv and send; its CPU time per
    echo is read with getrusage (user + system). Idle: the parent pauses `WAKE_GAP_S` before
    each message, so the child's CPU goes idle between them and every message wakes it, as a
    call's 20 ms packets wake a lightly loaded gateway. Hot: back to back, the CPUs never
    idle. On the bench's 2-core KVM guest the idle figure read 27-51 µs (it moves with the
    host's phase) and the hot one 8-13 µs on 2026-12-07. The same echo in C costs only 3-7 µs
    more after a pause (bench/README.md, fifteenth measurement): the difference is the
    interpreter running cold, the cost a lightly loaded gateway pays per packet."""
    return _echo_cost(rounds, WAKE_GAP_S), _echo_cost(rounds, 0.0)


def _echo_cost(rounds: int, gap: float) -> float:
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo: its own CPU per message, sent back as the last message
        code = 0
        try:
            parent.close()
            before = resource.getrusage(resource.RUSAGE_SELF)
            echoed = 0
            while (data := child.recv(64)) != b"end":
                child.send(data)
                echoed += 1
            after = resource.getrusage(resource.RUSAGE_SELF)
            used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            child.send(struct.pack("<d", used / max(echoed, 1) * 1e6))
        except BaseException:  # noqa: BLE001 - a forked child never returns into the bench
            code = 1
        finally:
            os._exit(code)
    child.close()
    try:
        message = bytes(64)
        for _ in range(rounds):
            if gap:
                time.sleep(gap)
            parent.send(message)
            parent.recv(64)
        parent.send(b"end")
        reply = parent.recv(8)
        return struct.unpack("<d", reply)[0] if len(reply) == 8 else math.nan
    finally:
        parent.close()
        os.waitpid(pid, 0)


def wake_line() -> str:
    """`wake_probe`'s figures for the benchmarks' heading: the host's phase, beside the table."""
    idle, hot = wake_probe()
    return (f"host wake-up cost (bench/_common.py wake_probe): {idle:.1f} µs CPU per message after an idle "
            f"pause, {hot:.1f} µs back to back")


async def idle_gateway_rss(services_yaml: str, workdir: Path, settle: float = IDLE_SETTLE_S) -> float:
    """VmRSS (MiB) of `python -m gateway run` with the given `services:` block and no routes,
    `settle` s after it started: the base that "RSS per call beyond an idle gateway" subtracts.
    NaN if it did not stay up. (It has not imported the endpoint adapters, which a gateway
    with routes loads once: at small N that one-off part weighs on the per-call figure.)"""
    path = workdir / "gateway-idle.yaml"
    path.write_text(services_yaml + "routes: []\n")
    with open(workdir / "gateway-idle.log", "wb") as log_file:
        proc = await trio.lowlevel.open_process(gateway_command(path), cwd=str(ROOT), stdin=subprocess.DEVNULL,
                                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        await trio.sleep(settle)
        return rss_mib(proc.pid) if proc.poll() is None else math.nan
    finally:
        await stop_process(proc)


# ------------------------------------------------------------------------------- analysis
def decimate(y: np.ndarray, ratio: int) -> np.ndarray:
    """Rate / `ratio` by truncating the spectrum: zero phase, so no delay of its own."""
    n = len(y) - len(y) % ratio
    m = n // ratio
    spectrum = np.fft.rfft(y[:n].astype(np.float64))
    return np.fft.irfft(spectrum[: m // 2 + 1], m) / ratio


def best_offset(y: np.ndarray, p0: int, p1: int, x: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """The offset `off` (fractional samples) maximizing the correlation of y[p] with x[p - off]
    over p in [p0, p1), searched in [lo, hi]; returns (off, normalized correlation)."""
    seg = y[p0:p1]
    length = len(seg)
    a, b = p0 - hi, p1 - lo  # x[a:b] covers every offset
    xs = np.zeros(b - a)
    ia, ib = max(a, 0), min(b, len(x))
    if ib > ia:
        xs[ia - a : ib - a] = x[ia:ib]
    nfft = 1 << (len(xs) + length).bit_length()
    c = np.fft.irfft(np.fft.rfft(xs, nfft) * np.conj(np.fft.rfft(seg, nfft)), nfft)[: len(xs) - length + 1]
    energy = np.concatenate(([0.0], np.cumsum(xs * xs)))
    window = energy[length:] - energy[:-length]
    rho = c / np.sqrt(np.maximum(window, 1e-9) * max(float(seg @ seg), 1e-9))
    t = int(np.argmax(rho))
    if not 0 < t < len(c) - 1:
        return math.nan, 0.0  # a peak on the edge of the search is no match
    frac = 0.0
    denom = c[t - 1] - 2 * c[t] + c[t + 1]
    if denom < 0:
        frac = 0.5 * (c[t - 1] - c[t + 1]) / denom
    return hi - (t + frac), float(rho[t])


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a * a))) if len(a) else 0.0


def chunk_arrivals(arrivals: list[float], sizes: list[int] | np.ndarray, ratio: float = 1.0) -> np.ndarray:
    """Arrival time of each whole 20 ms chunk (FRAME samples at 8 kHz) of a stream received
    as packets of `sizes` samples at 8 kHz x `ratio`: the arrival of the packet holding the
    chunk's last sample. For 20 ms packets this is the packets' own arrivals."""
    ends = np.cumsum(np.asarray(sizes, dtype=np.float64)) / ratio  # 8 kHz samples received after each packet
    chunks = int(ends[-1] // FRAME) if len(ends) else 0
    index = np.searchsorted(ends, FRAME * (np.arange(chunks) + 1) - 0.5)
    return np.asarray(arrivals, dtype=np.float64)[index]


@attrs.define
class StreamStats:
    """One stream (sender → receiver) over the window."""

    sent: int = 0
    """frames the sender sent in the window"""
    received: int = 0
    """packets (20 ms chunks) that arrived in the window"""
    late: int = 0
    lost: int = 0
    checked: int = 0
    latencies_ms: np.ndarray = attrs.Factory(lambda: np.zeros(0))
    p50_ms: float = math.nan
    slips: int = 0
    unaligned: int = 0
    silent: bool = False
    lags: list[float] = attrs.Factory(list)
    """the sender's lags against its deadlines, in the window (s)"""


def analyze_stream(sends: list[float], lags: list[float], arrivals: list[float] | np.ndarray,
                   decode: Callable[[], np.ndarray], x: np.ndarray, window: tuple[float, float]) -> StreamStats:
    """The method of bench_routes.py for one stream: `sends[k]` is when sent frame k (FRAME
    samples of `x`, 8 kHz) went out, `arrivals[m]` when received chunk m arrived, and
    `decode()` the received audio at 8 kHz (chunk m is y[FRAME*m : FRAME*(m+1)])."""
    t0, t1 = window
    out = StreamStats()
    out.lags = [lag for t, lag in zip(sends, lags) if t0 <= t < t1]
    sends = np.asarray(sends)
    out.sent = int(np.count_nonzero((sends >= t0) & (sends < t1)))
    arrivals = np.asarray(arrivals)
    in_window = np.nonzero((arrivals >= t0) & (arrivals < t1))[0]
    out.received = len(in_window)
    if not len(in_window) or not len(sends):
        return out
    # late: behind the stream's own 20 ms grid by more than a ptime
    behind = arrivals - PTIME * np.arange(len(arrivals))
    phase = np.median(behind[in_window])
    out.late = int(np.count_nonzero(behind[in_window] - phase > LATE_AFTER))
    y = decode()
    x = x[: FRAME * len(sends)].astype(np.float64)
    # Per block of packets: the sent audio they carry. The newest frame sent before a packet
    # arrived bounds it (offset >= that, less a frame of slack); buffering makes it older:
    # the playout buffer, and when the receiver's side cannot keep up, the queues and socket
    # buffers before it; searched up to SEARCH.
    route_lat: list[np.ndarray] = []
    previous: float | None = None
    first, last = int(in_window[0]), int(in_window[-1]) + 1
    for b0 in range(first, last, BLOCK):
        b1 = min(b0 + BLOCK, last)
        m = np.arange(b0, b1)
        newest = np.searchsorted(sends, arrivals[m]) - 1
        floor = int(np.median(FRAME * (m - newest))) - FRAME
        if rms(y[FRAME * b0 : FRAME * b1]) >= SPEECH_RMS / 3:
            block_off, block_rho = best_offset(y, FRAME * b0, FRAME * b1, x, floor, floor + int(SEARCH * RATE))
        else:  # the received audio is (near) silent: nothing to match
            block_off, block_rho = math.nan, 0.0
        if block_rho >= MIN_RHO:
            if previous is not None and abs(block_off - previous) > 1.0:
                out.slips += 1
            previous = block_off
        elif previous is None:
            out.unaligned += 1  # a pause before any aligned block: skipped
            continue
        o = previous
        m = m[(arrivals[m] >= t0) & (arrivals[m] < t1)]
        end = FRAME * (m + 1) - o  # sent sample just past the newest one in packet m
        j = np.ceil(end / FRAME).astype(int) - 1  # the sent frame holding it
        ok = (j >= 0) & (j < len(sends))
        m, end, j = m[ok], end[ok], j[ok]
        route_lat.append((arrivals[m] - sends[j] + (FRAME * (j + 1) - end) / RATE) * 1000)
        # lost: the sent frames mapped into this block, checked in their middle 10 ms
        oi = int(round(o))
        for jf in range((FRAME * b0 - oi) // FRAME + 1, (FRAME * b1 - oi) // FRAME - 1):
            if jf < 0 or FRAME * jf + FRAME > len(x):
                continue
            level = rms(x[FRAME * jf + 40 : FRAME * jf + 120])
            if level < SPEECH_RMS:
                continue
            out.checked += 1
            if rms(y[FRAME * jf + oi + 40 : FRAME * jf + oi + 120]) < LOST_RATIO * level:
                out.lost += 1
    if previous is None and rms(y[FRAME * first : FRAME * last]) < SPEECH_RMS / 3:
        # The received audio stayed silent all window: every sent frame with speech sent in
        # the window was lost (typical of a gateway that cannot keep up).
        out.silent = True
        for jf in np.nonzero((sends >= t0) & (sends < t1))[0]:
            if rms(x[FRAME * jf + 40 : FRAME * jf + 120]) >= SPEECH_RMS:
                out.checked += 1
                out.lost += 1
    if route_lat:
        out.latencies_ms = np.concatenate(route_lat)
        if len(out.latencies_ms):
            out.p50_ms = float(np.median(out.latencies_ms))
    return out


@attrs.define
class Totals:
    """StreamStats summed over the streams of one direction."""

    streams: int = 0
    sent: int = 0
    received: int = 0
    late: int = 0
    lost: int = 0
    checked: int = 0
    latencies_ms: np.ndarray = attrs.Factory(lambda: np.zeros(0))
    stream_p50_ms: np.ndarray = attrs.Factory(lambda: np.zeros(0))
    slips: int = 0
    unaligned: int = 0
    silent: int = 0
    lags: list[float] = attrs.Factory(list)

    @classmethod
    def of(cls, stats: list[StreamStats]) -> Totals:
        return cls(
            streams=len(stats),
            sent=sum(s.sent for s in stats),
            received=sum(s.received for s in stats),
            late=sum(s.late for s in stats),
            lost=sum(s.lost for s in stats),
            checked=sum(s.checked for s in stats),
            latencies_ms=np.concatenate([s.latencies_ms for s in stats]) if stats else np.zeros(0),
            stream_p50_ms=np.array([s.p50_ms for s in stats if not math.isnan(s.p50_ms)]),
            slips=sum(s.slips for s in stats),
            unaligned=sum(s.unaligned for s in stats),
            silent=sum(s.silent for s in stats),
            lags=[lag for s in stats for lag in s.lags],
        )

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else math.nan

    @property
    def behind(self) -> int:
        """Packets sent in the window minus packets received in it (summed over the streams):
        about 0 for a path that keeps real time, growing with the window for one that cannot."""
        return self.sent - self.received


# ------------------------------------------------------------------------- --compare-ffmpeg
FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFMPEG_INPUT = ["-protocol_whitelist", "file,udp,rtp", "-fflags", "nobuffer", "-probesize", "32",
                "-analyzeduration", "0"]
RTP_HEADER = struct.Struct("!BBHII")


@attrs.frozen
class FfInput:
    """One RTP stream the bench sends to each ffmpeg (an SDP input)."""

    rtpmap: str
    """SDP: "<payload type> <encoding>/<rate>[/<channels>]", e.g. "0 PCMU/8000"."""
    payload: bytes
    """The whole source, encoded: call i sends payload[start_i * width :] in 20 ms packets."""
    samples: int
    """Samples per 20 ms packet at the stream's rate (RTP timestamp step)."""
    width: int
    """Bytes per sample in `payload`."""
    x: np.ndarray
    """The same source at 8 kHz (float or int16): the reference of the analysis."""
    starts: list[int]
    """Per call, the 8 kHz sample of `x` where its frame 0 begins (its own place in the source)."""

    @property
    def payload_type(self) -> int:
        return int(self.rtpmap.split()[0])


@attrs.frozen
class FfOutput:
    """One RTP stream each ffmpeg sends back (an output), fed from input `source`."""

    source: int
    args: tuple[str, ...]
    """Encoder arguments between `-map N:a` and `-f rtp URL`."""
    decode: Callable[[list[bytes]], tuple[np.ndarray, list[int], float]]
    """payloads → (audio at 8 kHz, samples per packet at the stream's rate, rate / 8000)."""
    label: str = ""


@attrs.define
class FfStreamLog:
    sends: list[float] = attrs.Factory(list)
    lags: list[float] = attrs.Factory(list)
    arrivals: list[float] = attrs.Factory(list)
    payloads: list[bytes] = attrs.Factory(list)


@attrs.define
class FfRun:
    n: int
    seconds: float
    inputs: list[FfInput]
    outputs: list[FfOutput]
    logs_in: list[list[FfStreamLog]]  # [call][input]: sends and lags
    logs_out: list[list[FfStreamLog]]  # [call][output]: arrivals and payloads
    window: tuple[float, float] = (0.0, 0.0)
    up: int = 0
    connect_s: float = math.nan
    cpu_s: float = math.nan
    bench_cpu_s: float = math.nan
    rss_mib: float = math.nan
    """sum of the processes' VmRSS at the end of the window"""
    pss_mib: float = math.nan
    """sum of their Pss (shared pages divided among them)"""
    exited: int = 0
    """processes that were gone before the end of the window"""
    errors: list[str] = attrs.Factory(list)


def ffmpeg_missing(encoders: tuple[str, ...] = ()) -> str | None:
    """Why ffmpeg cannot run the comparison here, or None."""
    if not shutil.which(FFMPEG):
        return "no ffmpeg on PATH (apt-get install -y ffmpeg)"
    if encoders:
        done = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True)
        missing = [e for e in encoders if not any(line.split()[1:2] == [e] for line in done.stdout.splitlines())]
        if missing:
            return f"ffmpeg has no {', '.join(missing)} encoder"
    return None


def free_port_pairs(count: int) -> list[int]:
    """`count` even UDP ports P on 127.0.0.1 with P and P + 1 free now (an RTP input binds both),
    below the kernel's ephemeral range, so that no socket bound to port 0 meanwhile takes one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = low - 2 if low > 12000 else 65534
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        p = rng.randrange(10000, top, 2)
        if p in ports:
            continue
        socks = []
        try:
            for q in (p, p + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", q))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        ports.append(p)
    return ports


def sdp(port: int, rtpmap: str) -> str:
    pt = rtpmap.split()[0]
    return (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=bench\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {pt}\r\na=rtpmap:{rtpmap}\r\n")


def rtp_payload(packet: bytes) -> bytes | None:
    """The payload of an RTP packet; None for RTCP (ffmpeg's sender reports share the port)."""
    if len(packet) < 12 or packet[0] >> 6 != 2 or 200 <= packet[1] <= 204:
        return None
    offset = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:  # header extension
        offset += 4 + 4 * int.from_bytes(packet[offset + 2 : offset + 4], "big")
    end = len(packet) - (packet[-1] if packet[0] & 0x20 else 0)
    return packet[offset:end]


async def _send_rtp(sock, port: int, inp: FfInput, start: int, log: FfStreamLog, first_tick: float,
                    frames: int, ssrc: int) -> None:
    """RTP packet k of this call's input at first_tick + k x 20 ms (absolute deadlines)."""
    from gateway.mediaclock import Waker  # the scripts put the repository on sys.path first

    ratio = inp.samples // FRAME  # stream samples per 8 kHz sample
    step = inp.samples * inp.width
    base = start * ratio * inp.width
    now = trio.current_time()
    t = first_tick + math.ceil(max(0.0, now - first_tick) / PTIME) * PTIME
    sends, lags, payload, pt = log.sends, log.lags, inp.payload, inp.payload_type
    waker = Waker()  # the gateway's timer heap: no cancel scope per frame (gateway.mediaclock)
    for k in range(frames):
        deadline = t + k * PTIME
        await waker.wait(deadline)
        a = base + k * step
        packet = RTP_HEADER.pack(0x80, pt, k & 0xFFFF, (k * inp.samples) & 0xFFFFFFFF, ssrc) + payload[a : a + step]
        sent = trio.current_time()
        try:
            await sock.sendto(packet, ("127.0.0.1", port))
        except OSError:  # ffmpeg not listening yet: the frame is lost (before the window)
            pass
        sends.append(sent)  # index k is frame k, sent or not
        lags.append(sent - deadline)


async def _receive_rtp(sock, log: FfStreamLog) -> None:
    arrivals, payloads, now = log.arrivals, log.payloads, trio.current_time
    while True:
        data = await sock.recv(65536)
        payload = rtp_payload(data)
        if payload is not None:
            arrivals.append(now())
            payloads.append(payload)


async def run_ffmpeg(n: int, seconds: float, warmup: float, workdir: Path, inputs: list[FfInput],
                     outputs: list[FfOutput], connect_timeout: float, frames: int) -> FfRun:
    """N ffmpeg processes, one per call: each takes `inputs` (RTP over UDP from this process,
    real time, the calls staggered over 20 ms as in the gateway runs) and sends `outputs` back
    (RTP over UDP to this process). The window starts `warmup` s after the last output stream
    delivered its first packet; CPU (all processes, all threads) and RSS/PSS (summed) over it."""
    run = FfRun(n, seconds, inputs, outputs,
                logs_in=[[FfStreamLog() for _ in inputs] for _ in range(n)],
                logs_out=[[FfStreamLog() for _ in outputs] for _ in range(n)])
    ports = free_port_pairs(n * len(inputs))
    procs: list[trio.Process] = []
    send_sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await send_sock.bind(("127.0.0.1", 0))
    recv_socks = []
    async with trio.open_nursery() as nursery:
        try:
            tick0 = trio.current_time() + 0.5
            for i in range(n):
                argv = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error"]
                for j, inp in enumerate(inputs):
                    path = workdir / f"ffmpeg-{n}-{i}-{j}.sdp"
                    path.write_text(sdp(ports[i * len(inputs) + j], inp.rtpmap))
                    argv += [*FFMPEG_INPUT, "-i", str(path)]
                for j, out in enumerate(outputs):
                    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    recv_socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                    await sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                    argv += ["-map", f"{out.source}:a", *out.args, "-f", "rtp", f"udp://127.0.0.1:{port}"]
                    nursery.start_soon(_receive_rtp, sock, run.logs_out[i][j])
                err = open(workdir / f"ffmpeg-{n}-{i}.log", "wb")
                procs.append(await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                                             stdout=subprocess.DEVNULL, stderr=err))
                err.close()
            for i in range(n):
                for j, inp in enumerate(inputs):
                    nursery.start_soon(_send_rtp, send_sock, ports[i * len(inputs) + j], inp, inp.starts[i],
                                       run.logs_in[i][j], tick0 + i * PTIME / n, frames, 0x1000 + i * 8 + j)
            started = trio.current_time()
            every = [log for call in run.logs_out for log in call]
            with trio.move_on_after(connect_timeout):
                while not all(log.arrivals for log in every):
                    await trio.sleep(0.05)
            firsts = [log.arrivals[0] for log in every if log.arrivals]
            run.up = sum(all(log.arrivals for log in call) for call in run.logs_out)
            if firsts:
                run.connect_s = max(firsts) - started
                t0 = max(max(firsts) + warmup, trio.current_time())  # never before the wait for the routes ended
                run.window = (t0, t0 + seconds)
                await trio.sleep_until(t0)
                alive = [p for p in procs if p.poll() is None]
                cpu0 = {p.pid: cpu_seconds(p.pid) for p in alive}
                bench0 = cpu_seconds("self")
                await trio.sleep_until(t0 + seconds)
                run.bench_cpu_s = cpu_seconds("self") - bench0
                cpu = rss = pss = 0.0
                for p in procs:
                    if p.poll() is None and p.pid in cpu0:
                        cpu += cpu_seconds(p.pid) - cpu0[p.pid]
                        rss += rss_mib(p.pid)
                        pss += pss_mib(p.pid)
                    else:
                        run.exited += 1
                run.cpu_s, run.rss_mib, run.pss_mib = cpu, rss, pss
        finally:
            for p in procs:  # SIGTERM to all first: they stop together
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                await stop_process(p)
            nursery.cancel_scope.cancel()  # the send and receive tasks, before their sockets close
    send_sock.close()
    for sock in recv_socks:
        sock.close()
    for i in range(n):
        lines = [line for line in (workdir / f"ffmpeg-{n}-{i}.log").read_text(errors="replace").splitlines()
                 if line.strip() and "Immediate exit requested" not in line and "received signal" not in line]
        if lines:  # the SIGTERM at the end is no error
            run.errors.append(f"ffmpeg {i}: {lines[0][:160]}")
    return run


def analyze_ffmpeg(run: FfRun) -> list[Totals]:
    """Per output (direction): the streams of all calls analysed like the gateway's."""
    totals = []
    for j, out in enumerate(run.outputs):
        inp = run.inputs[out.source]
        stats = []
        for i in range(run.n):
            sent, got = run.logs_in[i][out.source], run.logs_out[i][j]
            y, sizes, ratio = out.decode(got.payloads)
            arrivals = chunk_arrivals(got.arrivals, sizes, ratio)
            x = inp.x[inp.starts[i] :]
            stats.append(analyze_stream(sent.sends, sent.lags, arrivals, lambda y=y: y, x, run.window))
        totals.append(Totals.of(stats))
    return totals


def ffmpeg_cpu_pct_per_call(run: FfRun) -> float:
    return run.cpu_s / run.seconds * 100 / max(run.n, 1)


# ------------------------------------------------------------------ per-call comparison table
@attrs.define
class Side:
    """One system (the gateway, or ffmpeg) at one N, for the per-call table."""

    system: str
    n: int
    up: int
    directions: list[Totals]
    cpu_pct_per_call: float
    """CPU over the window, % of one core, ÷ N"""
    rss_per_call_mib: float
    """gateway: (VmRSS at the end − VmRSS of an idle gateway) ÷ N; ffmpeg: Σ VmRSS ÷ N"""
    pss_per_call_mib: float = math.nan
    """ffmpeg: Σ Pss ÷ N (shared library pages divided among the processes)"""
    codec_delay_ms: list[float] = attrs.Factory(list)
    """each direction's algorithmic delay, subtracted from p99 for "p99+" (missing: unknown)"""


def compare_header(directions: list[str]) -> str:
    top = f"{'routes':>6} {'system':<7} {'up':>4}"
    bottom = f"{'':>6} {'':<7} {'':>4}"
    for d in directions:
        top += f" | {d:^38}"
        bottom += f" | {'lost':>5} {'late':>5} {'p50':>5} {'p99':>5} {'p99+':>5} {'behind':>7}"
    top += f" | {'CPU %':>6} {'RSS MiB':>7} {'PSS MiB':>7}"
    bottom += f" | {'/call':>6} {'/call':>7} {'/call':>7}"
    return top + "\n" + bottom


def compare_row(side: Side) -> str:
    text = f"{side.n:>6} {side.system:<7} {side.up:>4}"
    for k, t in enumerate(side.directions):
        p99 = t.percentile(99)
        added = p99 - (side.codec_delay_ms[k] if k < len(side.codec_delay_ms) else math.nan)
        text += (f" | {t.lost:>5} {t.late:>5} {_f(t.percentile(50)):>5} {_f(p99):>5} {_f(added):>5} "
                 f"{t.behind:>7}")
    text += f" | {_f(side.cpu_pct_per_call, '.2f'):>6} {_f(side.rss_per_call_mib, '.2f'):>7} {_f(side.pss_per_call_mib, '.2f'):>7}"
    return text


def _f(v: float, spec: str = ".1f") -> str:
    return "-" if v is None or math.isnan(v) else format(v, spec)


def ffmpeg_line(ff: FfRun) -> str:
    if ff.window == (0.0, 0.0):
        return f"{ff.n:>6} ffmpeg: no output within the connect timeout; " + "; ".join(ff.errors[:3])
    text = (f"{ff.n:>6} ffmpeg x {ff.n}: {ff.up} up in {ff.connect_s:.1f} s, CPU {ff.cpu_s / ff.seconds * 100:.1f} % "
            f"of one core in all, RSS {ff.rss_mib:.0f} MiB in all (PSS {ff.pss_mib:.0f}), bench CPU "
            f"{ff.bench_cpu_s / ff.seconds * 100:.0f} %")
    if ff.exited:
        text += f"; {ff.exited} exited early"
    if ff.errors:
        text += f"; {len(ff.errors)} with messages, first: {ff.errors[0]}"
    return text


def print_per_call(sides: list[Side], directions: list[str]) -> None:
    """The issue's figures per call: gateway (and ffmpeg) per N, side by side."""
    if not sides:
        return
    print("\nper call (issue 12 figures):")
    print(compare_header(directions))
    for side in sides:
        print(compare_row(side))
    print(COMPARE_NOTES)


COMPARE_NOTES = (
    "lost: sent frames with speech that arrived as silence; late: packets > 20 ms behind their stream's 20 ms "
    "grid; p50/p99: latency ms (arrival − capture of the newest sent audio in the packet); p99+: p99 − the "
    "chain's own algorithmic delay (gateway: measured offline; ffmpeg: not measured, '-'); behind: packets sent "
    "in the window − packets received in it, all streams (≈ 0 in real time, grows when the path falls "
    "behind); CPU %/call: CPU of the process(es) over the window, % of one core, ÷ N; RSS/call: gateway "
    "(VmRSS at the end − VmRSS of an idle gateway) ÷ N, ffmpeg Σ VmRSS ÷ N (shared libraries counted in "
    "every process, as `ps` shows them); PSS/call: Σ Pss ÷ N (shared pages divided among the processes)"
)
