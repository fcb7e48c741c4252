"""The two sockets of the listen roles: REST (`server.http`) and WebSocket media (`server.media`).

Listen endpoints register the paths they serve; the servers only route requests. HTTP is
served by hypercorn (ASGI, trio worker); media by `gateway.adapters.wsserver` (wsproto's h11
handshake, then the gateway's own framing). Both bind in `serve_*`
and report the bound port through `task_status` (bind port 0 in tests, read it back).

A handler returns an `HttpResponse`: a whole body, or a `stream` of chunks (server-sent
events: `HttpResponse.event_stream`) that runs until it ends, the client leaves, or the server
stops (the stream is cancelled then; hypercorn's `graceful_timeout` does not wait for it).

Request bodies are bounded before any handler sees them (README, "Limits"): every REST path
here takes a small JSON body, so a route accepts `MAX_JSON_BODY` bytes nested at most
`MAX_JSON_DEPTH` levels unless it says otherwise (`HttpServer.add`). A bigger body gets 413
(refused from its Content-Length before it is read when it says so), a deeper one 400, each
with a JSON error naming the cause, and one log line. Response headers are checked as well: a
value hypercorn would refuse (control characters) is dropped with a log line, never an empty 500.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import numpy as np
import trio
from trio_websocket import ConnectionClosed

from gateway._util import peer_name
from gateway.adapters.wsserver import UpgradeRequest, read_upgrade
from gateway.admission import Admission, Refusal as AdmissionRefusal

log = logging.getLogger("gateway.server")

BODY_TIMEOUT = 10.0  # seconds for a request body to arrive in full once its headers did (408)
MAX_MEDIA_MESSAGE = 2**16  # 64 KiB: far above one Opus packet (≤ 1275 B × 6) or 120 ms of PCM
WS_CONNECT_TIMEOUT = 10.0  # seconds for a client to finish the opening handshake
MAX_JSON_BODY = 2**16  # 64 KiB: a route config is ~1 KiB, a token call or a webhook well under 4 KiB
MAX_JSON_DEPTH = 32  # levels of [ and {: a route config needs 5, a VideoSDK participant's metadata a few more
MAX_DRAINED_BODY = 2**20  # 1 MiB: a too-big body up to this size is read and dropped before the 413, so
# the client (which sends its whole body before reading) gets the answer; a bigger one is refused
# from its Content-Length at once and the connection closed (unread data there resets it).


# ------------------------------------------------------------------------------ JSON bodies
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|\Z)', re.DOTALL)
"""A JSON string, escapes included, or an unterminated one up to the end: never fails from a
quote, so one pass over the body is linear (no backtracking from each later quote)."""
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deep `body` (JSON text, UTF-8) nests arrays and objects, without parsing it: strings
    removed (a regex), then every byte but brackets (bytes.translate), then the running count of
    open brackets (numpy). For malformed text, an upper bound of how deep a parser recurses
    before it finds the mistake."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    opens = brackets.count(b"[") + brackets.count(b"{")
    if opens <= 1:
        return opens
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return max(0, int(np.cumsum(steps).max()))


def json_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why `body` is refused before parsing, or None: nested deeper than `max_depth`, or not
    UTF-8 (RFC 8259 §8.1; a NUL byte, as in UTF-16, would hide brackets from `json_depth`)."""
    if b"\0" in body:
        return "body is not JSON: RFC 8259 JSON is UTF-8 text (found a NUL byte)"
    if json_depth(body) > max_depth:
        return f"JSON nested deeper than {max_depth} levels"
    return None


