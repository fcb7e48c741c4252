"""Configuration: YAML with line numbers, `${VAR}` expansion, typed validation.

The names below are loaded on first use (PEP 562): the schema reads the registry table of
kinds (gateway/adapters/registry.py), whose rows import each adapter's config module, which
imports `gateway.config.options`; loading the schema here eagerly would make that a cycle."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config.options import Options
    from gateway.config.schema import (
        EndpointConfig,
        GatewayConfig,
        HostPort,
        RouteConfig,
        ServerConfig,
        Services,
    )
    from gateway.config.secret import Secret

__all__ = ["EndpointConfig", "GatewayConfig", "HostPort", "Options", "RouteConfig", "Secret", "ServerConfig", "Services"]

_HOMES = {"Options": "options", "Secret": "secret"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"gateway.config.{_HOMES.get(name, 'schema')}"), name)
