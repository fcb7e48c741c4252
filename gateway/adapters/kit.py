"""The adapter kit: what every service adapter shares, so a new protocol is a wire module, a
config class, its endpoints and one row of the registry table (docs/adding-an-adapter.md).

How to use the kit
------------------

1. **Declare the kind**: one `Kind` row in `gateway.adapters.registry.KINDS`::

       Kind("twilio", TwilioService, dial="gateway.adapters.twilio.endpoint:TwilioDial",
            listen="gateway.adapters.twilio.endpoint:TwilioListen", listen_servers=("media",))

   `TwilioService` (gateway/adapters/twilio/config.py) is `services.twilio`: an attrs frozen
   class with `from_options(opts)`; `opts.get_secrets("listen_tokens", (token,) if token else
   ())` is the listen role's token list. The row makes the kind a valid YAML key, adds
   `services.twilio`, and builds the endpoints with `Class.from_config(name, opts, runtime)`
   (`runtime.config.services.twilio` holds the settings).

2. **Endpoints on a WebSocket**: subclass `WsEndpoint`; once the handshake is done set
   `self.session = WsSession(ws, payload=pcm_payload, wrap=proto.media)` (dial:
   `await WsSession.dial(url, service=..., rejected={401: ("token rejected", True)}, ...)`;
   listen: the `ws` a `ListenSlot`'s `PendingSession.accept()` gives). `send()` is then done:
   it drops while there is no session, sends `wrap(payload(frame))`, counts `frames_out` /
   `bytes_out`, and counts a send on a closed connection as a drop (raising nothing: the
   reader sees the close and names the end, `session.call_ended(closed)`). Clear `self.session` when the
   session ends or a stop frame went out or came in (where it is seen: the route keeps
   sending while the session winds down). In the receive loop, `await session.refuse(err,
   self.log, "media stream")` closes with the `RemoteProtocolError`'s code; `goodbye()` is
   `await session.goodbye(proto.stop(), reason="call ended")`; `run()`'s `finally` is
   `await session.finish()`. What must go between audio frames (a DTMF packet, a mark) goes
   through `session.interleave`.

3. **REST calls**: `await post_with_retry(client, url, parse=..., what="Twilio token", log=self.log,
   json=body)`: a 429, and a 5xx that names a Retry-After, are retried per `RetryPolicy`
   (Retry-After in both its forms, RFC 9110 §10.2.3; else backoff), within a bounded total wait; `parse(status, body,
   retry_after_s)` is the wire's response parser, raising `ServiceError` (with `status`,
   `permanent`, `retry_after`) for a refusal. Errors never carry the URL's query or a header.
   A service with per-minute limits passes `limiter=` a shared `RateLimiter`.

4. **Listen role**: one `ListenService` subclass per process (`for_runtime(runtime)`) registers
   the paths on `runtime.http` / `runtime.media` and keeps the endpoints; each endpoint holds a
   `ListenSlot` (one client at a time, 409 for a second, 503 while its route is down). A
   listen role on plain TCP (AudioSocket) holds a `Handoff` of its own connection type (the
   same rules; a refusal is a `Refused(status, cause)` it answers in its protocol's way).
   `secret_in(presented, secrets)` checks a presented token in constant time. A session's
   `idle_timeout_s` is an `IdleLimit`: `with limit.scope:` around the receive loop,
   `limit.activity()` for each well-formed message, `limit.hold()` before a refusal's close.

5. **Playout, barge-in and marks**: a peer whose audio must be played at real time, with
   marks and clear (the Twilio dial role's server, a bot's text to speech faster than real
   time), goes through a `Playback` (pure: bytes in, frames due by `now` out; any fixed-size
   sample format). Toward the route, `self.route_event("clear")` drops what the route holds of
   this endpoint, `self.route_event("mark", name=...)` comes back as a ``mark-played`` route
   event once every sink has played the audio before it, and a sink whose peer buffers what it
   is sent overrides `played_mark(name, played)` (gateway/route.py, "Barge-in and marks").

The pieces live where they read best, and are re-exported here: the WebSocket session in
gateway/adapters/ws.py, the listen service and slot in gateway/adapters/listen.py, the pure
REST helpers in gateway/adapters/rest.py (wire modules import them), the table in
gateway/adapters/registry.py, the playout queue in gateway/adapters/playback.py;
`post_with_retry`, `RetryPolicy` and `RateLimiter` are here.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Any, Callable, TypeVar

import attrs
import httpx
import trio

from gateway.adapters.listen import (
    Handoff,
    IdleLimit,
    ListenService,
    ListenSlot,
    PendingSession,
    Refused,
    secret_in,
)
from gateway.adapters.playback import Playback
from gateway.adapters.registry import KINDS, Kind
from gateway.adapters.rest import body_retry_after, parse_retry_after, status_cause
from gateway.adapters.ws import (
    GOODBYE_SEND_S,
    WsEndpoint,
    WsSession,
    close_description,
    encoded_payload,
    http_to_ws,
    pcm_payload,
    redact_url,
)
from gateway.errors import ServiceError

__all__ = [
    "GOODBYE_SEND_S",
    "KINDS",
    "Handoff",
    "IdleLimit",
    "Kind",
    "ListenService",
    "ListenSlot",
    "PendingSession",
    "Playback",
    "RateLimiter",
    "Refused",
    "RetryPolicy",
    "WsEndpoint",
    "WsSession",
    "body_retry_after",
    "close_description",
    "encoded_payload",
    "http_to_ws",
    "parse_retry_after",
    "pcm_payload",
    "post_with_retry",
    "redact_url",
    "request_with_retry",
    "secret_in",
    "status_cause",
]

T = TypeVar("T")

RATE_WINDOW = 60.0  # seconds: the window of the services' per-minute limits


# ------------------------------------------------------------------------------ retry policy
@attrs.frozen
class RetryPolicy:
    """When a refused REST call is tried again: one policy for every service.

    Retried: 429 (Too Many Requests, RFC 6585 §4), and a 5xx that says when to come back
    (`Retry-After`, RFC 9110 §10.2.3 and §15.6.4: a 503 during maintenance or overload). A 5xx
    without one, any other 4xx (the request or its credentials are wrong) and a network
    failure are raised at once: the route's own restart and reconnect backoff retries the
    whole endpoint, and two layers of blind retries would multiply the load on a failing
    service. The wait is what the service asked for (`Retry-After` in either form, else a
    retry hint its wire parser found in the body), else (a 429 that names none) `backoff_s`
    doubling per retry up to `max_backoff_s`. At most `retries` retries, and
    `max_total_wait_s` seconds of waiting in all: a wait that would go past it is not made,
    and the last refusal is raised (the route then backs off)."""

    retries: int = 5
    """Retries after the first attempt."""
    backoff_s: float = 1.0
    """First wait (seconds) when the service named none; doubles with each retry."""
    max_backoff_s: float = 30.0
    """Longest such wait (seconds)."""
    max_total_wait_s: float = 120.0
    """All the waits of one call together (seconds): two per-minute windows."""

    def wait_s(self, status: int | None, attempt: int, asked_s: float | None) -> float | None:
        """Seconds to wait before retry number `attempt` (0 for the first) of a call refused
        with `status`, the service having asked for `asked_s` (None: it did not); None: do not
        retry (the count and total-wait bounds are the caller's)."""
        if status == 429 or (status is not None and 500 <= status < 600 and asked_s is not None):
            return asked_s if asked_s is not None else min(self.backoff_s * 2**attempt, self.max_backoff_s)
        return None


DEFAULT_POLICY = RetryPolicy()


async def request_with_retry(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    parse: Callable[[int, bytes, float | None], T],
    what: str,
    log: logging.Logger | logging.LoggerAdapter,
    headers: dict[str, str] | None = None,
    json: Any = None,
    content: bytes | None = None,
    limiter: RateLimiter | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> T:
    """One REST call to a service, a 429 (or a 5xx with Retry-After) retried per `policy`;
    returns what `parse` returns.

    `parse(status, body, retry_after_s)` is the wire module's response parser: it returns the
    result of a success and raises `ServiceError` (with `status`, `permanent`, `retry_after`)
    for a refusal; `retry_after_s` is the response's ``Retry-After`` in seconds (both forms of
    RFC 9110 §10.2.3, `parse_retry_after`; None without one). `limiter`, when given, is
    acquired before every attempt, and a wait goes through it (`RateLimiter.back_off`), so the
    other callers sharing it wait too. Each retry logs one warning: "`what`: rate limited;
    retrying in 3 s" (or "HTTP 503"). A network failure raises ServiceError "`what`: cannot
    reach URL: ConnectError" (URL without its query or userinfo). Nothing here puts a header
    or a body in a message: the parser's messages are the wire module's, which never quote a
    secret.
    """
    waited = 0.0
    for attempt in itertools.count():
        if limiter is not None:
            await limiter.acquire()
        try:
            response = await client.request(method, url, headers=headers, json=json, content=content)
        except httpx.HTTPError as err:
            raise ServiceError(f"{what}: cannot reach {redact_url(url)}: {err.__class__.__name__}") from None
        header_s = parse_retry_after(response.headers.get("retry-after"), now=time.time())
        try:
            return parse(response.status_code, response.content, header_s)
        except ServiceError as err:
            wait = policy.wait_s(err.status, attempt, header_s if header_s is not None else err.retry_after)
            if wait is None or attempt >= policy.retries or waited + wait > policy.max_total_wait_s:
                raise
            cause = "rate limited" if err.status == 429 else f"HTTP {err.status}"
            log.warning("%s: %s; retrying in %g s", what, cause, wait)
            waited += wait
            if limiter is not None:
                limiter.back_off(wait)  # the next acquire() waits for it
            else:
                await trio.sleep(wait)
    raise AssertionError("unreachable")


async def post_with_retry(client: httpx.AsyncClient, url: str, **kwargs: Any) -> Any:
    """`request_with_retry(client, "POST", url, **kwargs)`: the token and session calls."""
    return await request_with_retry(client, "POST", url, **kwargs)


# ------------------------------------------------------------------------------ rate limiter
class RateLimiter:
    """At most `per_window` calls in any `window` seconds (a sliding window), on the trio clock
    (MockClock tests control it).

    Dial side: `await acquire()` waits its turn, first come first served, and `back_off(s)`
    holds every caller for `s` seconds (the service said 429). Listen side: `try_acquire()`
    admits a call now or says how long to wait (the 429's Retry-After). One limiter per
    credential and API (`Runtime.singleton`), shared by every route that uses them;
    `per_window` may be changed at any time (a reload)."""

    def __init__(self, per_window: int, window: float = RATE_WINDOW) -> None:
        self.per_window = per_window
        self.window = window
        self._calls: collections.deque[float] = collections.deque()
        self._blocked_until = 0.0
        self._lock = trio.Lock()  # fair: waiters go in arrival order

    def wait_s(self, now: float) -> float:
        """Seconds from `now` until a call may go (0: at once)."""
        calls = self._calls
        while calls and calls[0] <= now - self.window:
            calls.popleft()
        wake = self._blocked_until
        if len(calls) >= self.per_window:
            wake = max(wake, calls[0] + self.window)
        return max(0.0, wake - now)

    def try_acquire(self) -> float | None:
        """Count a call now and return None, or return the seconds until one may go."""
        now = trio.current_time()
        wait = self.wait_s(now)
        if wait > 0:
            return wait
        self._calls.append(now)
        return None

    async def acquire(self) -> None:
        """Wait until a call may go, then count it."""
        async with self._lock:
            while (wait := self.try_acquire()) is not None:
                await trio.sleep_until(trio.current_time() + wait)

    def back_off(self, seconds: float) -> None:
        """The service said 429: no call for `seconds`."""
        self._blocked_until = max(self._blocked_until, trio.current_time() + seconds)