def _size(n: int) -> str:
    """64 KiB, 1 MiB, 500 bytes."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------------------------ HTTP
@attrs.frozen
class HttpRequest:
    method: str
    """Upper-case HTTP method."""
    path: str
    """Decoded path without the query string."""
    query: dict[str, str]
    """First value of each query parameter."""
    headers: dict[str, str]
    """Lower-case header names; the last value wins."""
    body: bytes
    params: dict[str, str]
    """Named groups of the matched route pattern."""
    client: str = ""
    """The client's IP address ("" when the server does not say)."""

    def json(self, max_depth: int = MAX_JSON_DEPTH) -> Any:
        """The body as JSON (None when empty); raises ValueError naming the cause: not UTF-8,
        malformed, or nested deeper than `max_depth` (checked before parsing)."""
        if not self.body:
            return None
        problem = json_problem(self.body, max_depth)
        if problem:
            raise ValueError(problem)
        try:
            return json.loads(self.body.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"body is not JSON: {err}") from None
        except RecursionError:  # cannot happen below max_depth; kept as the last line of defence
            raise ValueError(f"JSON nested deeper than {max_depth} levels") from None


StreamFactory = Callable[[], AsyncIterator[bytes]]
"""Makes the chunks of a streaming response; called once, when the headers have been sent."""

Scope = Mapping[str, Any]
"""An ASGI connection scope (hypercorn passes TypedDicts, which are read-only Mappings here)."""
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
"""The ASGI `receive` callable: the next event from the client."""
Send = Callable[[Any], Awaitable[None]]
"""The ASGI `send` callable: an event (a dict) to the client."""


