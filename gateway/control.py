"""The control API on `server.http` (README, "Control API").

    GET    /healthz            200 while the event loop answers (liveness)
    GET    /readyz             200 when every route is up or waiting for its client and admission is
                               open, else 503 naming why
    GET    /metrics            Prometheus text format (gateway.metrics)
    GET    /v1/routes          every route: state, since when, endpoints and their counters
    GET    /v1/routes/{name}   one route, with its recent events
    POST   /v1/routes          add a route: the YAML route schema as JSON; 201, 400, 409, 413
    DELETE /v1/routes/{name}   stop a route for good (goodbyes, close codes); 200, 404
    POST   /v1/routes/{name}/clear  {"endpoint": E}: barge-in, drop what E said that the route
                               still holds (gateway.route, "Barge-in and marks"); 200 with
                               dropped_ms, 400, 404
    POST   /v1/routes/{name}/mark   {"endpoint": E, "name": M}: a mark after what E has sent;
                               202; its "mark-played" shows in the route's recent events; 400, 404
    POST   /v1/reload          re-read the YAML file (as SIGHUP); 200 with what changed, 400

Mutating calls need `Authorization: Bearer <server.control.token>` (401 without or with a
wrong one; 403 when no token is configured). Reads (`/metrics`, `/v1/...`) answer loopback
clients, or clients sending the control token, unless `server.control.open_reads` is true;
`/healthz` and `/readyz` answer everyone. Nothing here ever returns a secret: route configs
are not echoed back, and error texts go through the log redaction.

Bodies are bounded by `gateway.server` before a handler runs: 64 KiB (413 beyond), JSON nested
32 levels at most (400). Route and endpoint names follow one rule, in the file and here:
1 to 64 of A-Z a-z 0-9 . _ - (`gateway.config.options.NAME_RULE`); a name that breaks it is
refused with 400 and quoted with repr(), so it can reach neither a log line nor a header raw.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol
from urllib.parse import quote

import trio

from gateway import __version__
from gateway.config.schema import GatewayConfig, RouteConfig
from gateway.errors import ConfigError
from gateway.logs import redact
from gateway.route_state import READY_STATES, ReloadReport, RouteState, RouteStatus
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse

log = logging.getLogger("gateway.control")

Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class Configured(Protocol):
    """What the access guards read: the configuration in force (`server.control`). The
    supervisor of `gateway run --workers N` guards its own control API with them."""

    @property
    def config(self) -> GatewayConfig: ...


class Controlled(Configured, Protocol):
    """What the control API reads and calls on the gateway it serves: `gateway.daemon.Gateway`,
    which installs it (a Protocol, so that this module does not import the daemon)."""

    @property
    def runtime(self) -> Runtime: ...
    @property
    def routes(self) -> Mapping[str, RouteState]: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ready(self) -> bool: ...
    @property
    def config_path(self) -> str | None: ...
    def status_line(self) -> str: ...
    async def add_route(self, rc: RouteConfig) -> RouteState: ...
    async def remove_route(self, name: str) -> None: ...
    async def reload(self) -> ReloadReport: ...


def install(gateway: Controlled) -> None:
    """Register the control API's paths on the gateway's `server.http`."""
    api = ControlApi(gateway)
    http = gateway.runtime.http
    http.add("GET", "/healthz", api.healthz)
    http.add("GET", "/readyz", api.readyz)
    http.add("GET", "/metrics", api.reader(api.metrics))
    http.add("GET", "/v1/routes", api.reader(api.list_routes))
    http.add("GET", "/v1/routes/{name}", api.reader(api.get_route))
    http.add("POST", "/v1/routes", api.writer(api.add_route))
    http.add("DELETE", "/v1/routes/{name}", api.writer(api.delete_route))
    http.add("POST", "/v1/routes/{name}/clear", api.writer(api.clear))
    http.add("POST", "/v1/routes/{name}/mark", api.writer(api.mark))
    http.add("POST", "/v1/reload", api.writer(api.reload))


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse.json(status, {"error": redact(message)}, headers)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class AccessGuards:
    """Who may call what (module doc): `reader` and `writer` wrap a handler."""

    def __init__(self, gateway: Configured) -> None:
        self.gateway = gateway

    # ------------------------------------------------------------------------------- access
    def _bearer_ok(self, request: HttpRequest) -> bool | None:
        """True: the control token was sent; False: a wrong or no token; None: none configured."""
        token = self.gateway.config.server.control.token
        if not token:
            return None
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), token.reveal().encode())

    def reader(self, handler: Handler) -> Handler:
        async def guarded(request: HttpRequest) -> HttpResponse:
            control = self.gateway.config.server.control
            if control.open_reads or is_loopback(request.client) or self._bearer_ok(request):
                return await handler(request)
            log.info("control API: refused %s %s from %s (reads are open to loopback only)",
                     request.method, request.path, request.client or "?")
            return _error(403, "reads are open to loopback clients only (server.control.open_reads), "
                               "or to clients sending the control token as a Bearer token")

        return guarded

    def writer(self, handler: Handler) -> Handler:
        async def guarded(request: HttpRequest) -> HttpResponse:
            ok = self._bearer_ok(request)
            if ok is None:
                return _error(403, "the control API is read-only: no server.control.token is configured")
            if not ok:
                log.info("control API: refused %s %s from %s: bearer token missing or wrong",
                         request.method, request.path, request.client or "?")
                return _error(401, "send the control token as a Bearer token (server.control.token)",
                              (("www-authenticate", "Bearer"),))
            return await handler(request)

        return guarded


class ControlApi(AccessGuards):
    """The control API's handlers, guarded as `install` registers them."""

    gateway: Controlled

    def __init__(self, gateway: Controlled) -> None:
        super().__init__(gateway)

    # -------------------------------------------------------------------------------- probes
    async def healthz(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(200, {"status": "ok", "version": __version__,
                                       "uptime_s": round(time.time() - self.gateway.started_at, 1)})

    async def readyz(self, request: HttpRequest) -> HttpResponse:
        gateway = self.gateway
        not_ready = {name: s.state for name, s in gateway.routes.items() if s.state not in READY_STATES}
        admission = gateway.runtime.admission
        refusal = admission.refusal()
        body = {"ready": gateway.ready, "status": gateway.status_line(), "not_ready": not_ready,
                "admission": {
                    "open": refusal is None,
                    "reason": refusal.detail if refusal is not None else None,
                    "media_clock_lag_ms": round(admission.clock.lag * 1000, 1),
                    "loop_cpu_percent": round((admission.clock.busy or 0.0) * 100, 1),
                    "machine_cpu_percent": round((admission.clock.machine_busy or 0.0) * 100, 1),
                    "sessions": admission.sessions,
                    "max_sessions": admission.max_sessions,
                }}
        held = {name: s.reason for name, s in gateway.routes.items() if s.state == RouteStatus.HELD and s.reason}
        if held:
            body["held"] = held
        return HttpResponse.json(200 if gateway.ready else 503, body)

    async def metrics(self, request: HttpRequest) -> HttpResponse:
        from gateway.metrics import render_async

        body, content_type = await render_async(self.gateway)  # built off the event loop
        return HttpResponse(200, body, content_type)

    # -------------------------------------------------------------------------------- routes
    async def list_routes(self, request: HttpRequest) -> HttpResponse:
        routes = [describe_route(s, events=False) for s in self.gateway.routes.values()]
        return HttpResponse.json(200, {"status": self.gateway.status_line(), "routes": routes})

    async def get_route(self, request: HttpRequest) -> HttpResponse:
        state = self.gateway.routes.get(request.params["name"])
        if state is None:
            return _error(404, f"no route named {request.params['name']!r}")
        return HttpResponse.json(200, describe_route(state, events=True))

    async def add_route(self, request: HttpRequest) -> HttpResponse:
        try:
            data = request.json()
            rc = RouteConfig.from_data(data, "POST /v1/routes")
        except ValueError as err:  # not JSON (size and nesting were checked before the handler)
            return _error(400, str(err))
        except ConfigError as err:
            return _error(400, str(err))
        try:
            state = await self.gateway.add_route(rc)
        except KeyError:
            return _error(409, f"a route named {rc.name!r} exists (DELETE it first, or change it in the file and reload)")
        except RuntimeError as err:  # stopping
            return _error(503, str(err))
        except ConfigError as err:
            return _error(400, str(err))
        await trio.sleep(0)  # let its supervisor take the first step
        location = f"/v1/routes/{quote(rc.name, safe='')}"  # a valid name needs no quoting: belt and braces
        return HttpResponse.json(201, describe_route(state, events=False), (("location", location),))

    async def delete_route(self, request: HttpRequest) -> HttpResponse:
        name = request.params["name"]
        try:
            await self.gateway.remove_route(name)
        except KeyError:
            return _error(404, f"no route named {name!r}")
        return HttpResponse.json(200, {"removed": name})

    def _playing(self, request: HttpRequest, *fields: str) -> tuple[RouteState, dict[str, str]] | HttpResponse:
        """The route and the body's string `fields` for clear and mark, or the error answer."""
        state = self.gateway.routes.get(request.params["name"])
        if state is None:
            return _error(404, f"no route named {request.params['name']!r}")
        try:
            data = request.json()
        except ValueError as err:
            return _error(400, str(err))
        if not isinstance(data, dict):
            return _error(400, f"expected a JSON object with {', '.join(fields)}")
        values = {}
        for field in fields:
            value = data.get(field)
            if not isinstance(value, str) or not value or len(value) > 128:
                return _error(400, f"{field!r}: expected a string of 1 to 128 characters")
            values[field] = value
        if not any(e.name == values["endpoint"] for e in state.route.endpoints):
            return _error(404, f"route {state.route.name!r} has no endpoint named {values['endpoint']!r}")
        return state, values

    async def clear(self, request: HttpRequest) -> HttpResponse:
        found = self._playing(request, "endpoint")
        if isinstance(found, HttpResponse):
            return found
        state, values = found
        dropped_ms = state.route.clear(values["endpoint"])
        return HttpResponse.json(200, {"route": state.route.name, "endpoint": values["endpoint"], "dropped_ms": dropped_ms})

    async def mark(self, request: HttpRequest) -> HttpResponse:
        found = self._playing(request, "endpoint", "name")
        if isinstance(found, HttpResponse):
            return found
        state, values = found
        state.route.mark(values["endpoint"], values["name"])
        return HttpResponse.json(202, {"route": state.route.name, **values})

    async def reload(self, request: HttpRequest) -> HttpResponse:
        try:
            report = await self.gateway.reload()
        except ConfigError as err:
            return _error(400, f"reload refused, nothing changed: {err}")
        return HttpResponse.json(200, {"reloaded": self.gateway.config_path, **report.as_dict(),
                                       "summary": report.summary()})


def _wall(trio_time: float | None) -> float | None:
    """A trio clock reading as Unix time (seconds, 3 decimals)."""
    if trio_time is None:
        return None
    return round(time.time() - (trio.current_time() - trio_time), 3)


def describe_route(state: RouteState, *, events: bool) -> dict[str, object]:
    """The JSON view of one route (no config values: they may hold secrets)."""
    route = state.route
    stats = route.stats
    data: dict[str, object] = {
        "name": route.name,
        "state": state.state,
        "since": round(state.since, 3),
        "origin": state.origin,
        "where": state.config.where,
        "restarts": state.restarts,
        "last_error": redact(state.last_error) or None,
        "reason": state.reason or None,
        "sessions": stats.sessions,
        "up_since": _wall(stats.started_at) if state.state == RouteStatus.UP else None,
        "ended_by": redact(stats.ended_by) or None,
        "events": stats.events,
        "endpoints": [
            {"name": ep.name, "kind": ep.kind, "role": ep.role, "description": redact(ep.describe()),
             "away_since": _wall(away) if (away := route.away_since(ep)) is not None else None,
             **ep.stats.as_dict()}
            for ep in route.endpoints
        ],
    }
    if events:
        data["recent_events"] = [
            {"at": _wall(at), "source": ev.source, "kind": ev.kind, "summary": redact(ev.summary())}
            for at, ev in stats.recent_events
        ]
    return data
