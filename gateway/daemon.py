"""The daemon: listen servers, one supervised nursery per route, live reload, graceful stop.

`Gateway(config).run()` binds `server.http` / `server.media` / `server.audiosocket` when configured, builds every
route's endpoints (listen endpoints register their paths before any route starts, so routes
of the same process can dial each other), then supervises each route in its own task: a route
that fails is logged and restarted with backoff unless the error is permanent; the others keep
streaming. Routes with a listen endpoint go back to waiting for the next client after a
session ends, however it ended: a client that broke the protocol or vanished mid-handshake
ends its own session (the route turns that into a normal end, counted in `peer_errors`),
never the route, so nobody can hold a call in restart backoff by sending bad bytes. Backoff
is for what retrying can fix on our side (a dial whose service is unreachable): 1 s doubling
to 30 s, never shorter than the Retry-After of the service's refusal (a 503 or 429, on the
upgrade or a REST call), and stretched by a random 0-25 % so that routes refused together
(a crowd starting at boot against a service that paces set-ups) come back spread out.

Reload (`reload()`, on SIGHUP or POST /v1/reload) re-reads the YAML file and validates all of
it, off the event loop, before touching anything: an invalid file changes nothing. Then routes
whose config did not change keep running untouched (not a frame lost); changed routes stop
(goodbyes, close codes) and start again with the new config; removed routes stop; new routes
start. Routes added through the control API (`add_route`) are kept by a reload unless the
file now has a route of the same name. Of `server:`, the control settings, the admission
limits and the set-up pacing apply at once; the sockets stay as they are until a restart.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Callable

import attrs
import trio

from gateway import control
from gateway._util import collapse
from gateway.adapters.audiosocket.server import listen_server, serve_audiosocket
from gateway.adapters.registry import build_endpoint
from gateway.config.schema import GatewayConfig, RouteConfig
from gateway.endpoint import Endpoint
from gateway.errors import CallEnded, ConfigError, GatewayError, RemoteProtocolError, ServiceError
from gateway.route import Route
from gateway.route_state import READY_STATES, ReloadReport, RouteState, RouteStatus
from gateway.runtime import Runtime
from gateway.server import serve_http, serve_media
from gateway.systemd import Notifier

log = logging.getLogger("gateway.daemon")

BACKOFF_FIRST = 1.0  # seconds before the first restart of a failed route
BACKOFF_MAX = 30.0  # seconds, the longest wait between restarts
BACKOFF_SPREAD = 0.25  # each wait is stretched by a random fraction up to this (restart_delay)
REMOVE_DEADLINE = 5.0  # seconds for a removed / changed route to say goodbye and end


def restart_delay(backoff: float, retry_after: float | None, draw: float) -> float:
    """Seconds before a failed route starts again: `backoff` (seconds) or the service's
    `retry_after` (seconds; None when it sent none), whichever is longer, times 1 + `draw` x
    BACKOFF_SPREAD (`draw` uniform in [0, 1): `random.random()`), so it is never sooner than
    the service asked (RFC 9110 §10.2.3) and a crowd refused at once does not return at once."""
    return max(backoff, retry_after or 0.0) * (1.0 + draw * BACKOFF_SPREAD)


class Gateway:
    """One gateway process. Build with a validated `GatewayConfig`; `run()` until cancelled.

    `config_path`: the YAML file `reload()` re-reads (None: reload is refused)."""

    def __init__(self, config: GatewayConfig, runtime: Runtime | None = None, notifier: Notifier | None = None,
                 config_path: str | None = None, placement: Callable[[RouteConfig], bool] | None = None) -> None:
        self.config = config
        self.placement = placement
        """Which of the file's routes this process runs (None: all): a worker's share under
        `gateway run --workers N` (`gateway.workers.worker_of`). Every route is still validated."""
        self.runtime = runtime or Runtime(config)
        self.runtime.config = config
        self.runtime.apply_server_limits()
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
        refusal = self.runtime.admission.refusal()
        closed = f"; admission closed: {refusal.detail}" if refusal is not None else ""
        return f"{len(self.routes)} route(s)" + (f": {parts}" if parts else "") + closed

    @property
    def ready(self) -> bool:
        """Every route is up, or waiting for its listen client, or done (a file played to its
        end): none is starting, held, restarting or failed; and admission is open (a gateway
        past its capacity is not ready for more: `gateway.admission`)."""
        return (not self.stopping and self.runtime.admission.open
                and all(s.state in READY_STATES for s in self.routes.values()))

    def build(self) -> None:
        """Construct every endpoint and route; raises ConfigError (with file:line) on the first
        invalid one. Safe to call without a running trio loop (used by `gateway check`)."""
        for rc in self.config.routes:
            if self.placement is None or self.placement(rc):
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
            answering = [e.name for e in endpoints if getattr(e, "calls", None) is not None]
            if answering and (len(answering) > 1 or any(e.role == "listen" for e in endpoints)):
                raise ConfigError(f"{rc.where}: routes[{rc.name}]: a route that answers calls (calls: incoming) has one "
                                  "such endpoint and no listen endpoint (each call runs a session of its own)")
            try:
                route = Route(rc.name, endpoints, jitter_ms=rc.jitter_ms, max_delay_ms=rc.max_delay_ms,
                              reconnect_s=rc.reconnect_s, on_hold=rc.on_hold)
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
            control.install(self)
        async with trio.open_nursery() as nursery:
            if server.http and self.runtime.http.port is None:
                await nursery.start(serve_http, self.runtime.http, server.http.host, server.http.port)
            if server.media and self.runtime.media.port is None:
                await nursery.start(serve_media, self.runtime.media, server.media.host, server.media.port)
            if server.audiosocket and (audiosocket := listen_server(self.runtime)).port is None:
                await nursery.start(serve_audiosocket, audiosocket, server.audiosocket.host, server.audiosocket.port)
            if not self.routes:
                self.build()
            self._nursery = self.runtime.nursery = nursery
            for state in self.routes.values():
                await nursery.start(self.supervise, state)  # started: its route is starting
            log.info("gateway running: %d route(s)", len(self.routes))
            # every listen socket is bound and every route has started (dial routes connect
            # on their own time; a failing one is restarted, never blocks readiness)
            self.notifier.ready(self.status_line())
            nursery.start_soon(self.notifier.watchdog)
            nursery.start_soon(self._report_status)
            nursery.start_soon(self.runtime.admission.run)  # the media clock (server.admission_lag_ms)
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
            state.stop_calls()
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
        sockets = lambda server: (server.http, server.media, server.media_url, server.audiosocket)  # noqa: E731
        kept_server = sockets(new.server) != sockets(old.server)
        if kept_server:
            log.warning("reload: server.http/media/media_url/audiosocket changed in %s; the running sockets stay as they "
                        "are until the next restart", new.filename)
        # server.control (token, open_reads) applies at once: a token can be rotated by a reload;
        # so do the admission limits (sessions in progress are never touched by them) and the
        # set-up pacing (set-ups already waiting keep their turns)
        new = attrs.evolve(new, server=attrs.evolve(old.server, control=new.server.control,
                                                    admission_lag_ms=new.server.admission_lag_ms,
                                                    admission_cpu_percent=new.server.admission_cpu_percent,
                                                    admission_machine_cpu_percent=new.server.admission_machine_cpu_percent,
                                                    max_sessions=new.server.max_sessions,
                                                    setups_per_second=new.server.setups_per_second,
                                                    setup_burst=new.server.setup_burst,
                                                    dial_starts_per_second=new.server.dial_starts_per_second,
                                                    dial_start_burst=new.server.dial_start_burst))
        pacing = lambda server: (server.setups_per_second, server.setup_burst,  # noqa: E731
                                 server.dial_starts_per_second, server.dial_start_burst)
        if pacing(new.server) != pacing(old.server):
            self.runtime.apply_setup_limits(new.server)
            log.info("reload: server.setups_per_second %g, server.setup_burst %d, server.dial_starts_per_second %g, "
                     "server.dial_start_burst %d", *pacing(new.server))
        limits = lambda server: (server.admission_lag_ms, server.admission_cpu_percent,  # noqa: E731
                                 server.admission_machine_cpu_percent, server.max_sessions)
        if limits(new.server) != limits(old.server):
            self.runtime.admission.configure(new.server.admission_lag_ms / 1000, new.server.max_sessions,
                                             new.server.admission_cpu_percent / 100,
                                             new.server.admission_machine_cpu_percent / 100)
            log.info("reload: server.admission_lag_ms %d, server.admission_cpu_percent %s, "
                     "server.admission_machine_cpu_percent %s, server.max_sessions %s",
                     new.server.admission_lag_ms, new.server.admission_cpu_percent or "off",
                     new.server.admission_machine_cpu_percent or "off", new.server.max_sessions or "none")
        wanted = {rc.name: rc for rc in new.routes if self.placement is None or self.placement(rc)}
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
            state.stop_calls()
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
        if state.takes_calls:
            await self._supervise_calls(state, task_status)
            return
        try:
            while True:
                retry_after: float | None = None  # the service's Retry-After, when it sent one
                slot: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
                if not state.has_listen:  # a dial route starts a session now: its turn, then admission
                    turn = self.runtime.dial_pacer.turn(trio.current_time())
                    if turn:
                        task_status.started()  # waiting its turn is started: the gateway runs on meanwhile
                        task_status = trio.TASK_STATUS_IGNORED
                        state.reason = (f"waiting its turn: dial routes start at "
                                        f"{self.config.server.dial_starts_per_second:g} per second")
                        with trio.CancelScope() as state.pause:
                            await trio.sleep(turn)
                        state.pause = None
                        state.reason = ""
                        if self.stopping or state.removed:
                            state.enter(RouteStatus.STOPPED)
                            return
                    if not self.runtime.admission.open:
                        task_status.started()  # held is started: the gateway runs on meanwhile
                        task_status = trio.TASK_STATUS_IGNORED
                        if not await self._admit(state):
                            state.enter(RouteStatus.STOPPED)
                            return
                    slot = self.runtime.admission.slot()  # taken at once: nothing slips in between
                state.enter(RouteStatus.WAITING if state.has_listen else RouteStatus.STARTING)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                try:
                    try:
                        with slot, contextlib.ExitStack() as up:
                            async with trio.open_nursery() as n:
                                await n.start(route.run)
                                if not state.has_listen:  # a listen route's client streams already
                                    up.enter_context(self.runtime.admission.stream())  # media flows: the clock ticks
                                if not (self.stopping or state.removed):
                                    state.enter(RouteStatus.UP)
                    except BaseExceptionGroup as group:
                        _raise_leaf(group)
                    backoff = BACKOFF_FIRST
                    state.sessions_done.set()
                    if self.stopping or state.removed:
                        state.enter(RouteStatus.STOPPED)
                        return
                    if not state.has_listen:
                        state.enter(RouteStatus.ENDED)
                        return
                    continue
                except ServiceError as err:
                    state.last_error = str(err)
                    retry_after = err.retry_after
                    if err.permanent:
                        rlog.error("route failed: %s (permanent: not retrying)", err)
                        state.enter(RouteStatus.FAILED)
                        return
                    rlog.warning("route failed: %s", err)
                except CallEnded as err:
                    if state.has_listen and not (self.stopping or state.removed):
                        # The session ended before it was up (the bot rejected the call, the
                        # caller hung up while it rang): normal, the next caller is served.
                        rlog.info("session ended before it was up: %s", route.stats.ended_by or err)
                        state.sessions_done.set()
                        continue
                    state.last_error = str(err)
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
                    state.enter(RouteStatus.STOPPED)
                    return
                if rc.restart == "never":
                    state.enter(RouteStatus.FAILED)
                    return
                state.enter(RouteStatus.RESTARTING)
                state.restarts += 1
                delay = restart_delay(backoff, retry_after, random.random())
                rlog.info("restarting in %.1f s%s", delay,
                          f" (the service asked for {retry_after:g} s)" if retry_after and retry_after > backoff else "")
                with trio.CancelScope() as state.pause:
                    await trio.sleep(delay)
                state.pause = None
                if self.stopping or state.removed:
                    state.enter(RouteStatus.STOPPED)
                    return
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            state.finished.set()

    async def _admit(self, state: RouteState) -> bool:
        """Hold a dial route (state `held`, with its reason) until admission opens; False when
        the route was stopped or removed meanwhile."""
        rlog = state.route.log

        def on_hold(refusal) -> None:
            if state.state != RouteStatus.HELD:
                rlog.info("not starting yet: %s (it starts when admission opens)", refusal.detail)
            state.reason = f"waiting: {refusal.detail}"
            state.enter(RouteStatus.HELD)

        try:
            with trio.CancelScope() as state.pause:
                if self.stopping or state.removed:
                    return False
                await self.runtime.admission.wait_open(on_hold)
        finally:
            state.pause = None
            state.reason = ""
        if self.stopping or state.removed:
            return False
        rlog.info("admission open: starting")
        return True

    # ------------------------------------------------------------------------ incoming calls
    async def _supervise_calls(self, state: RouteState, task_status: trio.TaskStatus[None]) -> None:
        """Run a route that answers calls (`argon` with `calls: incoming`): each call the bot's
        call desk gives this route (its `from:` filter, `max_calls`) runs as a session of its
        own, built afresh from the route's config, side by side with the others."""
        from gateway.adapters.argon.dial import CallDesk, CallLine, incoming_endpoint

        template = incoming_endpoint(state.route.endpoints)
        assert template is not None
        rlog = state.route.log
        admission = self.runtime.admission

        def active() -> int:
            """Calls in progress; while admission is closed, a full line (the desk rejects the
            call as busy: the hook CallLine has; see gateway.admission)."""
            if admission.check("incoming Argon call") is not None:
                return template.max_calls
            return len(state.calls)

        line = CallLine(template, active=active)
        desk = CallDesk.shared(self.runtime, template.api)
        state.line = line
        state.enter(RouteStatus.WAITING)
        task_status.started()
        try:
            if self.stopping or state.removed:
                return
            desk.add(line)
            rlog.info("waiting for calls to bot %s (%s, at most %d at once)", template.api_url,
                      f"from {', '.join(template.callers)}" if template.callers else "from anyone", template.max_calls)
            async with trio.open_nursery() as sessions:
                async for call in line.calls:
                    if self.stopping or state.removed:
                        break
                    try:
                        session = self._build_route(state.config).route
                    except ConfigError as err:  # validated already: a race with the running set
                        rlog.error("call %s not answered: %s", call.call_id, err)
                        continue
                    session.stats = state.route.stats  # one set of counters for the route
                    for mine, shared in zip(session.endpoints, state.route.endpoints):
                        mine.stats = shared.stats
                    endpoint = incoming_endpoint(session.endpoints)
                    assert endpoint is not None
                    endpoint.call = call
                    state.calls[call.call_id] = session
                    line.sessions[call.call_id] = endpoint
                    sessions.start_soon(self._run_call, state, session, call.call_id)
                for session in list(state.calls.values()):
                    session.stop()
        finally:
            desk.remove(line)
            line.close()
            state.line = None
            state.enter(RouteStatus.STOPPED if self.stopping or state.removed else RouteStatus.ENDED)
            state.finished.set()

    async def _run_call(self, state: RouteState, session: Route, call_id: str) -> None:
        rlog = session.log
        admission = self.runtime.admission
        state.enter(RouteStatus.UP)
        try:
            try:
                with admission.slot(), contextlib.ExitStack() as up:
                    # the call is up once its route is (Route.run's started): the media clock ticks
                    reason = await session.run(task_status=_OnStarted(lambda: up.enter_context(admission.stream())))
            except BaseExceptionGroup as group:
                _raise_leaf(group)
            rlog.info("call %s ended: %s", call_id, reason)
        except (GatewayError, OSError) as err:
            state.last_error = str(err)
            rlog.warning("call %s failed: %s", call_id, err)
        except Exception as err:  # a bug: keep the other calls and routes running
            state.last_error = repr(err)
            rlog.exception("call %s crashed (a bug: please report the trace)", call_id)
        finally:
            state.calls.pop(call_id, None)
            line = state.line
            if line is not None:
                line.sessions.pop(call_id, None)
            state.sessions_done.set()
            if not state.calls and state.state == RouteStatus.UP:
                state.enter(RouteStatus.WAITING)


class _OnStarted:
    """A task_status stand-in that calls `callback` when the task reports started."""

    def __init__(self, callback) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


def _raise_leaf(group: BaseExceptionGroup) -> None:
    """Raise the one error a route's nurseries wrapped (`collapse`), so the supervisor's
    handlers see a ServiceError as itself; the group as it is when it holds more."""
    err = collapse(group)
    if isinstance(err, Exception) and not isinstance(err, BaseExceptionGroup):
        raise err from None
    raise group