@attrs.frozen
class HttpResponse:
    """A response: a whole `body`, or (with `stream`) a body sent chunk by chunk as it is made."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    stream: StreamFactory | None = attrs.field(default=None, kw_only=True)
    """Called once the headers are out; each chunk it yields is sent at once (no content-length:
    HTTP/1.1 chunked encoding). A client that disconnects cancels it (an async generator's
    `finally` runs then); an exception it raises is logged and drops the connection, so the
    client sees a truncated response, not a complete one."""

    def __attrs_post_init__(self) -> None:
        if self.stream is not None and self.body:
            raise ValueError("an HttpResponse has a body or a stream, not both")

    @classmethod
    def json(cls, status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
        return cls(status, json.dumps(data).encode(), "application/json", headers)

    @classmethod
    def event_stream(cls, stream: StreamFactory, headers: tuple[tuple[str, str], ...] = (), status: int = 200) -> HttpResponse:
        """Server-sent events (`text/event-stream`), never cached nor buffered by a proxy."""
        return cls(status, content_type="text/event-stream",
                   headers=(("cache-control", "no-cache"), ("x-accel-buffering", "no"), *headers), stream=stream)


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
Refusal = Callable[[int, str], HttpResponse]
"""Makes the answer to a request refused before its handler ran: (status, cause) → response,
so a service can keep its own error shape (Argon's {"error": code, "message": …})."""


def json_refusal(status: int, cause: str) -> HttpResponse:
    """The default refusal body: {"error": cause}."""
    return HttpResponse.json(status, {"error": cause})


def _compile(pattern: str) -> re.Pattern[str]:
    """`/v1.0/calls/{id}/media_stream` → a regex with named groups (one path segment each)."""
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")


@attrs.frozen(eq=False)
class _HttpRoute:
    method: str
    pattern: re.Pattern[str]
    handler: HttpHandler
    max_body: int = MAX_JSON_BODY
    """Bytes of body accepted; more get 413."""
    json_depth: int | None = MAX_JSON_DEPTH
    """Nesting a JSON body may have (400 beyond); None: the body is not JSON, not checked."""
    refuse: Refusal = json_refusal
    seat: Callable[[HttpRequest], Hashable | None] | None = None
    """For a `SESSION_PATHS` call: the seat it asks for (`gateway.admission`, "Seats"): a
    call for a seat that holds a slot already is not refused."""


_UNROUTED = _HttpRoute("", re.compile("$^"), None)  # type: ignore[arg-type]  # limits of 404/405 answers


class HttpServer:
    """A tiny ASGI router; `add(method, pattern, handler)` returns a function that removes it."""

    def __init__(self, admission: Admission | None = None) -> None:
        self._routes: list[_HttpRoute] = []
        self.port: int | None = None
        self.admission = admission or Admission(0)
        """Consulted before a handler of a `SESSION_PATHS` call runs (503 while it refuses)."""
        self._fallback: _HttpRoute | None = None

    def set_fallback(self, handler: HttpHandler, *, max_body: int = MAX_JSON_BODY) -> None:
        """Serve every request no route matches with `handler` (any method; the body is not
        checked as JSON): the supervisor's forwarding to its workers (`gateway.workers`)."""
        self._fallback = _HttpRoute("*", re.compile(""), handler, max_body, None)

    def patterns(self) -> list[tuple[str, str]]:
        """(method, regex source) of every route served, in matching order."""
        return [(route.method, route.pattern.pattern) for route in self._routes]

    def add(self, method: str, pattern: str, handler: HttpHandler, *, max_body: int = MAX_JSON_BODY,
            json_depth: int | None = MAX_JSON_DEPTH, refuse: Refusal = json_refusal,
            seat: Callable[[HttpRequest], Hashable | None] | None = None) -> Callable[[], None]:
        """Serve `method pattern` with `handler`. Its body is bounded before the handler runs:
        at most `max_body` bytes (413), JSON nested at most `json_depth` levels (400; None for a
        body that is not JSON); `refuse(status, cause)` makes those answers (and the 503 of
        admission). `seat(request)`: the admission seat a session-creating call asks for (None:
        none), so the call of a seat already admitted passes (`gateway.admission`)."""
        entry = _HttpRoute(method.upper(), _compile(pattern), handler, max_body, json_depth, refuse, seat)
        self._routes.append(entry)
        return lambda: self._routes.remove(entry) if entry in self._routes else None

    def _match(self, method: str, path: str) -> tuple[_HttpRoute | None, dict[str, str], list[str]]:
        """(route, path parameters, methods allowed on the path when the method does not match)."""
        allowed = []
        for route in list(self._routes):
            match = route.pattern.match(path)
            if not match:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            return route, match.groupdict(), []
        if self._fallback is not None:
            return self._fallback, {}, []
        return None, {}, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        what = f"{scope['method']} {scope['path']}"
        route, params, _ = self._match(scope["method"].upper(), scope["path"])
        limits = route or _UNROUTED
        with trio.move_on_after(BODY_TIMEOUT) as reading:
            body = await self._read_body(scope, receive, send, limits, what)
        if reading.cancelled_caught:  # a body that trickles or never comes holds nothing of ours
            log.info("HTTP %s from %s refused (408): the body did not arrive within %g s", what, _client(scope), BODY_TIMEOUT)
            response = limits.refuse(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s")
            await _send_response(send, attrs.evolve(response, headers=(*response.headers, ("connection", "close"))), what)
            return
        if body is None:  # refused, or the client left
            return
        if body and route is not None and route.json_depth is not None:
            problem = json_problem(body, route.json_depth)
            if problem:
                log.info("HTTP %s from %s refused (400): %s", what, _client(scope), problem)
                await _send_response(send, route.refuse(400, problem), what)
                return
        if route is not None and _creates_session(route.method, scope["path"]):
            seat = _seat_of(route.seat, _request(scope, body, params), what) if route.seat else None
            refusal = None if self.admission.seated(seat) else self.admission.check(f"{what} from {_client(scope)}")
            if refusal is not None:
                response = route.refuse(503, f"{refusal.detail}; retry in {refusal.retry_after} s")
                response = attrs.evolve(response, headers=(*response.headers, ("retry-after", str(refusal.retry_after))))
                await _send_response(send, response, what)
                return
        response = await self.dispatch(scope, body)
        if response.stream is None:
            await _send_response(send, response, what)
        else:
            await _send_stream(receive, send, response, what)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, limits: _HttpRoute, what: str) -> bytes | None:
        """The whole body, or None once a 413 was sent (or the client left). A Content-Length
        over the limit is refused before the body is read: drained first when it is small enough
        for the client to be still reading, else answered at once and the connection closed."""
        declared = _content_length(scope)
        body = bytearray()
        more = True
        if declared is None or declared <= limits.max_body:
            while more and len(body) <= limits.max_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                more = message.get("more_body", False)
            if not more and len(body) <= limits.max_body:
                return bytes(body)
        # over the limit: drop what comes, up to MAX_DRAINED_BODY in all, then answer
        received = len(body)
        del body
        if declared is not None and declared > MAX_DRAINED_BODY:
            more = True
            received = 0
        else:
            while more and received <= MAX_DRAINED_BODY:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
        cause = f"body over {_size(limits.max_body)}"
        log.info("HTTP %s from %s refused (413): %s (%s)", what, _client(scope), cause,
                 f"Content-Length {declared}" if declared is not None else f"{received} bytes or more")
        response = limits.refuse(413, cause)
        if more:  # the rest is not read: say so, hypercorn closes the connection after the answer
            response = attrs.evolve(response, headers=(*response.headers, ("connection", "close")))
        await _send_response(send, response, what)
        return None

    async def dispatch(self, scope: Scope, body: bytes) -> HttpResponse:
        path = scope["path"]
        method = scope["method"].upper()
        route, params, allowed = self._match(method, path)
        if route is not None:
            request = _request(scope, body, params)
            try:
                return await route.handler(request)
            except Exception:  # a handler bug must not kill the server; the log says where
                log.exception("HTTP handler for %s %s failed", method, path)
                return HttpResponse.json(500, {"error": "internal error"})
        if allowed:
            return HttpResponse.json(405, {"error": f"method {method} not allowed"}, (("allow", ", ".join(allowed)),))
        return HttpResponse.json(404, {"error": f"no such resource: {path}"})


SESSION_PATHS = (
    ("POST", "/IVoice/v1/StreamToken"),  # Argon: a stream token is a seat in a room (any API prefix)
    ("POST", "/v2/ingest/sessions"),  # VideoSDK: an ingest session and its wsUrl
    ("POST", "/api/v1/sdk/token"),  # agent: a single-use token for one session
)
"""REST calls that hand out a listen session (matched on the path's end, so every API prefix
counts): refused with 503 + Retry-After, in the service's error shape, while admission is
closed (gateway.admission). Calls about sessions in progress are never refused."""


def _creates_session(method: str, path: str) -> bool:
    return any(method == m and path.endswith(p) for m, p in SESSION_PATHS)


def _request(scope: Scope, body: bytes, params: dict[str, str]) -> HttpRequest:
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    return HttpRequest(scope["method"].upper(), scope["path"], query, headers, body, params, _client(scope, ""))


def _seat_of(seat: Callable[[Any], Hashable | None], request: Any, what: str) -> Hashable | None:
    """`seat(request)`; a bug in it costs the request its seat (admission then decides), not the server."""
    try:
        return seat(request)
    except Exception:
        log.exception("admission seat of %s failed", what)
        return None


def _client(scope: Scope, unknown: str = "?") -> str:
    client = scope.get("client") or ("", 0)
    return str(client[0]) or unknown


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:  # h11 refuses these before us; chunked framing then
                return None
    return None


_HEADER_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")
"""RFC 9110 §5.5 field-value as h11 checks it: no control characters, no CR or LF, no space at
either end."""


def _header(name: object, value: object, what: str) -> tuple[bytes, bytes] | None:
    """(name, value) as bytes, or None (and one log line) when hypercorn would refuse it."""
    try:
        raw = (str(name).encode("ascii"), str(value).encode())
    except UnicodeEncodeError:
        raw = None
    if raw is None or not _HEADER_NAME.fullmatch(raw[0]) or not _HEADER_VALUE.fullmatch(raw[1]):
        log.warning("HTTP %s: dropped the response header %r: control characters or spaces at either end "
                    "are not allowed in a header (a bug: the value came from somewhere unchecked)", what, str(name)[:40])
        return None
    return raw


def _headers(response: HttpResponse, what: str, *, length: bool) -> list[tuple[bytes, bytes]]:
    content_type = _header("content-type", response.content_type, what) or (b"content-type", b"application/octet-stream")
    headers = [content_type]
    if length:
        headers.append((b"content-length", str(len(response.body)).encode()))
    headers += [h for h in (_header(k, v, what) for k, v in response.headers) if h is not None]
    return headers


_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)
"""What hypercorn's `send` raises when the client closed its connection as the answer went out.
BusyResourceError too: after the body, hypercorn sends the (empty) end of the message while its
reading task, which saw the client close, shuts the socket's sending side (a race in hypercorn
0.18: a client that closes as soon as it has read a `Connection: close` answer hits it)."""


