"""The listen roles' kit: `ListenService` (one per kind and process: the paths it serves and
its endpoints), `Handoff` (the hand-off of accepted sessions from a server's task to a listen
endpoint; `ListenSlot` for WebSocket upgrades), `secret_in` (a presented token checked in
constant time) and `IdleLimit` (a session's `idle_timeout_s`).

The media server runs each upgrade in a handler task that must live as long as the
connection; the endpoint's `run()` runs in its route's nursery. A `ListenSlot` joins the two:
the handler offers the request (waiting a bounded time for the route to take it), the endpoint
takes it, accepts the upgrade and streams; when the session ends the handler returns.
"""

from __future__ import annotations

import hmac
import math
from typing import TYPE_CHECKING, Any, Generic, Iterable, Protocol, Self, TypeVar

import attrs
import trio

from gateway.adapters.wsclient import FramedWebSocket as WebSocketConnection
from gateway.config.secret import Secret
from gateway.server import MediaRequest

if TYPE_CHECKING:
    from gateway.runtime import Runtime

OFFER_TIMEOUT = 10.0  # seconds an upgrade waits for its route to take it before 503
BUSY_WAIT = 1.0  # seconds a client arriving during another's session waits for it to end before 409

C = TypeVar("C")
"""What a listen endpoint's handler hands over with each request (`PendingSession.context`)."""


@attrs.define(eq=False)
class PendingSession(Generic[C]):
    request: MediaRequest
    context: C
    """What the handler already validated (parsed params, token grant...)."""
    finished: trio.Event = attrs.Factory(trio.Event)
    ws: WebSocketConnection | None = None

    async def accept(self) -> WebSocketConnection:
        """Accept the upgrade (once; later calls return the same connection)."""
        if self.ws is None:
            self.ws = await self.request.request.accept()
        return self.ws


class Finishes(Protocol):
    finished: trio.Event
    """Set by the endpoint when it is done with the session (the server's task then returns)."""


T = TypeVar("T", bound=Finishes)


@attrs.frozen
class Refused:
    """Why a hand-over was refused: the HTTP status a WebSocket upgrade gets, and the cause."""

    status: int
    cause: str


class Handoff(Generic[T]):
    """One session at a time for one listen endpoint: the server's task of an accepted
    connection hands it over (`hand_over`), the endpoint's `run()` takes it (`take`).

    Shared by the WebSocket listen roles (`ListenSlot`, which turns a refusal into the
    upgrade's HTTP status) and the TCP ones (AudioSocket, which hangs up with the cause in
    its log line). `noun` names what a second arrival finds there ("client", "call").
    """

    def __init__(self, label: str, noun: str = "client") -> None:
        self.label = label
        self.noun = noun
        self._send, self._recv = trio.open_memory_channel[T](0)
        self._current: T | None = None

    @property
    def busy(self) -> bool:
        """A session is running (from the moment the endpoint took it until it set
        `finished`: a client reconnecting right after never sees a stale 409)."""
        return self._current is not None and not self._current.finished.is_set()

    async def hand_over(self, session: T) -> Refused | None:
        """Called in the server's task of the session; returns None when the session is over,
        or at once with the refusal: 409 busy, 503 the route is not running.

        A session that arrives while another runs waits up to `BUSY_WAIT` for it to end (a
        session a broken client held for a few ms must not turn an honest client away), then
        is refused. The slot is claimed before the route takes the session, so of two arriving
        together one is served and the other refused, never both queued; one the route does
        not take within `OFFER_TIMEOUT` is refused."""
        if self.busy:
            with trio.move_on_after(BUSY_WAIT):
                while self._current is not None and not self._current.finished.is_set():
                    await self._current.finished.wait()
        if self.busy:
            return Refused(409, f"{self.label} already has a connected {self.noun}")
        self._current = session
        try:
            try:
                with trio.fail_after(OFFER_TIMEOUT):
                    await self._send.send(session)
            except trio.TooSlowError:
                return Refused(503, f"{self.label} is not running (its route is down)")
            await session.finished.wait()
            return None
        finally:
            if self._current is session:
                self._current = None

    async def take(self) -> T:
        """Called in the endpoint's run(): the next session handed over."""
        return await self._recv.receive()


class ListenSlot(Handoff[PendingSession[C]]):
    """A `Handoff` of WebSocket upgrades: a refused one gets its HTTP status (409, 503)."""

    async def offer(self, request: MediaRequest, context: C) -> None:
        """Called in the media server's handler task; returns when the session is over (or
        refused: `Handoff.hand_over`)."""
        refused = await self.hand_over(PendingSession(request, context))
        if refused is not None:
            await request.reject(refused.status, refused.cause)


def secret_in(presented: str | None, secrets: Iterable[Secret | str]) -> bool:
    """Whether `presented` (a token or API key a client sent) is one of `secrets`, each
    compared in constant time (`hmac.compare_digest`); False for None or an empty list. A
    presented value that is not valid UTF-8 text (a lone surrogate) still compares."""
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogatepass")
    return any(hmac.compare_digest(given, (s.reveal() if isinstance(s, Secret) else s).encode()) for s in secrets)


class ListenService:
    """The listen role of one kind in one gateway process: the REST and WebSocket paths it
    serves on `runtime.http` / `runtime.media` (the subclass registers them in its
    `__init__`, after `super().__init__(runtime)`), and its endpoints, kept as the kind needs
    them (a list, by room, by channel: `add` / `remove` from the endpoints' `from_config` /
    `detach`).

    One per runtime: `for_runtime(runtime)`. Its settings are read from the running config on
    each request (`settings`: `services.<kind>`), so a reload applies at once."""

    kind: str = ""
    """The registry kind whose `services:` section `settings` reads."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> Self:
        """The process's service of this class, created (and its paths registered) on first use."""
        service: Self = runtime.singleton(cls, lambda: cls(runtime))
        return service

    @property
    def settings(self) -> Any:
        """`services.<kind>` of the running config."""
        return getattr(self.runtime.config.services, self.kind)


class IdleLimit:
    """The idle limit of one session's receive loop: `scope` (a `trio.CancelScope`, entered
    around the loop) expires `idle` seconds (trio time) after the limit was made or after the
    last `activity()`, whichever is later; `idle` <= 0: no limit.

    After the `with limit.scope:` block, `expired` says that the limit ended it. `hold()` lifts
    the limit while the loop awaits something other than its peer, such as closing the
    connection over a protocol error. It is one scope per session, and its deadline is moved
    exactly by each activity: the limit never ends a session before `idle` seconds of silence
    (the listen endpoints' `idle_timeout_s`)."""

    __slots__ = ("idle", "scope")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.scope = trio.CancelScope(deadline=trio.current_time() + idle if idle > 0 else math.inf)

    def activity(self, now: float | None = None) -> None:
        """A well-formed message (or frame) came at trio time `now` (default: the current
        time, read only when there is a limit): the limit is `idle` s from then."""
        if self.idle > 0:
            self.scope.deadline = (trio.current_time() if now is None else now) + self.idle

    def hold(self) -> None:
        """No limit from now on (this session)."""
        self.scope.deadline = math.inf

    @property
    def expired(self) -> bool:
        return self.scope.cancelled_caught

