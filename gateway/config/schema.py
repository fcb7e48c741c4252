"""The configuration schema: `GatewayConfig.load(path)` and its parts.

The YAML shape is the contract (README, "Configuration"):

    server:   {http: HOST:PORT, media: HOST:PORT, media_url: ws://HOST:PORT}
    services: {argon: {...}, voipbin: {...}}
    routes:   [{name: ..., endpoints: [{KIND: {...options, role: dial|listen}}, ...]}]

Route and endpoint options are validated here (route level) and by each adapter's
`from_config` (endpoint level), all through `Options`, so every error names file:line and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import attrs

from gateway.adapters.twilio.config import TwilioService
from gateway.config.options import Options
from gateway.config.secret import Secret
from gateway.config.yaml_lines import expand_env, load_yaml
from gateway.errors import ConfigError

ENDPOINT_KINDS = ("voipbin", "argon", "agent", "videosdk", "audiosocket", "twilio", "file", "record")
ARGON_API_URL = "https://gateway.argon.zone"  # argon-voice-ws.md "Calls and events" (the seed: api.argon.gl/api/bot)
ARGON_INGRESS_PATH = "/audio/connect"
VOIPBIN_API_URL = "https://api.voipbin.net"
VIDEOSDK_API_URL = "https://api.videosdk.live"
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
    admission_lag_ms: int = 20
    """New sessions are refused (dial routes wait) while the media clock is this far behind:
    the 90th percentile of the last second's 20 ms ticks' lateness, ticked while sessions
    stream (gateway.admission); 0: never."""
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
        lag = opts.get_int("admission_lag_ms", 20, minimum=0, maximum=1000)
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
            admission_lag_ms=lag,
            max_sessions=max_sessions,
        )


@attrs.frozen
class ArgonBot:
    """One bot our Argon listen role knows (`services.argon.listen_bots[]`): the token it sends
    (`Authorization: Bot <token>`) and who it is (`GET /IBotSelf/v1/GetMe`, its identity in
    rooms, the callee of `call:` listen endpoints)."""

    token: Secret
    user_id: str
    """The bot's user id (a GUID in Argon): its identity in stream tokens and rooms."""
    bot_id: str = ""
    username: str = ""
    """Argon bot usernames end in `_bot`."""
    display_name: str = ""

    @classmethod
    def from_options(cls, opts: Options, index: int) -> ArgonBot:
        token = opts.get_str("token", secret=True, allow_empty=False)
        user_id = opts.get_str("user_id", allow_empty=False)
        username = opts.get_str("username", f"bot{index}_bot")
        result = cls(token=Secret(token), user_id=user_id, bot_id=opts.get_str("bot_id", user_id),
                     username=username, display_name=opts.get_str("display_name", username))
        opts.finish()
        return result


