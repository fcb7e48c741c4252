"""Running gateway configs on loopback for tests: ephemeral ports, known secrets."""

from __future__ import annotations

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


def run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a core (Linux
    /proc/thread-self/schedstat, field 2, ns): time another process (Chromium starting, a worker importing) had the
    cores, which the gateway's pacing cannot be judged on. 0 where the file does not exist."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Starvation:
    """While `run` runs: the `period`-long slices of real time in which this thread waited at
    least `threshold` s for a core (`run_queue_wait`: another process had it), and what a
    counter (`probe()`, e.g. packets sent late) grew by in those slices and the slice after
    each (`excused`). A real-time check of the gateway's timing excuses what happened while
    the machine kept it off the cores, and nothing else: calm, `excused` is 0."""

    def __init__(self, probe=lambda: 0, period: float = 0.020, threshold: float = 0.005) -> None:
        self.probe, self.period, self.threshold = probe, period, threshold
        self.slices = 0
        """Slices starved."""
        self.excused = 0
        """What `probe()` grew by in a starved slice or the slice after one."""

    async def run(self) -> None:
        waited_before, seen, starved_before = run_queue_wait(), self.probe(), False
        while True:
            await trio.sleep(self.period)
            waited_now, count = run_queue_wait(), self.probe()
            starved = waited_now - waited_before >= self.threshold
            self.slices += starved
            if starved or starved_before:
                self.excused += count - seen
            waited_before, seen, starved_before = waited_now, count, starved
