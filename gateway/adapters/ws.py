"""WebSocket plumbing shared by the adapters: dialing with errors translated at the boundary,
closing with a code and reason, and the message loop's error handling."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection

from gateway._util import goodbye_scope
from gateway.adapters.wsclient import ClientWebSocket, connect
from gateway.errors import RemoteProtocolError, ServiceError
from gateway.logs import install_redaction

install_redaction()

WebSocket = WebSocketConnection | ClientWebSocket  # a listen role's connection, or a dial role's

CONNECT_TIMEOUT = 10.0  # seconds for TCP + TLS + the opening handshake
MAX_MESSAGE = 2**16  # 64 KiB: the largest media message any of our protocols sends


def redact_url(url: str) -> str:
    """The URL without its query string (which carries tokens), for logs and errors."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def http_to_ws(url: str) -> str:
    """http://… → ws://…, https://… → wss://…; ws/wss unchanged."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


async def dial(
    nursery: trio.Nursery | None,
    url: str,
    *,
    service: str,
    rejected: dict[int, tuple[str, bool]] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> ClientWebSocket:
    """Open a client WebSocket (`gateway.adapters.wsclient`: no reader task, so `nursery` is
    not used; it stays in the signature for the callers that own the connection's scope).

    Raises ServiceError naming the service and the cause: a refused upgrade maps its status
    through `rejected` ({status: (cause, permanent)}); timeouts and network errors are not
    permanent. The URL's query (tokens) never appears in the error.
    """
    safe = redact_url(url)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await connect(url, max_message_size=MAX_MESSAGE, extra_headers=extra_headers)
    except trio.TooSlowError:
        raise ServiceError(f"{service}: no answer from {safe} within {CONNECT_TIMEOUT:g} s") from None
    except ConnectionRejected as err:
        cause, permanent = (rejected or {}).get(err.status_code, (f"upgrade refused with HTTP {err.status_code}", False))
        detail = _body_reason(err.body)
        message = f"{service}: {safe} refused the connection: {cause} (HTTP {err.status_code}{'; ' + detail if detail else ''})"
        raise ServiceError(message, status=err.status_code, permanent=permanent) from None
    except (OSError, HandshakeError) as err:
        raise ServiceError(f"{service}: cannot connect to {safe}: {err.__class__.__name__}: {err}") from None


def _body_reason(body: bytes | None) -> str:
    """A short printable reason from a rejection body (JSON `error`/`message` or text)."""
    if not body:
        return ""
    import json

    try:
        data = json.loads(body)
        if isinstance(data, dict):
            text = str(data.get("error") or data.get("message") or "")
        else:
            text = ""
    except (ValueError, UnicodeDecodeError):
        text = body[:120].decode("utf-8", "replace")
    return text[:120]


async def close(ws: WebSocket, code: int = 1000, reason: str | None = None) -> None:
    """Close with `code`/`reason`, best effort, shielded and bounded (so a goodbye survives a
    cancelled route). The reason is cut to the 123 bytes RFC 6455 §5.5.1 allows."""
    if reason is not None:
        reason = reason.encode()[:123].decode("utf-8", "ignore")
    with goodbye_scope(2.0):
        try:
            await ws.aclose(code, reason)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def refuse(ws: WebSocket, err: RemoteProtocolError, log: logging.LoggerAdapter | logging.Logger,
                 what: str, farewell: str | None = None) -> None:
    """Close `ws` because the peer broke the protocol: one warning "closing the {what} (code):
    cause", then `farewell` (the protocol's own error message, if it has one), then the close
    frame with `err.close_code` and the cause as reason. The caller re-raises `err`."""
    log.warning("closing the %s (%d): %s", what, err.close_code, err)
    if farewell is not None:
        await send_quietly(ws, farewell)
    await close(ws, err.close_code, str(err))


async def send_quietly(ws: WebSocket, message: str | bytes, timeout: float = 1.0) -> None:
    """Send one message, bounded; a peer already gone is not an error here (goodbyes, error
    frames before a close)."""
    with trio.move_on_after(timeout):
        try:
            await ws.send_message(message)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class Closing:
    """Lets `goodbye()` finish a close handshake that `run()` must not cut short.

    A dial endpoint's connection reader runs in the endpoint's own nursery; when goodbye()
    closes the socket, run() sees ConnectionClosed at once and would cancel that nursery (and
    the reader) before the peer's close frame arrives. run() calls `await settle()` first.
    """

    def __init__(self) -> None:
        self.started = False
        self._done = trio.Event()

    async def close(self, ws: WebSocket, code: int = 1000, reason: str | None = None) -> None:
        self.started = True
        try:
            await close(ws, code, reason)
        finally:
            self._done.set()

    async def settle(self, timeout: float = 2.0) -> None:
        if self.started:
            with goodbye_scope(timeout):
                await self._done.wait()


def close_description(exc: ConnectionClosed) -> str:
    """'closed (1000 normal)' / 'closed without a close frame (1006)'."""
    reason = exc.reason
    if reason is None:
        return "closed"
    if reason.code == 1006:
        return "closed without a close frame (1006)"
    text = f"closed ({reason.code}"
    if reason.reason:
        text += f" {reason.reason}"
    return text + ")"


def endpoint_logger(kind: str) -> logging.Logger:
    return logging.getLogger(f"gateway.endpoint.{kind}")
