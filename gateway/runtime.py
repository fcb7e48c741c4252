"""What every endpoint may need from the running daemon: config, listen servers, HTTP client,
shared limiters. One `Runtime` per process; tests build one with ephemeral ports."""

from __future__ import annotations

import math
from typing import Any

import attrs
import httpx
import trio

from gateway.admission import Admission
from gateway.config.schema import GatewayConfig, ServerConfig
from gateway.server import HttpServer, MediaServer, SetupPacer


@attrs.define
class Runtime:
    config: GatewayConfig
    http: HttpServer = attrs.Factory(HttpServer)
    """REST listen server (`server.http`); routes register token endpoints on it."""
    media: MediaServer = attrs.Factory(MediaServer)
    """WebSocket listen server (`server.media`); listen endpoints register paths on it."""
    client: httpx.AsyncClient | None = None
    """Shared HTTP client for dial-side REST calls (created by the daemon inside trio)."""
    shared: dict[Any, Any] = attrs.Factory(dict)
    """Per-process singletons keyed by their owner (rate limiters, listen registries)."""
    nursery: trio.Nursery | None = None
    """The running gateway's nursery, for tasks shared by routes (an Argon events stream
    serving several routes); set by `Gateway.run`."""

    workers: int = 1
    """Processes sharing the config's routes (`gateway.workers`): limits that hold for the
    whole gateway (`server.dial_starts_per_second`) are split among them."""
    dial_pacer: SetupPacer = attrs.Factory(SetupPacer)
    """Spreads dial route starts (`server.dial_starts_per_second`; never refuses: a start
    waits its turn). Set by `apply_server_limits`."""
    admission: Admission = attrs.Factory(Admission)
    """Whether new sessions may start (media clock, `server.max_sessions`): consulted by the
    media server, the session-creating REST paths and the daemon's dial routes."""

    def __attrs_post_init__(self) -> None:
        self.apply_server_limits()

    def apply_server_limits(self) -> None:
        """(Re)build what `server:` limits: the media server's set-up pacer and admission
        (before the gateway runs: sessions in progress keep the slots of the old one)."""
        server = self.config.server
        self.media.pacer = SetupPacer()
        self.dial_pacer = SetupPacer(max_wait=math.inf)
        self.apply_setup_limits(server)
        self.admission = Admission(server.admission_lag_ms / 1000, server.max_sessions,
                                   server.admission_cpu_percent / 100, server.admission_machine_cpu_percent / 100,
                                   workers=self.workers)
        self.media.admission = self.http.admission = self.admission

    def apply_setup_limits(self, server: ServerConfig) -> None:
        """A reload's new set-up pacing (`server.setups_per_second`, `setup_burst`,
        `dial_starts_per_second`, `dial_start_burst`), applied to the running pacers: set-ups
        already waiting keep their turns, the counters go on."""
        self.media.pacer.configure(server.setups_per_second, server.setup_burst)
        self.dial_pacer.configure(server.dial_starts_per_second / self.workers,
                                  max(1, server.dial_start_burst // self.workers))

    def singleton(self, key: Any, factory) -> Any:
        if key not in self.shared:
            self.shared[key] = factory()
        return self.shared[key]

    def media_url(self) -> str:
        """Base ws:// URL of the media listen socket, as clients should use it."""
        server = self.config.server
        if server.media_url:
            return server.media_url.rstrip("/")
        if server.media is None:
            raise RuntimeError("server.media is not configured")
        host = server.media.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        port = self.media.port or server.media.port
        return f"ws://{host}:{port}"

    def http_client(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        return self.client
