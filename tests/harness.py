"""Running gateway configs on loopback for tests: ephemeral ports, known secrets."""

from __future__ import annotations

import bisect
import glob
import string

import trio
from trio_websocket import connect_websocket_url

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.demo import start_gateway

BOT_TOKEN = "bot-SECRET-7f3a9c2e"
VOIPBIN_TOKEN = "vb-SECRET-41d8e6b0"
JWT_SECRET = "jwt-SECRET-0123456789abcdef0123456789abcdef"
AGENT_API_KEY = "agent-SECRET-5e1c0d77"
VIDEOSDK_TOKEN = "vsdk-SECRET-9b2f4a10"
SECRETS = (BOT_TOKEN, VOIPBIN_TOKEN, JWT_SECRET, AGENT_API_KEY, VIDEOSDK_TOKEN)

SERVICES = """\
server: {http: "127.0.0.1:$http_port", media: "127.0.0.1:$media_port"$server_extra}
services:
  voipbin: {api_url: "http://127.0.0.1:$media_port", token: "%s"}
  argon: {api_url: "http://127.0.0.1:$http_port/api/bot", bot_token: "%s", jwt_secret: "%s"$argon_extra}
  agent: {api_url: "http://127.0.0.1:$http_port", api_key: "%s", cors_origins: ["*"]$agent_extra}
  videosdk: {api_url: "http://127.0.0.1:$http_port", token: "%s"$videosdk_extra}
""" % (VOIPBIN_TOKEN, BOT_TOKEN, JWT_SECRET, AGENT_API_KEY, VIDEOSDK_TOKEN)


async def start(
    nursery: trio.Nursery, routes: str, argon_extra: str = "", agent_extra: str = "", videosdk_extra: str = "",
    prepare=None, server_extra: str = "", **values
) -> Gateway:
    """Start a gateway whose config is SERVICES + `routes` (a string.Template: $http_port,
    $media_port and `values` are substituted). `*_extra` are appended inside that service's
    flow mapping, e.g. `videosdk_extra=", webhook_public_key_file: /tmp/k.pem"` (`server_extra`
    likewise inside `server:`)."""

    def make(http_port: int, media_port: int) -> GatewayConfig:
        text = string.Template(SERVICES + routes).substitute(
            http_port=http_port, media_port=media_port, argon_extra=argon_extra, server_extra=server_extra,
            agent_extra=agent_extra, videosdk_extra=videosdk_extra, **values
        )
        return GatewayConfig.from_text(text, "test.yaml")

    return await start_gateway(nursery, make, prepare)


async def ws_client(nursery: trio.Nursery, url: str):
    return await connect_websocket_url(nursery, url, message_queue_size=64)


def run_queue_wait(pid: int | None = None) -> float:
    """Seconds this thread (or with `pid`, all threads of that process together) has spent
    runnable but waiting for a core (Linux /proc/thread-self/schedstat, /proc/PID/task/*/schedstat,
    field 2, ns): time another process (Chromium starting, a worker importing) had the cores,
    which the gateway's pacing cannot be judged on. 0 where the files do not exist (a process
    that ended)."""
    paths = ["/proc/thread-self/schedstat"] if pid is None else glob.glob(f"/proc/{pid}/task/*/schedstat")
    waited = 0
    for path in paths:
        try:
            with open(path) as f:
                waited += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return waited / 1e9


class Starvation:
    """While `run` runs: the `period`-long slices of real time in which this thread waited at
    least `threshold` s for a core (`run_queue_wait`: another process had it), and what a
    counter (`probe()`, e.g. packets sent late) grew by in those slices and the slice after
    each (`excused`). A real-time check of the gateway's timing excuses what happened while
    the machine kept it off the cores, and nothing else: calm, `excused` is 0."""

    def __init__(self, probe=lambda: 0, period: float = 0.020, threshold: float = 0.005, pids=lambda: ()) -> None:
        """`pids()`: the other processes whose waits count too (a gateway run as a subprocess,
        its workers), read each slice; each is judged on its own, as this thread is."""
        self.probe, self.period, self.threshold, self.pids = probe, period, threshold, pids
        self.slices = 0
        """Slices starved."""
        self.excused = 0
        """What `probe()` grew by in a starved slice or the slice after one."""
        self.stretches: list[tuple[float, float]] = []
        """The starved slices, consecutive ones merged: (start, end) in trio time, s."""

    def overlaps(self, start: float, end: float, after: float = 0.0) -> bool:
        """Whether [`start`, `end`] (trio time, s) meets a starved stretch or the `after`
        seconds that follow it (what the machine's stall did to audio still on its way)."""
        return any(start <= e + after and s <= end for s, e in self.stretches)

    def _waits(self) -> dict[int | None, float]:
        return {pid: run_queue_wait(pid) for pid in (None, *self.pids())}

    async def run(self) -> None:
        waited_before, seen, starved_before = self._waits(), self.probe(), False
        then = trio.current_time()
        while True:
            await trio.sleep(self.period)
            waited_now, count, now = self._waits(), self.probe(), trio.current_time()
            starved = any(waited - waited_before.get(pid, waited) >= self.threshold for pid, waited in waited_now.items())
            self.slices += starved
            if starved or starved_before:
                self.excused += count - seen
            if starved:
                if starved_before:
                    self.stretches[-1] = (self.stretches[-1][0], now)
                else:
                    self.stretches.append((then, now))
            waited_before, seen, starved_before, then = waited_now, count, starved, now


class Timeline:
    """When a received signal arrived: its frames in order as (trio time, samples), at `rate`
    Hz, so that a place in the recording (seconds from its first sample) maps to the trio time
    its frame arrived."""

    def __init__(self, rate: int, frames=()) -> None:
        self.rate = rate
        self.times: list[float] = []
        self.ends: list[int] = []  # samples received up to and including each frame
        for at, samples in frames:
            self.add(at, samples)

    def add(self, at: float, samples: int) -> None:
        self.times.append(at)
        self.ends.append((self.ends[-1] if self.ends else 0) + samples)

    def time_at(self, seconds: float) -> float:
        """The arrival time of the frame holding the sample `seconds` into the recording (the
        first or last frame's before or after it); raises ValueError when empty."""
        if not self.times:
            raise ValueError("nothing was received")
        index = bisect.bisect_right(self.ends, max(0, int(seconds * self.rate)))
        return self.times[min(index, len(self.times) - 1)]


def record_timelines(monkeypatch) -> dict[str, Timeline]:
    """Timelines of what each `record` endpoint writes from now on, by its file's path (str):
    each frame written, when the route sent it (the file's timeline is its frames back to
    back: gateway.adapters.local.Recorder)."""
    from gateway.adapters.local import Recorder

    timelines: dict[str, Timeline] = {}
    send = Recorder.send

    async def timed_send(self, frame):
        if self._container is not None:
            timelines.setdefault(str(self.current_path), Timeline(self.rate)).add(trio.current_time(), len(frame.pcm))
        await send(self, frame)

    monkeypatch.setattr(Recorder, "send", timed_send)
    return timelines


class Stalls:
    """What a real-time test's checks need to excuse the machine's stalls and nothing else: a
    `Starvation` run beside the test and the `record_timelines` of its record endpoints (the
    `stalls` fixture of conftest.py starts both)."""

    def __init__(self, monkeypatch) -> None:
        self.starvation = Starvation()
        self.recorded = record_timelines(monkeypatch)

    def timeline(self, path) -> Timeline | None:
        """When the frames of the recording at `path` were written (None: nothing was)."""
        return self.recorded.get(str(path))
