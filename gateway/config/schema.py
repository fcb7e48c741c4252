"""The configuration schema: `GatewayConfig.load(path)` and its parts.

The YAML shape is the contract (README, "Configuration"):

    server:   {http: HOST:PORT, media: HOST:PORT, media_url: ws://HOST:PORT}
    services: {argon: {...}, voipbin: {...}}   (one section per kind of the registry table)
    routes:   [{name: ..., endpoints: [{KIND: {...options, role: dial|listen}}, ...]}]

Route and endpoint options are validated here (route level) and by each adapter's
`from_config` (endpoint level), all through `Options`, so every error names file:line and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import attrs

from gateway.adapters.registry import ENDPOINT_KINDS, kind_of, service_sections
from gateway.config.options import Options
from gateway.config.secret import Secret
from gateway.config.yaml_lines import expand_env, load_yaml
from gateway.errors import ConfigError

__all__ = ["ENDPOINT_KINDS", "EndpointConfig", "GatewayConfig", "HostPort", "RouteConfig", "ServerConfig", "Services"]

ROLES = ("dial", "listen")


@attrs.frozen
class HostPort:
    host: str
    """Interface to bind, e.g. 127.0.0.1 or 0.0.0.0."""
    port: int
    """TCP port; 0 binds an ephemeral port (tests)."""

    @classmethod
    def parse(cls, text: str, opts: Options, key: str) -> HostPort:
        host, sep, port = str(text).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise opts.error(key, f"expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class ControlConfig:
    """`server.control`: who may use the control API on `server.http` (README, "Control API")."""

    token: Secret | None = None
    """`Authorization: Bearer <token>` required by POST/DELETE and reload; without a token
    configured, mutating calls are refused (403)."""
    open_reads: bool = False
    """False: GET /v1/routes and /metrics answer loopback clients only (or any client that
    sends the control token). True: any client. /healthz and /readyz are always open."""

    @classmethod
    def from_options(cls, opts: Options) -> ControlConfig:
        token = opts.get_str("token", None, secret=True)
        result = cls(token=Secret(token) if token else None, open_reads=opts.get_bool("open_reads", False))
        opts.finish()
        return result


@attrs.frozen
class ServerConfig:
    """Sockets of the listen roles and the control API."""

    http: HostPort | None = None
    """REST token endpoints of the listen roles, and the control API."""
    media: HostPort | None = None
    """WebSocket media of every listen endpoint."""
    media_url: str | None = None
    """Base ws:// URL clients are told to use for media (default ws://{media})."""
    audiosocket: HostPort | None = None
    """TCP socket of the AudioSocket listen endpoints (Asterisk's `AudioSocket(uuid,host:port)`
    connects here; gateway.adapters.audiosocket)."""
    control: ControlConfig = ControlConfig()
    setups_per_second: float = 50.0
    """Listen sessions set up per second at most, after a burst of `setup_burst`: a crowd of
    clients is spread out (each waits its turn, up to 2 s, else 503) so running calls keep
    their pace."""
    setup_burst: int = 10
    dial_starts_per_second: float = 20.0
    """Dial route sessions started per second at most (boot, restarts, reload, the control
    API), after a burst of `dial_start_burst`: a crowd of routes takes its turns instead of
    opening every token call and WebSocket at once, which a service that paces set-ups (the
    gateway's own listen roles: `setups_per_second`) would refuse, and which would hold the
    event loop while calls run. Shared among the workers."""
    dial_start_burst: int = 10
    admission_lag_ms: int = 20
    """New sessions are refused (dial routes wait) while the media clock is this far behind:
    the 90th percentile of the last second's 20 ms ticks' lateness, ticked while sessions
    stream (gateway.admission); 0: never."""
    admission_cpu_percent: int = 0
    """New sessions are refused (dial routes wait) while the event loop's share of one core,
    projected with the sessions still starting and one more, would pass this percentage
    (gateway.admission: a CPU budget that stops a ramp before calls lose audio); 0: no budget."""
    admission_machine_cpu_percent: int = 0
    """New sessions are refused (dial routes wait) while the machine's cores, all processes
    counted, projected with the sessions still starting and one more, would be busier than
    this percentage (gateway.admission: the budget for a machine the gateway shares); 0: none."""
    max_sessions: int | None = None
    """Sessions at once at most (listen media connections, an Argon bot's connections in one
    room counting once, running dial routes, answered calls); None: no cap."""

    @classmethod
    def from_options(cls, opts: Options) -> ServerConfig:
        http = opts.get_str("http", None)
        media = opts.get_str("media", None)
        media_url = opts.get_str("media_url", None)
        audiosocket = opts.get_str("audiosocket", None)
        control = ControlConfig.from_options(opts.sub("control"))
        setups = opts.get_float("setups_per_second", 50.0, minimum=1.0)
        burst = opts.get_int("setup_burst", 10, minimum=1)
        dial_starts = opts.get_float("dial_starts_per_second", 20.0, minimum=0.1)
        dial_burst = opts.get_int("dial_start_burst", 10, minimum=1)
        lag = opts.get_int("admission_lag_ms", 20, minimum=0, maximum=1000)
        cpu = opts.get_int("admission_cpu_percent", 0, minimum=0, maximum=100)
        machine = opts.get_int("admission_machine_cpu_percent", 0, minimum=0, maximum=100)
        max_sessions = opts.get_int("max_sessions", None, minimum=1)
        opts.finish()
        return cls(
            http=HostPort.parse(http, opts, "http") if http else None,
            media=HostPort.parse(media, opts, "media") if media else None,
            media_url=media_url,
            audiosocket=HostPort.parse(audiosocket, opts, "audiosocket") if audiosocket else None,
            control=control,
            setups_per_second=float(setups),
            setup_burst=burst,
            dial_starts_per_second=float(dial_starts),
            dial_start_burst=dial_burst,
            admission_lag_ms=lag,
            admission_cpu_percent=cpu,
            admission_machine_cpu_percent=machine,
            max_sessions=max_sessions,
        )


