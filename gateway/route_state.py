"""The state of the gateway's routes, as the daemon keeps it and the control API reads it.

Its own module so that `gateway.control` reads it without importing `gateway.daemon` (which
installs the control API): the two no longer import each other.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import attrs
import trio

from gateway.config.schema import RouteConfig
from gateway.route import Route

if TYPE_CHECKING:
    from gateway.adapters.argon.dial import CallLine

class RouteStatus(enum.StrEnum):
    """A configured route's state (control API `state`, `gateway_route_up`). A StrEnum: it
    compares equal to, and serializes as, its string (README, "Control API")."""

    STARTING = "starting"
    """Connecting its endpoints (a dial route's first session, or a restart's)."""
    UP = "up"
    """Every endpoint connected; audio flows."""
    WAITING = "waiting"
    """A listen route between sessions (or a call desk with no call): waiting for a client."""
    HELD = "held"
    """A dial route that admission holds back (the gateway is at capacity); `reason` says why."""
    RESTARTING = "restarting"
    """Failed; restarting after its backoff."""
    ENDED = "ended"
    """A session ended and the route will not run again (its source ended, the far side hung up)."""
    FAILED = "failed"
    """Failed for good (a permanent error, or out of restarts)."""
    STOPPED = "stopped"
    """Stopped (gateway stop, reload, DELETE)."""


READY_STATES = (RouteStatus.UP, RouteStatus.WAITING, RouteStatus.ENDED)
"""Route states in which a route counts as ready (`/readyz`, systemd READY)."""


@attrs.define
class RouteState:
    config: RouteConfig
    route: Route
    state: RouteStatus = RouteStatus.STARTING
    last_error: str = ""
    reason: str = ""
    """Why the route is `held`: `waiting: gateway at capacity (media clock 34 ms behind)`."""
    restarts: int = 0
    sessions_done: trio.Event = attrs.Factory(trio.Event)
    """Set when a session of the route ended (normally or not)."""
    finished: trio.Event = attrs.Factory(trio.Event)
    """Set when the route will not run again (ended, failed for good, stopped)."""
    pause: trio.CancelScope | None = None
    """The backoff sleep between restarts (or the wait of a held route), cancelled by a stop."""
    origin: str = "file"
    """"file" (the YAML configuration) or "api" (POST /v1/routes)."""
    removed: bool = False
    """Set when the route is being removed (reload, DELETE): it will not run again."""
    since: float = attrs.Factory(time.time)
    """Wall-clock time (Unix seconds) the route entered its current `state`."""
    calls: dict[str, Route] = attrs.Factory(dict)
    """A route that answers calls (`argon` `calls: incoming`): the session of each call in
    progress, by call id. They share `route`'s counters (`route` itself never runs)."""
    line: CallLine | None = None
    """Its place at the bot's call desk, while it takes calls."""

    @property
    def has_listen(self) -> bool:
        """The route waits for someone (a listen client, a call) before each session."""
        return any(e.role == "listen" for e in self.config.endpoints) or self.takes_calls

    @property
    def takes_calls(self) -> bool:
        return any(getattr(e, "calls", None) is not None for e in self.route.endpoints)

    def stop_calls(self) -> None:
        """Stop taking calls and end the calls in progress (goodbyes, close codes)."""
        if self.line is not None:
            self.line.close()
        for call in list(self.calls.values()):
            call.stop()

    def enter(self, state: RouteStatus) -> None:
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