@attrs.frozen
class ArgonService:
    """`services.argon`: the Argon bot API (dial) and our Argon-compatible server (listen)."""

    api_url: str = ARGON_API_URL
    """Base of the bot REST API; StreamToken is POST {api_url}/IVoice/v1/StreamToken."""
    bot_token: Secret | None = None
    """`Authorization: Bot <token>` for dial endpoints."""
    ingress_path: str = ARGON_INGRESS_PATH
    """Appended to the ingressUrl from StreamToken ("" for the bare URL of the seed document)."""
    stream_token_per_minute: int = 5
    """StreamToken calls allowed per minute per bot (Argon: 5)."""
    listen_bot_tokens: tuple[Secret, ...] = ()
    """Bot tokens our listen StreamToken endpoint accepts (default: bot_token)."""
    jwt_secret: Secret | None = None
    """HS256 key for stream tokens issued by the listen role (default: random per process)."""
    listen_bots: tuple[ArgonBot, ...] = ()
    """Bots our listen role knows, with their user ids (`listen_bots: [{token, user_id, ...}]`);
    each `listen_bot_tokens` entry is a bot too, with a user id derived from its position."""
    events_per_minute: int = 5
    """Events-stream connects allowed per minute per bot (Argon: 5)."""
    calls_per_minute: int = 20
    """Calls Accept/Reject requests allowed per minute per bot (Argon: 20)."""
    max_sessions: int = 200
    """Listen role: audio WebSocket sessions served at once; more get 503, as Argon's ingress."""

    @classmethod
    def from_options(cls, opts: Options) -> ArgonService:
        bot_token = opts.get_str("bot_token", None, secret=True)
        listen_tokens = [opts.child({"t": t}, f"{opts.key_path('listen_bot_tokens')}[{i}]", line).get_str("t", secret=True)
                         for i, t, line in opts.items("listen_bot_tokens")]
        bots = [ArgonBot.from_options(opts.child(item, f"{opts.key_path('listen_bots')}[{i}]", line), i)
                for i, item, line in opts.items("listen_bots")]
        jwt_secret = opts.get_str("jwt_secret", None, secret=True)
        tokens = tuple(Secret(t) for t in listen_tokens if t)
        if not tokens and not bots and bot_token:
            tokens = (Secret(bot_token),)
        known = {b.token for b in bots}
        bots += [ArgonBot(token=t, user_id=_bot_user_id(i), username=f"bot{i}_bot", display_name=f"bot{i}_bot")
                 for i, t in enumerate(tokens) if t not in known]
        user_ids = [b.user_id for b in bots]
        if len(set(user_ids)) != len(user_ids):
            raise opts.error("listen_bots", f"two bots with the same user_id: {user_ids}")
        result = cls(
            api_url=opts.get_str("api_url", ARGON_API_URL).rstrip("/"),
            bot_token=Secret(bot_token) if bot_token else None,
            ingress_path=opts.get_str("ingress_path", ARGON_INGRESS_PATH),
            stream_token_per_minute=opts.get_int("stream_token_per_minute", 5, minimum=1),
            listen_bot_tokens=tuple(b.token for b in bots),
            jwt_secret=Secret(jwt_secret) if jwt_secret else None,
            listen_bots=tuple(bots),
            events_per_minute=opts.get_int("events_per_minute", 5, minimum=1),
            calls_per_minute=opts.get_int("calls_per_minute", 20, minimum=1),
            max_sessions=opts.get_int("max_sessions", 200, minimum=1),
        )
        opts.finish()
        return result


def _bot_user_id(index: int) -> str:
    """The user id of the `index`-th bot of `listen_bot_tokens` (stable, GUID-shaped)."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"gateway:argon-bot:{index}"))


@attrs.frozen
class VoipbinService:
    """`services.voipbin`: the VoIPBIN API (dial) and our compatible media server (listen)."""

    api_url: str = VOIPBIN_API_URL
    """Base URL; media streams are {api_url as ws/wss}/v1.0/calls/{id}/media_stream."""
    token: Secret | None = None
    """The `token=` query parameter for dial endpoints."""
    listen_tokens: tuple[Secret, ...] = ()
    """Tokens our listen media server accepts (default: token)."""

    @classmethod
    def from_options(cls, opts: Options) -> VoipbinService:
        token = opts.get_str("token", None, secret=True)
        listen_tokens = [opts.child({"t": t}, f"{opts.key_path('listen_tokens')}[{i}]", line).get_str("t", secret=True)
                         for i, t, line in opts.items("listen_tokens")]
        result = cls(
            api_url=opts.get_str("api_url", VOIPBIN_API_URL).rstrip("/"),
            token=Secret(token) if token else None,
            listen_tokens=tuple(Secret(t) for t in listen_tokens if t) or ((Secret(token),) if token else ()),
        )
        opts.finish()
        return result


def _secret_list(opts: Options, key: str) -> tuple[Secret, ...]:
    values = [opts.child({"t": t}, f"{opts.key_path(key)}[{i}]", line).get_str("t", secret=True)
              for i, t, line in opts.items(key)]
    return tuple(Secret(v) for v in values if v)


def _str_list(opts: Options, key: str) -> tuple[str, ...]:
    return tuple(opts.child({"v": v}, f"{opts.key_path(key)}[{i}]", line).get_str("v", allow_empty=False)
                 for i, v, line in opts.items(key))


@attrs.frozen
class AgentService:
    """`services.agent`: a voice-agent SDK service (dial) and our compatible server (listen).
    Spec: shared/protocols/003_300445899f8ad283.txt."""

    api_url: str | None = None
    """Base URL of the agent API; the token call is POST {api_url}/api/v1/sdk/token."""
    api_key: Secret | None = None
    """`Authorization: Bearer <api_key>` of the token call (dial)."""
    listen_api_keys: tuple[Secret, ...] = ()
    """API keys our listen token endpoint accepts (default: api_key)."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call our listen token endpoint from a browser ("*" for any)."""
    connect_timeout_s: float = 10.0
    """Seconds a dial endpoint waits for {"type":"connected"} after sending its token."""

    @classmethod
    def from_options(cls, opts: Options) -> AgentService:
        api_key = opts.get_str("api_key", None, secret=True)
        api_url = opts.get_str("api_url", None)
        result = cls(
            api_url=api_url.rstrip("/") if api_url else None,
            api_key=Secret(api_key) if api_key else None,
            listen_api_keys=_secret_list(opts, "listen_api_keys") or ((Secret(api_key),) if api_key else ()),
            cors_origins=_str_list(opts, "cors_origins"),
            connect_timeout_s=opts.get_float("connect_timeout_s", 10.0, minimum=0.1),
        )
        opts.finish()
        return result