async def _send_response(send: Send, response: HttpResponse, what: str = "response") -> None:
    headers = _headers(response, what, length=True)
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
    except _CLIENT_GONE as err:
        log.debug("HTTP %s: the client left as its %d answer was sent (%s)", what, response.status, type(err).__name__)


async def _send_stream(receive: Receive, send: Send, response: HttpResponse, what: str) -> None:
    """Send `response.stream` chunk by chunk while watching `receive` for the client leaving."""
    assert response.stream is not None  # the caller sends only streaming responses here
    headers = _headers(response, what, length=False)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    disconnected = False
    completed = False

    async def cancel_on_disconnect(scope: trio.CancelScope) -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_on_disconnect, nursery.cancel_scope)
        try:
            chunks = response.stream()  # a plain function that raises here is a bug like any other
            try:
                async for chunk in chunks:
                    if not isinstance(chunk, (bytes, bytearray)):
                        raise TypeError(f"a response stream yields bytes, not {type(chunk).__name__}")
                    if chunk:
                        await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:  # an async generator left at a `yield` runs its `finally` now
                    await aclose()
            completed = True
        except Exception:  # headers are out: no 500 possible; the server carries on
            log.exception("HTTP stream for %s failed after its headers were sent; dropping the connection", what)
        nursery.cancel_scope.cancel()
    if completed and not disconnected:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    # else return without the last body: hypercorn closes the connection, so the client sees
    # a truncated response (chunked encoding without its last chunk), never a complete one


