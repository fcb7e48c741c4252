"""Endpoint kinds by name: builds an `Endpoint` from one `EndpointConfig`."""

from __future__ import annotations

from gateway.config.options import Options
from gateway.config.schema import EndpointConfig
from gateway.endpoint import Endpoint
from gateway.errors import ConfigError
from gateway.runtime import Runtime


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
        hears = tuple(opts.child({"h": h}, f"{opts.key_path('hears')}[{i}]", line).get_str("h", allow_empty=False)
                      for i, h, line in opts.items("hears"))
    endpoint = _build(config, runtime, name, opts)
    endpoint.hears = hears
    endpoint.identity = identity
    return endpoint


def _build(config: EndpointConfig, runtime: Runtime, name: str, opts: Options) -> Endpoint:
    kind, role = config.kind, config.role
    if kind == "voipbin":
        from gateway.adapters.voipbin.endpoint import VoipbinDial, VoipbinListen

        cls = VoipbinListen if role == "listen" else VoipbinDial
        _need_server(runtime, "media", config)
        return cls.from_config(name, opts, runtime)
    if kind == "argon":
        from gateway.adapters.argon.endpoint import ArgonDial, ArgonListen

        if role == "listen":
            _need_server(runtime, "media", config)
            _need_server(runtime, "http", config)
            return ArgonListen.from_config(name, opts, runtime)
        return ArgonDial.from_config(name, opts, runtime)
    if kind == "agent":
        from gateway.adapters.agent.endpoint import AgentDial, AgentListen

        if role == "listen":
            _need_server(runtime, "media", config)
            _need_server(runtime, "http", config)
            return AgentListen.from_config(name, opts, runtime)
        return AgentDial.from_config(name, opts, runtime)
    if kind == "videosdk":
        from gateway.adapters.videosdk.endpoint import VideosdkDial, VideosdkListen

        if role == "listen":
            _need_server(runtime, "media", config)
            _need_server(runtime, "http", config)
            return VideosdkListen.from_config(name, opts, runtime)
        return VideosdkDial.from_config(name, opts, runtime)
    if kind == "audiosocket":
        from gateway.adapters.audiosocket.endpoint import AudioSocketDial, AudioSocketListen

        if role == "listen":
            _need_server(runtime, "audiosocket", config)
            return AudioSocketListen.from_config(name, opts, runtime)
        return AudioSocketDial.from_config(name, opts, runtime)
    if kind == "twilio":
        from gateway.adapters.twilio.endpoint import TwilioDial, TwilioListen

        if role == "listen":
            _need_server(runtime, "media", config)
            return TwilioListen.from_config(name, opts, runtime)
        return TwilioDial.from_config(name, opts, runtime)
    if kind in ("file", "record"):
        from gateway.adapters.local import FileSource, Recorder

        if role != "dial":
            raise opts.error("role", f"a {kind} endpoint has no listen role")
        local = FileSource if kind == "file" else Recorder
        # `${...}` references expand here as everywhere (the local adapters take plain values)
        values = {k: opts.get_str(k) if isinstance(opts.raw(k), str) else opts.raw(k)
                  for k in list(opts.keys()) if k not in ("name", "role", "hears", "identity")}
        try:
            return local.from_config(name, values)
        except ConfigError as err:
            raise ConfigError(f"{config.where}: {config.path}: {err}") from None
    raise ConfigError(f"{config.where}: {config.path}: unknown endpoint kind {kind!r}")


def _need_server(runtime: Runtime, which: str, config: EndpointConfig) -> None:
    if config.role == "listen" and getattr(runtime.config.server, which) is None:
        raise ConfigError(f"{config.where}: {config.path}: a listen endpoint needs server.{which} (HOST:PORT)")