@attrs.frozen
class Services:
    """`services:`: the settings of each kind of the registry table that has a config class
    (`gateway.adapters.registry.KINDS`), by kind: `services.voipbin` is a `VoipbinService`
    (gateway/adapters/voipbin/config.py), its defaults when the section is absent. A section
    for a kind the table lacks is an error ("unknown key")."""

    by_kind: Mapping[str, Any] = attrs.field(factory=lambda: {n: c() for n, c in service_sections().items()})
    """Kind name → its settings object."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.by_kind[name]
        except KeyError:
            raise AttributeError(f"no services section {name!r} (kinds with one: {', '.join(self.by_kind)})") from None

    @classmethod
    def from_options(cls, opts: Options) -> Services:
        result = cls({name: config.from_options(opts.sub(name)) for name, config in service_sections().items()})
        opts.finish()
        return result


@attrs.frozen
class EndpointConfig:
    """One endpoint of a route: `kind` and `role`, and its options (validated by the adapter)."""

    kind: str
    role: str
    options: Options = attrs.field(eq=False)
    where: str = ""
    """`file:line` of the endpoint, for logs and errors."""

    @property
    def path(self) -> str:
        return self.options.path


@attrs.frozen
class RouteConfig:
    """A route joins two or more endpoints (README, "Routes")."""

    name: str
    """1 to 64 of A-Z a-z 0-9 . _ - (`options.NAME_RULE`): it is in log lines, metrics labels,
    the control API's paths and its `Location` header."""
    endpoints: tuple[EndpointConfig, ...]
    jitter_ms: int = 20
    """How long past its deadline a packet waits for late audio before silence fills it."""
    max_delay_ms: int = 200
    """Audio buffered beyond this for one sink is dropped (oldest first) to bound latency."""
    restart: str = "on-failure"
    """`on-failure`: restart with backoff after an error that is not permanent; `never`."""
    reconnect_s: float = 60.0
    """How long a dial endpoint whose connection failed mid-call may take to reconnect while the
    route keeps running (README, "Reconnect"); 0: no per-endpoint reconnect."""
    on_hold: str | None = None
    """A file the others hear (looped) in place of an endpoint while it is away; None: silence."""
    where: str = ""
    source: object = attrs.field(default=None, eq=False, repr=False)
    """The route's mapping as written, for `same_as` (which compares it expanded, as plain data)."""

    def same_as(self, other: RouteConfig, services: Services, other_services: Services) -> bool:
        """True when `other` would run exactly like this route: the same mapping (after
        `${...}` expansion) and the same settings of the services its endpoints use. Line
        numbers do not count, so moving a route in the file does not restart it."""
        if _expanded(self.source, self.env, self.base_dir) != _expanded(other.source, other.env, other.base_dir):
            return False
        kinds = {e.kind for e in self.endpoints} | {e.kind for e in other.endpoints}
        return all(getattr(services, k, None) == getattr(other_services, k, None) for k in kinds)

    @property
    def env(self):
        return self.endpoints[0].options.env if self.endpoints else None

    @property
    def base_dir(self) -> str:
        """Directory relative `${file:}` references are read from (the config file's)."""
        return os.path.dirname(self.endpoints[0].options.filename) if self.endpoints else ""

    @classmethod
    def from_data(cls, data: object, origin: str, env: Mapping[str, str] | None = None) -> RouteConfig:
        """A route from JSON-like data (the control API's POST /v1/routes), validated exactly
        as in the YAML file; errors name `origin` and the key.

        Such data comes from a network client, so it may not reach the daemon's secrets: no
        `${...}` references, and no `api_url` (a route pointing at another host would send it
        the service's token); both raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: expected a route mapping {{name, endpoints: [...]}}, got {type(data).__name__}")
        route = cls.from_options(Options(data, filename=origin, env=env, references=False))
        for i, endpoint in enumerate(route.endpoints):
            if "api_url" in endpoint.options:
                raise ConfigError(f"{origin}: endpoints[{i}].{endpoint.kind}.api_url: not allowed in a route added through "
                                  "the control API (it would send the service's credentials to that host); set "
                                  f"services.{endpoint.kind}.api_url in the file")
        return route

    @classmethod
    def from_options(cls, opts: Options) -> RouteConfig:
        name = opts.get_name("name", what="route name")
        endpoints = []
        for i, item, line in opts.items("endpoints", required=True):
            path = f"{opts.key_path('endpoints')}[{i}]"
            where = f"{opts.filename}:{line}" if line else opts.filename
            if not isinstance(item, Mapping) or len(item) != 1:
                raise ConfigError(
                    f"{where}: {path}: expected a mapping with one key, the endpoint kind "
                    f"({', '.join(ENDPOINT_KINDS)}), e.g. `- voipbin: {{call_id: ...}}`"
                )
            (kind, body), = item.items()
            kind_of(kind, where, path)  # ConfigError for a kind the registry table lacks
            eopts = opts.child(body if body is not None else {}, f"{path}.{kind}", line)
            role = eopts.get_choice("role", ROLES, "dial")
            endpoints.append(EndpointConfig(kind, role, eopts, where))
        if len(endpoints) < 2:
            raise opts.error("endpoints", f"a route joins two or more endpoints, got {len(endpoints)}")
        result = cls(
            name=name,
            endpoints=tuple(endpoints),
            jitter_ms=opts.get_int("jitter_ms", 20, minimum=0, maximum=1000),
            max_delay_ms=opts.get_int("max_delay_ms", 200, minimum=20, maximum=10000),
            restart=opts.get_choice("restart", ("on-failure", "never"), "on-failure"),
            reconnect_s=opts.get_float("reconnect_s", 60.0, minimum=0.0),
            on_hold=_hold_file(opts),
            where=f"{opts.filename}:{opts.line}" if opts.line else opts.filename,
            source=opts.as_dict(),
        )
        opts.finish()
        return result


def _hold_file(opts: Options) -> str | None:
    """`on_hold: PATH`: a readable audio file (checked here, so a typo fails the config, not
    the first outage)."""
    path = opts.get_str("on_hold", None, allow_empty=False)
    if path is None:
        return None
    if "\0" in path or not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise opts.error("on_hold", f"cannot read the hold file {path!r}")
    return path


def _expanded(value: object, env: Mapping[str, str] | None, base_dir: str = "") -> object:
    """`value` as plain dicts and lists, with every `${...}` reference in its strings replaced
    (references that cannot be resolved stay as written: validation has reported them)."""
    if isinstance(value, Mapping):
        return {k: _expanded(v, env, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_expanded(v, env, base_dir) for v in value]
    if isinstance(value, str) and "${" in value:
        try:
            return expand_env(value, env, base_dir)
        except Exception:  # noqa: BLE001 - an unresolvable reference compares as written
            return value
    return value


@attrs.frozen
class GatewayConfig:
    """The whole configuration file."""

    server: ServerConfig
    services: Services
    routes: tuple[RouteConfig, ...]
    filename: str = "<config>"

    @classmethod
    def from_text(cls, text: str, filename: str = "<config>", env: Mapping[str, str] | None = None) -> GatewayConfig:
        """Parse and validate; raises ConfigError naming file, line and key."""
        data = load_yaml(text, filename)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{filename}:1: expected a mapping with server, services and routes")
        opts = Options(data, filename=filename, env=env)
        server = ServerConfig.from_options(opts.sub("server"))
        services = Services.from_options(opts.sub("services"))
        routes = []
        names: set[str] = set()
        for i, item, line in opts.items("routes"):
            route = RouteConfig.from_options(opts.child(item, f"routes[{i}]", line))
            if route.name in names:
                raise ConfigError(f"{filename}:{line}: routes[{i}].name: duplicate route name {route.name!r}")
            names.add(route.name)
            routes.append(route)
        opts.finish()
        return cls(server=server, services=services, routes=tuple(routes), filename=filename)

    @classmethod
    def load(cls, path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the configuration: {err.strerror}") from None
        return cls.from_text(text, str(path), env)