async def serve_http(app: HttpServer, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` with hypercorn on host:port; reports the bound port via task_status."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("gateway.http")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 5.0

    async def started_hook(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started_hook)
        bound = int(str(binds[0]).rsplit(":", 1)[1])
        app.port = bound
        log.info("REST listening on %s:%d", host, bound)
        task_status.started(bound)


# ----------------------------------------------------------------------------------- media
@attrs.frozen
class MediaRequest:
    """A WebSocket upgrade request routed to a listen endpoint."""

    request: UpgradeRequest
    path: str
    """Path without the query string."""
    query: dict[str, str]
    """First value of each query parameter (may hold secrets: never log it)."""
    params: dict[str, str]
    """Named groups of the matched route pattern."""
    remote: str = "?"
    """The client's `address:port`, read once at the upgrade: the socket may be gone by the
    time a log line names it (getpeername then raises ENOTCONN)."""

    async def reject(self, status: int, reason: str) -> None:
        """Refuse the upgrade with an HTTP status and a JSON body naming the cause."""
        await _reject(self.request, status, reason)


MediaHandler = Callable[[MediaRequest], Awaitable[None]]
MediaSeat = Callable[[MediaRequest], "Hashable | None"]
"""The admission seat of an upgrade (`MediaServer.add`), read before its handler runs."""


SETUPS_PER_SECOND = 50.0  # session set-ups started per second, beyond a burst of SETUP_BURST
SETUP_BURST = 10
SETUP_MAX_WAIT = 2.0  # seconds an upgrade may wait for its turn before 503


class SetupPacer:
    """Spreads session set-ups (token checks, the upgrade, a route session's start) so a
    crowd of clients arriving together cannot hold the event loop in one long stretch while
    calls are running: at most `rate` per second after a burst of `burst` (GCRA, the
    virtual-scheduling form of ITU-T I.371's cell-rate algorithm). A set-up whose turn is more
    than `max_wait` seconds away is refused instead."""

    def __init__(self, rate: float = SETUPS_PER_SECOND, burst: int = SETUP_BURST, max_wait: float = SETUP_MAX_WAIT) -> None:
        self.configure(rate, burst)
        self.max_wait = max_wait
        self._tat = -math.inf  # theoretical arrival time of the next set-up
        self.delayed = 0
        """Set-ups that waited for their turn."""
        self.refused = 0
        """Set-ups refused (503) because their turn was more than `max_wait` away."""

    def configure(self, rate: float, burst: int) -> None:
        """Set the rate (set-ups per second) and the burst; turns already given stand, and
        the counters go on (a reload). Raises ValueError for rate <= 0 or burst < 1."""
        if rate <= 0 or burst < 1:
            raise ValueError("a set-up pacer needs rate > 0 and burst >= 1")
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval

    def turn(self, now: float) -> float | None:
        """Seconds the set-up arriving `now` waits (0: at once), or None: refuse it."""
        tat = max(self._tat, now)
        wait = tat - self.tolerance - now
        if wait > self.max_wait:
            self.refused += 1
            return None
        self._tat = tat + self.interval
        if wait > 0:
            self.delayed += 1
            return wait
        return 0.0


class MediaServer:
    """Routes WebSocket upgrades to listen endpoints by path; unknown paths get 404. Set-ups
    are paced (`SetupPacer`); one refused for that gets 503 with Retry-After, as does one that
    arrives while admission is closed (`gateway.admission`: media clock behind, session cap)."""

    def __init__(self, pacer: SetupPacer | None = None, admission: Admission | None = None) -> None:
        self._routes: list[tuple[re.Pattern[str], MediaHandler, MediaSeat | None]] = []
        self.port: int | None = None
        self.pacer = pacer or SetupPacer()
        self.admission = admission or Admission(0)
        """Decides, before its set-up, whether an upgrade may start a session (503 otherwise);
        each admitted upgrade holds one of its slots (its seat's) and marks a session up
        (`Admission.stream`: the media clock ticks) while its handler runs."""

    def add(self, pattern: str, handler: MediaHandler, *, seat: MediaSeat | None = None) -> Callable[[], None]:
        """Serve upgrades whose path matches `pattern`; raises ValueError when that exact
        pattern is already served (two listen endpoints cannot share one path). `seat(request)`:
        the admission seat the upgrade belongs to (None: a session of its own); an upgrade of
        a seat that holds a slot already shares it and is not refused (`gateway.admission`)."""
        if any(p.pattern == _compile(pattern).pattern for p, _, _ in self._routes):
            raise ValueError(f"{pattern} is already served by another listen endpoint")
        entry = (_compile(pattern), handler, seat)
        self._routes.append(entry)
        return lambda: self._routes.remove(entry) if entry in self._routes else None

    def patterns(self) -> list[str]:
        """The regex source of every path served, in matching order."""
        return [pattern.pattern for pattern, _, _ in self._routes]

    async def handle(self, request: UpgradeRequest) -> None:
        """Route one upgrade; when it is over (refused, or its session ended and said its
        goodbye), the TCP connection is closed, a refused client's included."""
        try:
            await self._handle(request)
        finally:
            await trio.aclose_forcefully(request.stream)

    async def _handle(self, request: UpgradeRequest) -> None:
        remote = peer_of(request)
        try:
            parts = urlsplit(request.path)
            query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        except ValueError as err:  # e.g. "http://[::1/x": an absolute target urlsplit refuses
            log.info("media: refused upgrade from %s (400): bad request target (%s)", remote, err)
            await _reject_quietly(request, 400, "bad request target")
            return
        path = parts.path or "/"
        for pattern, handler, seat_of in list(self._routes):
            match = pattern.match(path)
            if match:
                what = f"media upgrade from {remote} on {path}"
                media_request = MediaRequest(request, path, query, match.groupdict(), remote)
                seat = _seat_of(seat_of, media_request, what) if seat_of is not None else None
                if not self.admission.seated(seat) and (refusal := self.admission.check(what)) is not None:
                    # before the pacer: costs nothing
                    await _refuse_admission(request, refusal, remote, path)
                    return
                wait = self.pacer.turn(trio.current_time())
                if wait is None:
                    log.warning("media: refused upgrade from %s on %s (503): more session set-ups than %g per "
                                "second for %g s", remote, path, 1 / self.pacer.interval, self.pacer.max_wait)
                    await _reject_quietly(request, 503, "too many sessions starting at once; retry in a second",
                                          (b"retry-after", b"1"))
                    return
                if wait:
                    await trio.sleep(wait)
                slot = self.admission.try_slot(what, seat)  # again: it may have closed while this one waited
                if isinstance(slot, AdmissionRefusal):
                    await _refuse_admission(request, slot, remote, path)
                    return
                try:
                    with slot, self.admission.stream():
                        await handler(media_request)
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                    log.info("media: connection from %s on %s lost: %s", remote, path, type(err).__name__)
                except Exception:  # a handler bug ends that connection, never the media server
                    log.exception("media handler for %s from %s failed", path, remote)
                    await _reject_quietly(request, 500, "internal error")  # when not upgraded yet
                return
        log.info("media: refused upgrade from %s: no listen endpoint at %s", remote, path)
        await MediaRequest(request, path, query, {}, remote).reject(404, f"no listen endpoint at {path}")


async def _refuse_admission(request: UpgradeRequest, refusal: AdmissionRefusal, remote: str, path: str) -> None:
    """503 + Retry-After for an upgrade admission refused (logged once per spell by Admission)."""
    log.debug("media: refused upgrade from %s on %s (503): %s", remote, path, refusal.detail)
    await _reject_quietly(request, 503, f"{refusal.detail}; retry in {refusal.retry_after} s",
                          (b"retry-after", str(refusal.retry_after).encode()))


async def _reject(request: UpgradeRequest, status: int, reason: str, *headers: tuple[bytes, bytes]) -> None:
    """Refuse an upgrade: `status` and {"error": reason} as JSON."""
    body = json.dumps({"error": reason}).encode()
    await request.reject(status, extra_headers=[(b"content-type", b"application/json"), *headers], body=body)


async def _reject_quietly(request: UpgradeRequest, status: int, reason: str, *headers: tuple[bytes, bytes]) -> None:
    """`_reject`, when the client may be gone already (then nothing happens)."""
    try:
        await _reject(request, status, reason, *headers)
    except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def peer_of(request: UpgradeRequest) -> str:
    """`address:port` of the client (read when its connection was accepted), or "?" when its
    socket was already gone then."""
    return str(request.remote)


async def serve_media(server: MediaServer, host: str, port: int, *,
                      listeners: Sequence[trio.abc.Listener[trio.SocketStream]] | None = None,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve WebSocket media on host:port; reports the bound port via task_status. With
    `listeners`, serve those instead of binding (a worker serves the connections its
    supervisor accepted and handed over: `gateway.workers`; `port` is then only reported).

    Each connection runs contained: whatever a peer makes wsproto, h11 or the framing raise (a
    header that is not ASCII, a frame over the size limit while we are closing, a request
    target urlsplit cannot parse) ends that connection with one log line, never the server,
    and its TCP connection is closed when its handling ends (a refused upgrade included)."""
    bind = listeners is None
    if listeners is None:
        tcp = await trio.open_tcp_listeners(port, host=host)
        port = tcp[0].socket.getsockname()[1]
        listeners = tcp

    async def contained(stream: trio.SocketStream) -> None:
        try:
            request = None
            with trio.move_on_after(WS_CONNECT_TIMEOUT):
                request = await read_upgrade(stream, max_message_size=MAX_MEDIA_MESSAGE)
            if request is not None:
                await server.handle(request)
        except Exception as err:  # noqa: BLE001 - the peer's bytes, not our bug (handlers log theirs)
            log.info("media: connection from %s dropped: %s", peer_name(stream), _leaf_name(err))
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, contained, listeners)
        server.port = port
        if bind:
            log.info("media listening on %s:%d", host, server.port)
        task_status.started(server.port)


def _leaf_name(err: BaseException) -> str:
    """`WsprotoLocalProtocolError: …` for the first leaf of a (nested) exception group."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    text = str(err)[:160]
    return f"{type(err).__name__}{': ' + text if text else ''}"
