"""The daemon: listen servers, one supervised nursery per route, live reload, graceful stop.

`Gateway(config).run()` binds `server.http` / `server.media` when configured, builds every
route's endpoints (listen endpoints register their paths before any route starts, so routes
of the same process can dial each other), then supervises each route in its own task: a route
that fails is logged and restarted with backoff unless the error is permanent; the others keep
streaming. Routes with a listen endpoint go back to waiting for the next client after a
session ends.

Reload (`reload()`, on SIGHUP or POST /v1/reload) re-reads the YAML file and validates all of
it, off the event loop, before touching anything: an invalid file changes nothing. Then routes
whose config did not change keep running untouched (not a frame lost); changed routes stop
(goodbyes, close codes) and start again with the new config; removed routes stop; new routes
start. Routes added through the control API (`add_route`) are kept by a reload unless the
file now has a route of the same name.
"""

from __future__ import annotations

import logging
import time

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
READY_STATES = ("up", "waiting", "ended")
REMOVE_DEADLINE = 5.0  # seconds for a removed / changed route to say goodbye and end


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
    origin: str = "file"
    """"file" (the YAML configuration) or "api" (POST /v1/routes)."""
    removed: bool = False
    """Set when the route is being removed (reload, DELETE): it will not run again."""
    since: float = attrs.Factory(time.time)
    """Wall-clock time (Unix seconds) the route entered its current `state`."""

    @property
    def has_listen(self) -> bool:
        return any(e.role == "listen" for e in self.config.endpoints)

    def enter(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()


@attrs.frozen
class ReloadReport:
    """What a reload (or an add / remove) did, by route name."""

    unchanged: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    kept_server: bool = False
    """True when `server:` changed in the file: sockets are not rebound by a reload."""

    def summary(self) -> str:
        parts = [f"{len(self.unchanged)} unchanged"]
        for label, names in (("restarted", self.restarted), ("removed", self.removed), ("added", self.added)):
            if names:
                parts.append(f"{len(names)} {label} ({', '.join(names)})")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class Gateway:
    """One gateway process. Build with a validated `GatewayConfig`; `run()` until cancelled.

    `config_path`: the YAML file `reload()` re-reads (None: reload is refused)."""

    def __init__(self, config: GatewayConfig, runtime: Runtime | None = None, notifier: Notifier | None = None,
                 config_path: str | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
        self.runtime.config = config
        self.config_path = config_path
        self.routes: dict[str, RouteState] = {}
        self.stopping = False
        self.notifier = notifier or Notifier()
        """systemd notification (no-op outside a Type=notify unit)."""
        self.started_at = time.time()
        self.reloads = 0
        """Reloads applied (not counting refused ones)."""
        self.reload_failures = 0
        self._nursery: trio.Nursery | None = None
        self._changing = trio.Lock()  # one reload / add / remove at a time

    def status_line(self) -> str:
        """`3 routes: 2 up, 1 waiting` — for systemd's STATUS= and logs."""
        counts: dict[str, int] = {}
        for state in self.routes.values():
            counts[state.state] = counts.get(state.state, 0) + 1
        parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        return f"{len(self.routes)} route(s)" + (f": {parts}" if parts else "")

    @property
    def ready(self) -> bool:
        """Every route is up, or waiting for its listen client, or done (a file played to its
        end): none is starting, restarting or failed."""
        return not self.stopping and all(s.state in READY_STATES for s in self.routes.values())

    def build(self) -> None:
        """Construct every endpoint and route; raises ConfigError (with file:line) on the first
        invalid one. Safe to call without a running trio loop (used by `gateway check`)."""
        for rc in self.config.routes:
            self.routes[rc.name] = self._build_route(rc)

    def _build_route(self, rc: RouteConfig, origin: str = "file") -> RouteState:
        endpoints: list[Endpoint] = []
        counts: dict[str, int] = {}
        for ec in rc.endpoints:
            counts[ec.kind] = counts.get(ec.kind, 0) + 1
        seen: dict[str, int] = {}
        try:
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
        except BaseException:
            for endpoint in endpoints:  # what was registered for a route that will not run
                endpoint.detach()
            raise
        return RouteState(rc, route, origin=origin)

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
        server = self.config.server
        if server.http:
            from gateway import control

            control.install(self)
        async with trio.open_nursery() as nursery:
            if server.http and self.runtime.http.port is None:
                await nursery.start(serve_http, self.runtime.http, server.http.host, server.http.port)
            if server.media and self.runtime.media.port is None:
                await nursery.start(serve_media, self.runtime.media, server.media.host, server.media.port)
            if not self.routes:
                self.build()
            self._nursery = nursery
            for state in self.routes.values():
                await nursery.start(self.supervise, state)  # started: its route is starting
            log.info("gateway running: %d route(s)", len(self.routes))
            # every listen socket is bound and every route has started (dial routes connect
            # on their own time; a failing one is restarted, never blocks readiness)
            self.notifier.ready(self.status_line())
            nursery.start_soon(self.notifier.watchdog)
            nursery.start_soon(self._report_status)
            task_status.started(self)

    async def _report_status(self) -> None:
        """Keep systemd's STATUS= current (route counts by state), checked once a second."""
        last = ""
        while True:
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            await trio.sleep(1.0)

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

    # ------------------------------------------------------------------------------ changes
    async def reload(self) -> ReloadReport:
        """Re-read `config_path` and apply it (see the module doc).

        Raises ConfigError (file:line: key: why) when the file is invalid; then nothing changed.
        systemd hears RELOADING=1 before and READY=1 after, whatever the outcome."""
        if self.config_path is None:
            raise ConfigError("reload: the gateway was not started from a configuration file")
        async with self._changing:
            if self.stopping:
                raise ConfigError("reload: the gateway is stopping")
            self.notifier.reloading()
            try:
                try:
                    new = await trio.to_thread.run_sync(self._load_checked, self.config_path)
                except ConfigError as err:
                    self.reload_failures += 1
                    log.error("reload refused, nothing changed: %s", err)
                    raise
                report = await self._apply(new)
                self.reloads += 1
                log.info("reloaded %s: %s", self.config_path, report.summary())
                return report
            finally:
                self.notifier.ready(self.status_line())

    def _load_checked(self, path: str) -> GatewayConfig:
        """Load `path` and build all of it against a scratch runtime (no sockets, nothing
        registered on ours): every error a real build would raise, raised here. Runs in a
        worker thread so a large file never stalls the media clock."""
        new = GatewayConfig.load(path)
        kept = tuple(s.config for name, s in self.routes.items()
                     if s.origin == "api" and name not in {rc.name for rc in new.routes})
        check = attrs.evolve(new, routes=new.routes + kept)
        Gateway(check, notifier=Notifier({})).build()
        return new

    async def _apply(self, new: GatewayConfig) -> ReloadReport:
        old = self.config
        sockets = lambda server: (server.http, server.media, server.media_url)  # noqa: E731
        kept_server = sockets(new.server) != sockets(old.server)
        if kept_server:
            log.warning("reload: server.http/media/media_url changed in %s; the running sockets stay as they "
                        "are until the next restart", new.filename)
        # server.control (token, open_reads) applies at once: a token can be rotated by a reload
        new = attrs.evolve(new, server=attrs.evolve(old.server, control=new.server.control))
        wanted = {rc.name: rc for rc in new.routes}
        unchanged, restarted, removed = [], [], []
        for name, state in self.routes.items():
            rc = wanted.get(name)
            if rc is None:
                if state.origin == "file":
                    removed.append(name)
            elif state.origin == "file" and state.config.same_as(rc, old.services, new.services):
                unchanged.append(name)
                state.config = rc  # same route; its lines may have moved
            else:
                restarted.append(name)
        added = [name for name in wanted if name not in self.routes]
        self.config = new
        self.runtime.config = new
        await self._retire([self.routes[name] for name in removed + restarted])
        for name in removed + restarted:
            del self.routes[name]
        for name in restarted + added:
            if self.stopping:  # a stop that came during the goodbyes wins
                break
            try:
                self._start(self._build_route(wanted[name]))
            except ConfigError as err:  # validated already: only a race with the running set
                log.error("route %s not started: %s", name, err)
        order = [name for name in wanted] + [name for name in self.routes if name not in wanted]
        self.routes = {name: self.routes[name] for name in order if name in self.routes}
        return ReloadReport(tuple(unchanged), tuple(restarted), tuple(removed), tuple(added), kept_server)

    def _start(self, state: RouteState) -> None:
        if self._nursery is None or self.stopping:
            raise RuntimeError("the gateway is not running" if self._nursery is None else "the gateway is stopping")
        self.routes[state.route.name] = state
        self._nursery.start_soon(self.supervise, state)

    async def _retire(self, states: list[RouteState]) -> None:
        """Stop these routes for good (goodbyes, close codes), concurrently; then unregister
        their listen paths. Returns when all ended or after REMOVE_DEADLINE."""
        for state in states:
            state.removed = True
            state.route.stop("removed")
            if state.pause is not None:
                state.pause.cancel()
        with trio.move_on_after(REMOVE_DEADLINE):
            for state in states:
                await state.finished.wait()
        for state in states:
            if not state.finished.is_set():
                state.route.log.warning("did not end within %.0f s of its removal", REMOVE_DEADLINE)
            for endpoint in state.route.endpoints:
                endpoint.detach()

    async def add_route(self, rc: RouteConfig) -> RouteState:
        """Start a new route (control API). Raises KeyError when a route of that name exists,
        ConfigError when it does not validate (nothing is started then)."""
        async with self._changing:
            if self.stopping:
                raise RuntimeError("the gateway is stopping")
            if rc.name in self.routes:
                raise KeyError(rc.name)
            state = self._build_route(rc, origin="api")
            self._start(state)
            log.info("route %s added through the control API", rc.name)
            return state

    async def remove_route(self, name: str) -> None:
        """Stop a route for good (control API); raises KeyError for an unknown name."""
        async with self._changing:
            state = self.routes[name]
            await self._retire([state])
            self.routes.pop(name, None)
            log.info("route %s removed through the control API", name)

    async def supervise(self, state: RouteState, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one route for as long as it should run (see the module doc). Reports started
        once the route's first session is starting (or waiting for its listen client)."""
        route, rc = state.route, state.config
        rlog = route.log
        backoff = BACKOFF_FIRST
        try:
            while True:
                state.enter("waiting" if state.has_listen else "starting")
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                try:
                    try:
                        async with trio.open_nursery() as n:
                            await n.start(route.run)
                            if not (self.stopping or state.removed):
                                state.enter("up")
                    except BaseExceptionGroup as group:
                        err = collapse(group)
                        if isinstance(err, Exception) and not isinstance(err, BaseExceptionGroup):
                            raise err from None
                        raise
                    backoff = BACKOFF_FIRST
                    state.sessions_done.set()
                    if self.stopping or state.removed:
                        state.enter("stopped")
                        return
                    if not state.has_listen:
                        state.enter("ended")
                        return
                    continue
                except ServiceError as err:
                    state.last_error = str(err)
                    if err.permanent:
                        rlog.error("route failed: %s (permanent: not retrying)", err)
                        state.enter("failed")
                        return
                    rlog.warning("route failed: %s", err)
                except RemoteProtocolError as err:
                    state.last_error = str(err)
                    if state.has_listen and not (self.stopping or state.removed):
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
                if self.stopping or state.removed:
                    state.enter("stopped")
                    return
                if rc.restart == "never":
                    state.enter("failed")
                    return
                state.enter("restarting")
                state.restarts += 1
                rlog.info("restarting in %.0f s", backoff)
                with trio.CancelScope() as state.pause:
                    await trio.sleep(backoff)
                state.pause = None
                if self.stopping or state.removed:
                    state.enter("stopped")
                    return
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            state.finished.set()
