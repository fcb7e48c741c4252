"""The daemon: listen servers, one supervised nursery per route, graceful stop.

`Gateway(config).run()` binds `server.http` / `server.media` when configured, builds every
route's endpoints (listen endpoints register their paths before any route starts, so routes
of the same process can dial each other), then supervises each route in its own task: a route
that fails is logged and restarted with backoff unless the error is permanent; the others keep
streaming. Routes with a listen endpoint go back to waiting for the next client after a
session ends.
"""

from __future__ import annotations

import logging

import attrs
import trio

from gateway._util import collapse
from gateway.adapters.registry import build_endpoint
from gateway.config.schema import GatewayConfig, RouteConfig
from gateway.endpoint import Endpoint
from gateway.errors import ConfigError, GatewayError, RemoteProtocolError, ServiceError
from gateway.route import Route
from gateway.runtime import Runtime
from gateway.server import serve_http, serve_media
from gateway.systemd import Notifier

log = logging.getLogger("gateway.daemon")

BACKOFF_FIRST = 1.0  # seconds before the first restart of a failed route
BACKOFF_MAX = 30.0  # seconds, the longest wait between restarts


@attrs.define
class RouteState:
    config: RouteConfig
    route: Route
    state: str = "starting"
    """starting | up | waiting (listen, between sessions) | restarting | ended | failed"""
    last_error: str = ""
    restarts: int = 0
    sessions_done: trio.Event = attrs.Factory(trio.Event)
    """Set when a session of the route ended (normally or not)."""
    finished: trio.Event = attrs.Factory(trio.Event)
    """Set when the route will not run again (ended, failed for good, stopped)."""
    pause: trio.CancelScope | None = None
    """The backoff sleep between restarts, cancelled by a stop."""

    @property
    def has_listen(self) -> bool:
        return any(e.role == "listen" for e in self.config.endpoints)


class Gateway:
    """One gateway process. Build with a validated `GatewayConfig`; `run()` until cancelled."""

    def __init__(self, config: GatewayConfig, runtime: Runtime | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
        self.runtime.config = config
        self.routes: dict[str, RouteState] = {}
        self.stopping = False
        self.notifier = notifier or Notifier()
        """systemd notification (no-op outside a Type=notify unit)."""

    def status_line(self) -> str:
        """`3 routes: 2 up, 1 waiting` — for systemd's STATUS= and logs."""
        counts: dict[str, int] = {}
        for state in self.routes.values():
            counts[state.state] = counts.get(state.state, 0) + 1
        parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        return f"{len(self.routes)} route(s)" + (f": {parts}" if parts else "")

    def build(self) -> None:
        """Construct every endpoint and route; raises ConfigError (with file:line) on the first
        invalid one. Safe to call without a running trio loop (used by `gateway check`)."""
        for rc in self.config.routes:
            endpoints: list[Endpoint] = []
            counts: dict[str, int] = {}
            for ec in rc.endpoints:
                counts[ec.kind] = counts.get(ec.kind, 0) + 1
            seen: dict[str, int] = {}
            for ec in rc.endpoints:
                seen[ec.kind] = seen.get(ec.kind, 0) + 1
                default = ec.kind if counts[ec.kind] == 1 else f"{ec.kind}{seen[ec.kind]}"
                endpoints.append(build_endpoint(ec, self.runtime, default))
            names = [e.name for e in endpoints]
            if len(set(names)) != len(names):
                raise ConfigError(f"{rc.where}: routes[{rc.name}]: endpoint names must be unique, got {names}")
            try:
                route = Route(rc.name, endpoints, jitter_ms=rc.jitter_ms, max_delay_ms=rc.max_delay_ms)
            except ValueError as err:
                raise ConfigError(f"{rc.where}: {err}") from None
            self.routes[rc.name] = RouteState(rc, route)

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
        server = self.config.server
        async with trio.open_nursery() as nursery:
            if server.http and self.runtime.http.port is None:
                await nursery.start(serve_http, self.runtime.http, server.http.host, server.http.port)
            if server.media and self.runtime.media.port is None:
                await nursery.start(serve_media, self.runtime.media, server.media.host, server.media.port)
            if not self.routes:
                self.build()
            for state in self.routes.values():
                nursery.start_soon(self.supervise, state)
            await trio.sleep(0)  # let every supervisor start its route
            log.info("gateway running: %d route(s)", len(self.routes))
            # every listen socket is bound and every route has started (dial routes connect
            # on their own time; a failing one is restarted, never blocks readiness)
            self.notifier.ready(self.status_line())
            nursery.start_soon(self.notifier.watchdog)
            task_status.started(self)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every route cleanly: each endpoint sends its protocol's goodbye (close 1000,
        AudioSocket hangup, ...) while its connection is still read, so close handshakes
        complete. Returns when all routes are down or after `timeout` seconds."""
        self.stopping = True
        self.notifier.stopping()
        for state in self.routes.values():
            state.route.stop()
            if state.pause is not None:
                state.pause.cancel()
        with trio.move_on_after(timeout):
            for state in self.routes.values():
                await state.finished.wait()

    async def supervise(self, state: RouteState) -> None:
        """Run one route for as long as it should run (see the module doc)."""
        route, rc = state.route, state.config
        rlog = route.log
        backoff = BACKOFF_FIRST
        try:
            while True:
                state.state = "waiting" if state.has_listen else "starting"
                try:
                    try:
                        async with trio.open_nursery() as n:
                            await n.start(route.run)
                            state.state = "up"
                    except BaseExceptionGroup as group:
                        err = collapse(group)
                        if isinstance(err, Exception) and not isinstance(err, BaseExceptionGroup):
                            raise err from None
                        raise
                    backoff = BACKOFF_FIRST
                    state.sessions_done.set()
                    if self.stopping:
                        state.state = "stopped"
                        return
                    if not state.has_listen:
                        state.state = "ended"
                        return
                    continue
                except ServiceError as err:
                    state.last_error = str(err)
                    if err.permanent:
                        rlog.error("route failed: %s (permanent: not retrying)", err)
                        state.state = "failed"
                        return
                    rlog.warning("route failed: %s", err)
                except RemoteProtocolError as err:
                    state.last_error = str(err)
                    if state.has_listen and not self.stopping:
                        # A client broke the protocol: its connection was closed with the
                        # right code; the route serves the next client at once (no backoff,
                        # and nothing is dialed before a client connects).
                        rlog.warning("session ended: %s", err)
                        state.sessions_done.set()
                        continue
                    rlog.warning("route failed: %s", err)
                except (GatewayError, OSError) as err:
                    state.last_error = str(err)
                    rlog.warning("route failed: %s", err)
                except Exception as err:  # a bug: keep the other routes running, log the trace
                    state.last_error = repr(err)
                    rlog.exception("route crashed (a bug: please report the trace)")
                state.sessions_done.set()
                if self.stopping:
                    state.state = "stopped"
                    return
                if rc.restart == "never":
                    state.state = "failed"
                    return
                state.state = "restarting"
                state.restarts += 1
                rlog.info("restarting in %.0f s", backoff)
                with trio.CancelScope() as state.pause:
                    await trio.sleep(backoff)
                state.pause = None
                if self.stopping:
                    state.state = "stopped"
                    return
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            state.finished.set()
