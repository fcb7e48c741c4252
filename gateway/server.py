"""The two sockets of the listen roles: REST (`server.http`) and WebSocket media (`server.media`).

Listen endpoints register the paths they serve; the servers only route requests. HTTP is
served by hypercorn (ASGI, trio worker); media by trio-websocket. Both bind in `serve_*`
and report the bound port through `task_status` (bind port 0 in tests, read it back).

A handler returns an `HttpResponse`: a whole body, or a `stream` of chunks (server-sent
events: `HttpResponse.event_stream`) that runs until it ends, the client leaves, or the server
stops (the stream is cancelled then; hypercorn's `graceful_timeout` does not wait for it).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from trio_websocket import WebSocketRequest, serve_websocket

log = logging.getLogger("gateway.server")

MAX_MEDIA_MESSAGE = 2**16  # 64 KiB: far above one Opus packet (≤ 1275 B × 6) or 120 ms of PCM
WS_CONNECT_TIMEOUT = 10.0  # seconds for a client to finish the opening handshake


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

    def json(self) -> Any:
        """The body as JSON; raises ValueError with a short reason."""
        try:
            return json.loads(self.body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"body is not JSON: {err}") from None
        except RecursionError:  # e.g. 200,000 "[": the C scanner gives up before the parser does
            raise ValueError("body is not JSON: nested too deeply") from None


StreamFactory = Callable[[], AsyncIterator[bytes]]
"""Makes the chunks of a streaming response; called once, when the headers have been sent."""


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


def _compile(pattern: str) -> re.Pattern[str]:
    """`/v1.0/calls/{id}/media_stream` → a regex with named groups (one path segment each)."""
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")


class HttpServer:
    """A tiny ASGI router; `add(method, pattern, handler)` returns a function that removes it."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], HttpHandler]] = []
        self.port: int | None = None

    def add(self, method: str, pattern: str, handler: HttpHandler) -> Callable[[], None]:
        entry = (method.upper(), _compile(pattern), handler)
        self._routes.append(entry)
        return lambda: self._routes.remove(entry) if entry in self._routes else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
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
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 2**20:
                await _send_response(send, HttpResponse.json(413, {"error": "body over 1 MiB"}))
                return
            if not message.get("more_body"):
                break
        response = await self.dispatch(scope, body)
        if response.stream is None:
            await _send_response(send, response)
        else:
            await _send_stream(receive, send, response, f"{scope['method']} {scope['path']}")

    async def dispatch(self, scope: dict, body: bytes) -> HttpResponse:
        path = scope["path"]
        method = scope["method"].upper()
        allowed = []
        for m, pattern, handler in list(self._routes):
            match = pattern.match(path)
            if not match:
                continue
            if m != method:
                allowed.append(m)
                continue
            query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            client = scope.get("client") or ("", 0)
            request = HttpRequest(method, path, query, headers, body, match.groupdict(), str(client[0]))
            try:
                return await handler(request)
            except Exception:  # a handler bug must not kill the server; the log says where
                log.exception("HTTP handler for %s %s failed", method, path)
                return HttpResponse.json(500, {"error": "internal error"})
        if allowed:
            return HttpResponse.json(405, {"error": f"method {method} not allowed"}, (("allow", ", ".join(allowed)),))
        return HttpResponse.json(404, {"error": f"no such resource: {path}"})


async def _send_response(send: Callable, response: HttpResponse) -> None:
    headers = [(b"content-type", response.content_type.encode()), (b"content-length", str(len(response.body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _send_stream(receive: Callable, send: Callable, response: HttpResponse, what: str) -> None:
    """Send `response.stream` chunk by chunk while watching `receive` for the client leaving."""
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.encode(), v.encode()) for k, v in response.headers]
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

    request: WebSocketRequest
    path: str
    """Path without the query string."""
    query: dict[str, str]
    """First value of each query parameter (may hold secrets: never log it)."""
    params: dict[str, str]
    """Named groups of the matched route pattern."""

    @property
    def remote(self) -> str:
        return str(self.request.remote)

    async def reject(self, status: int, reason: str) -> None:
        """Refuse the upgrade with an HTTP status and a JSON body naming the cause."""
        body = json.dumps({"error": reason}).encode()
        await self.request.reject(status, extra_headers=[(b"content-type", b"application/json")], body=body)


MediaHandler = Callable[[MediaRequest], Awaitable[None]]


class MediaServer:
    """Routes WebSocket upgrades to listen endpoints by path; unknown paths get 404."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], MediaHandler]] = []
        self.port: int | None = None

    def add(self, pattern: str, handler: MediaHandler) -> Callable[[], None]:
        """Serve upgrades whose path matches `pattern`; raises ValueError when that exact
        pattern is already served (two listen endpoints cannot share one path)."""
        if any(p.pattern == _compile(pattern).pattern for p, _ in self._routes):
            raise ValueError(f"{pattern} is already served by another listen endpoint")
        entry = (_compile(pattern), handler)
        self._routes.append(entry)
        return lambda: self._routes.remove(entry) if entry in self._routes else None

    async def handle(self, request: WebSocketRequest) -> None:
        parts = urlsplit(request.path)
        path = parts.path or "/"
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        for pattern, handler in list(self._routes):
            match = pattern.match(path)
            if match:
                await handler(MediaRequest(request, path, query, match.groupdict()))
                return
        log.info("media: refused upgrade from %s: no listen endpoint at %s", request.remote, path)
        await MediaRequest(request, path, query, {}).reject(404, f"no listen endpoint at {path}")


async def serve_media(server: MediaServer, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve WebSocket media on host:port; reports the bound port via task_status."""
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            lambda task_status: serve_websocket(
                server.handle,
                host,
                port,
                None,
                max_message_size=MAX_MEDIA_MESSAGE,
                connect_timeout=WS_CONNECT_TIMEOUT,
                task_status=task_status,
            )
        )
        server.port = ws_server.port
        log.info("media listening on %s:%d", host, ws_server.port)
        task_status.started(ws_server.port)