@attrs.frozen
class VideosdkService:
    """`services.videosdk`: VideoSDK custom WebSocket ingest (dial) and our compatible server
    (listen). Spec: shared/protocols/004_c69f0f37162481c1.txt."""

    api_url: str = VIDEOSDK_API_URL
    """REST base; sessions are POST {api_url}/v2/ingest/sessions."""
    token: Secret | None = None
    """The token of the session call (dial)."""
    auth_scheme: str = "Bearer"
    """`Authorization: <auth_scheme> <token>` as the spec shows; "" sends the bare token."""
    listen_tokens: tuple[Secret, ...] = ()
    """Tokens our listen sessions endpoint accepts (default: token)."""
    webhook_public_key: str | None = None
    """PEM of the RSA key that signs lifecycle webhooks (`webhook_public_key` or
    `webhook_public_key_file`); without it POST /webhooks/videosdk is not served."""

    @classmethod
    def from_options(cls, opts: Options) -> VideosdkService:
        token = opts.get_str("token", None, secret=True)
        pem = opts.get_str("webhook_public_key", None)
        pem_file = opts.get_str("webhook_public_key_file", None)
        if pem and pem_file:
            raise opts.error("webhook_public_key_file", "set webhook_public_key or webhook_public_key_file, not both")
        if pem_file:
            try:
                with open(pem_file, encoding="ascii") as f:
                    pem = f.read()
            except (OSError, UnicodeDecodeError) as err:
                raise opts.error("webhook_public_key_file", f"cannot read {pem_file}: {err}") from None
        result = cls(
            api_url=opts.get_str("api_url", VIDEOSDK_API_URL).rstrip("/"),
            token=Secret(token) if token else None,
            auth_scheme=opts.get_str("auth_scheme", "Bearer"),
            listen_tokens=_secret_list(opts, "listen_tokens") or ((Secret(token),) if token else ()),
            webhook_public_key=pem or None,
        )
        opts.finish()
        return result


@attrs.frozen
class Services:
    argon: ArgonService = ArgonService()
    voipbin: VoipbinService = VoipbinService()
    agent: AgentService = AgentService()
    videosdk: VideosdkService = VideosdkService()
    twilio: TwilioService = TwilioService()

    @classmethod
    def from_options(cls, opts: Options) -> Services:
        result = cls(
            argon=ArgonService.from_options(opts.sub("argon")),
            voipbin=VoipbinService.from_options(opts.sub("voipbin")),
            agent=AgentService.from_options(opts.sub("agent")),
            videosdk=VideosdkService.from_options(opts.sub("videosdk")),
            twilio=TwilioService.from_options(opts.sub("twilio")),
        )
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
            if kind not in ENDPOINT_KINDS:
                raise ConfigError(f"{where}: {path}: unknown endpoint kind {kind!r}, expected one of {', '.join(ENDPOINT_KINDS)}")
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
