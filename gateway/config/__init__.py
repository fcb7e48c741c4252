"""Configuration: YAML with line numbers, `${VAR}` expansion, typed validation."""

from gateway.config.options import Options
from gateway.config.schema import (
    ArgonService,
    EndpointConfig,
    GatewayConfig,
    HostPort,
    RouteConfig,
    ServerConfig,
    Services,
    VoipbinService,
)
from gateway.config.secret import Secret

__all__ = [
    "ArgonService",
    "EndpointConfig",
    "GatewayConfig",
    "HostPort",
    "Options",
    "RouteConfig",
    "Secret",
    "ServerConfig",
    "Services",
    "VoipbinService",
]
