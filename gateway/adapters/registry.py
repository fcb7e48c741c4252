"""The table of endpoint kinds, and `build_endpoint`: one `EndpointConfig` -> one `Endpoint`.

`KINDS` is the one place a kind is declared (docs/adding-an-adapter.md). A row names:

- `name`: the YAML key of the endpoint (`- voipbin: {...}`) and of its `services:` section;
- `config`: the class of `services.<name>` (`VoipbinService`, in the adapter's package:
  `gateway/adapters/voipbin/config.py`), with `from_options(opts)`; None for a kind without
  one (file, record);
- `dial` / `listen`: the endpoint classes of each role, as "module:Class" (imported when the
  first endpoint of that kind is built, so loading a config imports no adapter's I/O code);
  None for a role the kind does not have;
- `listen_servers`: the `server:` sockets a listen endpoint needs, by their key ("media":
  WebSocket media, "http": REST; a kind that brings a socket of its own adds its key to
  `ServerConfig`); building one without them is a ConfigError naming the key.

From the table come `ENDPOINT_KINDS` (the kinds the config schema accepts), `Services` (one
field per row with a `config`, gateway/config/schema.py) and `build_endpoint`.

Endpoint classes build themselves with `from_config(name, opts, runtime)` (or the classmethod
the row names in `constructor`), validating their options through `opts` so every error names
file:line and key.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import attrs

from gateway.adapters.agent.config import AgentService
from gateway.adapters.argon.config import ArgonService
from gateway.adapters.twilio.config import TwilioService
from gateway.adapters.videosdk.config import VideosdkService
from gateway.adapters.voipbin.config import VoipbinService
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config.options import Options
    from gateway.config.schema import EndpointConfig
    from gateway.endpoint import Endpoint
    from gateway.runtime import Runtime

@attrs.frozen
class Kind:
    """One row of `KINDS`: an endpoint kind (module doc)."""

    name: str
    """The YAML key: `- NAME: {...}` in a route, `services.NAME` for its settings."""
    config: type | None = None
    """Class of `services.NAME` (attrs, frozen, `from_options(opts)`), None: no section."""
    dial: str | None = None
    """"module:Class" of the dial role (also the role of local endpoints), None: none."""
    listen: str | None = None
    """"module:Class" of the listen role, None: none."""
    listen_servers: tuple[str, ...] = ()
    """The `server:` keys a listen endpoint needs, e.g. ("media", "http")."""
    constructor: str = "from_config"
    """The classmethod that builds an endpoint: `(name, opts, runtime) -> Endpoint`."""

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this kind has: ("dial", "listen"), ("dial",) ..."""
        return tuple(role for role in ("dial", "listen") if getattr(self, role) is not None)

    def endpoint_class(self, role: str) -> type:
        """The endpoint class of `role` (imported now); ValueError for a role it lacks."""
        target = getattr(self, role, None)
        if target is None:
            raise ValueError(f"a {self.name} endpoint has no {role} role")
        module, _, cls = target.partition(":")
        return getattr(importlib.import_module(module), cls)


KINDS: tuple[Kind, ...] = (
    Kind("voipbin", VoipbinService, dial="gateway.adapters.voipbin.endpoint:VoipbinDial",
         listen="gateway.adapters.voipbin.endpoint:VoipbinListen", listen_servers=("media",)),
    Kind("argon", ArgonService, dial="gateway.adapters.argon.endpoint:ArgonDial",
         listen="gateway.adapters.argon.endpoint:ArgonListen", listen_servers=("media", "http")),
    Kind("agent", AgentService, dial="gateway.adapters.agent.endpoint:AgentDial",
         listen="gateway.adapters.agent.endpoint:AgentListen", listen_servers=("media", "http")),
    Kind("videosdk", VideosdkService, dial="gateway.adapters.videosdk.endpoint:VideosdkDial",
         listen="gateway.adapters.videosdk.endpoint:VideosdkListen", listen_servers=("media", "http")),
    Kind("audiosocket", dial="gateway.adapters.audiosocket.endpoint:AudioSocketDial",
         listen="gateway.adapters.audiosocket.endpoint:AudioSocketListen", listen_servers=("audiosocket",)),
    Kind("twilio", TwilioService, dial="gateway.adapters.twilio.endpoint:TwilioDial",
         listen="gateway.adapters.twilio.endpoint:TwilioListen", listen_servers=("media",)),
    Kind("file", dial="gateway.adapters.local:FileSource", constructor="from_options"),
    Kind("record", dial="gateway.adapters.local:Recorder", constructor="from_options"),
)
"""Every endpoint kind, in the order error messages list them."""

ENDPOINT_KINDS: tuple[str, ...] = tuple(k.name for k in KINDS)
"""The kinds a route's endpoint may be (`- KIND: {...}`)."""

_BY_NAME = {k.name: k for k in KINDS}


def kind_of(name: str, where: str = "", path: str = "") -> Kind:
    """The row of kind `name`; ConfigError "`where`: `path`: unknown endpoint kind 'x',
    expected one of voipbin, argon, ..." for a name the table lacks."""
    try:
        return _BY_NAME[name]
    except KeyError:
        prefix = ": ".join(p for p in (where, path) if p)
        raise ConfigError(f"{prefix + ': ' if prefix else ''}unknown endpoint kind {name!r}, "
                          f"expected one of {', '.join(ENDPOINT_KINDS)}") from None


def service_sections() -> dict[str, Any]:
    """`services:` sections by name: the rows with a `config` class."""
    return {k.name: k.config for k in KINDS if k.config is not None}


def build_endpoint(config: EndpointConfig, runtime: Runtime, default_name: str) -> Endpoint:
    """Validate the endpoint's options and construct it; raises ConfigError (file:line, key).

    Options every kind takes: `name` (unique in the route; default the kind), `role`, `hears`
    (names of the endpoints whose audio this one takes; default all the others) and `identity`
    (who it is as a participant of a room, e.g. an Argon listen channel; default its name)."""
    opts = config.options
    name = opts.get_name("name", default_name, what="endpoint name")
    identity = opts.get_str("identity", name, allow_empty=False)
    hears = None
    if "hears" in opts:
        hears = opts.get_str_list("hears")
    endpoint = _build(config, runtime, name, opts)
    endpoint.hears = hears
    endpoint.identity = identity
    return endpoint


def _build(config: EndpointConfig, runtime: Runtime, name: str, opts: Options) -> Endpoint:
    row = kind_of(config.kind, config.where, config.path)
    if config.role not in row.roles:
        raise opts.error("role", f"a {row.name} endpoint has no {config.role} role")
    if config.role == "listen":
        for server in row.listen_servers:
            if getattr(runtime.config.server, server, None) is None:
                raise ConfigError(f"{config.where}: {config.path}: a listen endpoint needs server.{server} (HOST:PORT)")
    cls: Any = row.endpoint_class(config.role)
    return getattr(cls, row.constructor)(name, opts, runtime)
