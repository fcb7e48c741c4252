"""The listen roles' WebSocket server side (RFC 6455), on the lean framing of
`gateway.adapters.wsclient`.

Why not trio-websocket (the dial roles left it for `wsclient` for the same reason): at 50
packets per second per stream the per-message cost is the gateway's cost, and trio-websocket runs a reader task per
connection that parses with wsproto, hands each message over a memory channel, and takes a
lock and two scheduler trips per send. Here wsproto's h11 handshake reads the opening request
(its HTTP subtleties: header syntax, the upgrade's required headers) and writes the 101 or the
refusal; from then on `FramedWebSocket(client=False)` does the framing in the task that reads
(client frames must be masked, RFC 6455 §5.1; ours are not, §5.3).

- `read_upgrade(stream, max_message_size)` -> `UpgradeRequest | None`: reads the request (the
  caller bounds it in time); a request that is not a valid WebSocket upgrade gets wsproto's
  refusal (400, or 426 for a wrong version) and None, as does a client that left.
- `UpgradeRequest`: `path` (the request target, query included), `headers` (the request's
  headers but Host, as (lower-case name, value) bytes), `remote` (address and port, read at
  accept), `accept(subprotocol=None, extra_headers=None)` -> the connection, `reject(status,
  extra_headers=None, body=None)`. The API is the part of trio-websocket's `WebSocketRequest`
  the listen roles use, so they are written the same for both.
"""

from __future__ import annotations

import socket

import attrs
import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsprotoRemoteError

from gateway._util import format_peer, peer_address
from gateway.adapters.wsclient import FramedWebSocket

__all__ = ["Peer", "UpgradeRequest", "read_upgrade"]

RECEIVE_SIZE = 65536  # bytes read per socket receive while the request comes
MAX_REQUEST = 65536  # bytes: the largest opening request (h11 refuses more: "Bad HTTP message")


@attrs.frozen
class Peer:
    """A connection's remote end, as trio-websocket's `Endpoint` reads it."""

    address: str
    port: int

    def __str__(self) -> str:
        return "?" if self.address == "?" else format_peer(self.address, self.port)


class UpgradeRequest:
    """An opening request that wsproto accepted as a WebSocket upgrade (module doc)."""

    def __init__(self, stream: trio.SocketStream, handshake: H11Handshake, event: Request, remote: Peer, *,
                 max_message_size: int) -> None:
        self.stream = stream
        self._handshake = handshake
        self._event = event
        self.remote = remote
        self._max = max_message_size
        self._answered = False

    @property
    def path(self) -> str:
        return self._event.target

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._event.extra_headers)

    async def accept(self, subprotocol: str | None = None,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> FramedWebSocket:
        """Answer 101 and return the connection. Raises trio.BrokenResourceError (or
        OSError) when the client has gone."""
        self._answered = True
        data = self._handshake.send(AcceptConnection(subprotocol=subprotocol, extra_headers=extra_headers or []))
        await self.stream.send_all(data)
        # what the client sent after its request (its first frames, pipelined): h11 keeps it
        leftover = self._handshake._h11_connection.trailing_data[0]  # noqa: SLF001 - wsproto's own client reads it so
        raw = self.stream.socket
        return FramedWebSocket(self.stream, _stdlib(raw), leftover=bytes(leftover), max_message_size=self._max,
                               client=False)

    async def reject(self, status: int, *, extra_headers: list[tuple[bytes, bytes]] | None = None,
                     body: bytes | None = None) -> None:
        """Refuse the upgrade with `status`, the headers and the body (Content-Length set)."""
        self._answered = True
        headers = list(extra_headers or [])
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        data = self._handshake.send(RejectConnection(status_code=status, headers=headers, has_body=body is not None))
        if body is not None:
            data += self._handshake.send(RejectData(data=body, body_finished=True))
        await self.stream.send_all(data)


def _stdlib(sock: trio.socket.SocketType) -> socket.socket | None:
    """The stdlib socket under a trio socket (the same fd), for synchronous reads and writes;
    None if trio keeps it elsewhere one day (the connection then goes through the stream)."""
    raw = getattr(sock, "_sock", None)  # trio's; the dial side builds its trio socket on one
    return raw if isinstance(raw, socket.socket) else None


def _peer(stream: trio.SocketStream) -> Peer:
    peer = peer_address(stream)
    return Peer("?", 0) if peer is None else Peer(*peer)


async def read_upgrade(stream: trio.SocketStream, *, max_message_size: int) -> UpgradeRequest | None:
    """Read one opening request from `stream` (module doc). Returns None after answering a
    request that is not a WebSocket upgrade (wsproto's refusal) or when the client left."""
    remote = _peer(stream)
    handshake = H11Handshake(ConnectionType.SERVER)
    received = 0
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        received += len(data)
        try:
            handshake.receive_data(data)
            for event in handshake.events():
                if isinstance(event, Request):
                    return UpgradeRequest(stream, handshake, event, remote, max_message_size=max_message_size)
        except WsprotoRemoteError as err:
            hint = err.event_hint
            if isinstance(hint, RejectConnection):
                try:
                    await stream.send_all(handshake.send(hint))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return None
        if received > MAX_REQUEST:
            await stream.send_all(handshake.send(RejectConnection(status_code=431)))
            return None
