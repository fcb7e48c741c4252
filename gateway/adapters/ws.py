"""WebSocket plumbing shared by the adapters (the adapter kit's session helper, see
gateway/adapters/kit.py): dialing with errors translated at the boundary, closing with a code
and reason, the message loop's error handling, and `WsSession` / `WsEndpoint`: one
connection of an endpoint, and the one `send()` every WebSocket endpoint shares."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from gateway._util import goodbye_scope
from gateway.adapters.rest import parse_retry_after
from gateway.adapters.wsclient import ClientWebSocket, connect
from gateway.codecs.formats import AudioFrame, EncodedFrame
from gateway.endpoint import Endpoint, FrameT
from gateway.errors import CallEnded, CloseCode, RemoteProtocolError, ServiceError
from gateway.logs import install_redaction

install_redaction()

WebSocket = ClientWebSocket  # a listen role's connection (gateway.adapters.wsserver) or a dial role's: one framing

CONNECT_TIMEOUT = 10.0  # seconds for TCP + TLS + the opening handshake
GOODBYE_SEND_S = 0.5  # seconds for a protocol's farewell frame (stop, hangup) before the close handshake
MAX_MESSAGE = 2**16  # 64 KiB: the largest media message any of our protocols sends


def redact_url(url: str) -> str:
    """The URL without its query string (which carries tokens) and its userinfo (`user:pass@`),
    for logs and errors."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


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
    through `rejected` ({status: (cause, permanent)}) and carries its Retry-After (seconds, as
    `retry_after`: the daemon waits at least that before the route's next start); timeouts and
    network errors are not permanent. The URL's query (tokens) never appears in the error.
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
        header = next((value for name, value in err.headers or () if name.lower() == b"retry-after"), None)
        retry_after = parse_retry_after(header.decode("latin-1") if header is not None else None, now=time.time())
        raise ServiceError(message, status=err.status_code, permanent=permanent, retry_after=retry_after) from None
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


async def close(ws: WebSocket, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
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

    async def close(self, ws: WebSocket, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
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
    if reason.code == CloseCode.ABNORMAL:
        return "closed without a close frame (1006)"
    text = f"closed ({reason.code}"
    if reason.reason:
        text += f" {reason.reason}"
    return text + ")"


def endpoint_logger(kind: str) -> logging.Logger:
    return logging.getLogger(f"gateway.endpoint.{kind}")


# ------------------------------------------------------------------------------ the session
Interleave = Callable[["WsSession", Any], Awaitable[Any]]
"""`await interleave(session, frame)`: send what must go before this slot's audio (a DTMF
packet, a mark) and return the frame to send in the slot, or None when the slot is taken."""


class WsSession(Generic[FrameT]):
    """One WebSocket connection of an endpoint, from dial (or accept) to close: what its
    `send()` needs per frame, and its goodbye.

    Per-frame fields, set once per connection (`WsEndpoint.send` reads them; no lookup or
    allocation per frame beyond what the wire's own builder does):

    - `payload(frame) -> bytes`: the payload of one egress frame, the bytes counted in
      `stats.bytes_out` (PCM16 LE for a PCM sink: `pcm_payload`; an Opus packet:
      `encoded_payload`; u-law after an encoder);
    - `wrap(payload) -> str | bytes`: the wire's message for one payload (the media frame,
      the RTP packet), None when the payload is the message (one Opus packet per message);
    - `interleave`: None, or the coroutine that goes before the next slot's audio (module
      `Interleave`); set it when there is something to send (a key press queued), clear it
      when done, so the common path costs one attribute test.

    `peer` prefixes the reason of the `CallEnded` a closed connection raises ("device " gives
    "device closed (1000)"); `end_reason`, when set, is that reason instead (we closed it: "idle
    timeout ..."). `closer` lets `goodbye()` finish its close handshake before `finish()`
    closes the socket (`Closing`).
    """

    __slots__ = ("closer", "end_reason", "interleave", "payload", "peer", "wrap", "ws")

    def __init__(self, ws: WebSocket, *, payload: Callable[[FrameT], bytes], wrap: Callable[[bytes], Any] | None = None,
                 peer: str = "") -> None:
        self.ws = ws
        self.payload = payload
        self.wrap = wrap
        self.interleave: Interleave | None = None
        self.peer = peer
        self.end_reason: str | None = None
        self.closer = Closing()

    @classmethod
    async def dial(cls, url: str, *, service: str, rejected: dict[int, tuple[str, bool]] | None = None,
                   extra_headers: list[tuple[bytes, bytes]] | None = None, payload: Callable[[FrameT], bytes],
                   wrap: Callable[[bytes], Any] | None = None, peer: str = "") -> WsSession[FrameT]:
        """Open a client WebSocket (`dial`: ServiceError naming `service` and the cause, a
        refused upgrade's status mapped through `rejected`, never the URL's query)."""
        ws = await dial(None, url, service=service, rejected=rejected, extra_headers=extra_headers)
        return cls(ws, payload=payload, wrap=wrap, peer=peer)

    def call_ended(self, closed: ConnectionClosed) -> CallEnded:
        """The `CallEnded` for a connection the peer closed: `end_reason` when we closed it, else
        `peer` + "closed (1000 ...)" / "closed without a close frame (1006)"."""
        return CallEnded(self.end_reason or f"{self.peer}{close_description(closed)}")

    async def refuse(self, err: RemoteProtocolError, log: logging.LoggerAdapter | logging.Logger, what: str,
                     farewell: str | None = None) -> None:
        """The peer broke the protocol: one warning, `farewell`, close with `err.close_code`
        (module function `refuse`). The caller re-raises `err`."""
        await refuse(self.ws, err, log, what, farewell)

    async def goodbye(self, farewell: str | bytes | None = None, *, code: int = CloseCode.NORMAL, reason: str | None = None,
                      timeout: float = GOODBYE_SEND_S) -> None:
        """The protocol's goodbye: `farewell` (its stop / hangup / session-ended frame; None:
        none) within `timeout` seconds, then the close handshake (`code`, `reason`), which
        `finish()` lets complete. A peer already gone ends it quietly: nothing is raised."""
        if farewell is not None:
            with trio.move_on_after(timeout):
                try:
                    await self.ws.send_message(farewell)
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
        await self.closer.close(self.ws, code, reason)

    async def finish(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """The end of the session (`run()`'s `finally`): let a goodbye's close handshake finish
        (bounded), then close with `code` (nothing happens on a closed connection)."""
        await self.closer.settle()
        await close(self.ws, code, reason)


pcm_payload: Callable[[AudioFrame], bytes] = AudioFrame.to_bytes
"""`WsSession.payload` of a PCM sink: the `AudioFrame` as PCM16 LE bytes."""

encoded_payload: Callable[[EncodedFrame], bytes] = operator.attrgetter("payload")
"""`WsSession.payload` of a sink that sends coded frames as they are (one Opus packet)."""


class WsEndpoint(Endpoint[FrameT]):
    """An endpoint with (at most) one `WsSession` at a time; it gives the one `send()`.

    The adapter sets `self.session` once media may flow (after its handshake) and clears it
    (None) when it must not: the session ended, we closed it, the protocol's farewell went out
    or the peer's arrived (a stop frame: the wire refuses audio after it; clear it there and
    then, not only in `run()`'s `finally`, which may come after tasks of the session wound
    down while the route kept sending). `send()` then:

    - drops the frame (counted in `stats.dropped`) while there is no session;
    - awaits `session.interleave` first when one is set (module `Interleave`);
    - sends `session.wrap(session.payload(frame))` (or the payload itself) and counts
      `frames_out` and the payload's bytes in `bytes_out`;
    - on `ConnectionClosed` calls `send_failed`, which counts a drop: the session's reader
      (`run()`, in `get_message`) ends it. The peer's close is read after every message it
      sent before it (a stop or hangup frame, its last audio), so the reader names the end and
      plays out what the peer said; a send that raised here would race it, and the route's
      reason (or whether a dial reconnects) would depend on which task ran first.

    Per-frame cost (issue 12): the same awaits as a hand-written `send()` (one: the socket
    write), no lock, task, log line or allocation of its own.
    """

    session: WsSession[FrameT] | None = None

    async def send(self, frame: FrameT) -> None:
        session = self.session
        if session is None:
            self.stats.dropped += 1
            return
        if session.interleave is not None:
            slot = await session.interleave(session, frame)
            if slot is None:
                return
            frame = slot
        payload = session.payload(frame)
        wrap = session.wrap
        try:
            await session.ws.send_message(payload if wrap is None else wrap(payload))
        except ConnectionClosed as closed:
            self.send_failed(session, closed)
            return
        stats = self.stats
        stats.frames_out += 1
        stats.bytes_out += len(payload)

    def send_failed(self, session: WsSession[FrameT], closed: ConnectionClosed) -> None:
        """`send()` (or an interleave) found the connection closed: count a drop; the reader
        ends the session (see the class docstring). An interleave that calls it returns None
        (the slot is taken: one drop per slot)."""
        self.stats.dropped += 1
