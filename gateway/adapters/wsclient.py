"""A lean WebSocket client for the dial roles' media connections (RFC 6455).

Why not trio-websocket here: at 50 packets per second per stream the per-message cost is the
gateway's cost. trio-websocket runs a reader task per connection that parses with wsproto and
hands each message over a memory channel, and each send takes a lock and two scheduler trips;
measured on loopback (one 172-byte message, send + receive) that is ~175 µs of CPU, ~100 µs of
it with wsproto driven by hand. This client keeps wsproto (h11) for the opening handshake,
where the protocol's HTTP subtleties are, and does the framing itself, which for our messages
(unfragmented, no extensions) is a header and, from the client, a mask:

- receive: the task that calls `get_message` reads the socket and parses every whole frame
  in what arrived (no reader task, no channel; one scheduler trip per read). On plain TCP it
  reads the socket itself: after a read that drained it (less than `RECEIVE_SIZE` came), it
  waits for the socket to be readable before the next read, so a packet costs one `recvfrom`
  instead of a failed one, an `epoll_ctl` and a second one (`strace -c`, bench/README.md);
- the 4-byte mask keys (RFC 6455 §5.3: fresh, unpredictable, per frame) are cut from 4 KiB of
  `os.urandom` at a time, so a frame costs no `getrandom` call of its own (the pool is
  dropped in a forked worker: no two processes share keys);
- send: the frame is written to the socket at once when the kernel takes it (no lock, no
  scheduler trip); only a short write (a full socket buffer, or TLS) waits, and then every
  later send queues behind it in order.

The API is the part of trio-websocket's `WebSocketConnection` the adapters use, with its
exceptions (`ConnectionClosed` with a `CloseReason`, `ConnectionRejected`, `HandshakeError`),
so the adapters and `gateway.adapters.ws` treat both alike.

Wire rules enforced (RFC 6455 §5): a server's frame must not be masked (§5.1), RSV bits must
be 0 (no extension is negotiated, §5.2), control frames are final and at most 125 bytes
(§5.5), continuation frames only inside a fragmented message (§5.4), text is UTF-8 (§8.1),
close codes as §7.4. Breaking one closes the connection with 1002 (1007 for bad UTF-8, 1009
for a message over `max_message_size`), as trio-websocket does.
"""

from __future__ import annotations

import collections
import os
import socket
import ssl
import struct
from urllib.parse import urlsplit

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError as WsprotoRemoteError

from gateway.errors import CloseCode

__all__ = ["ClientWebSocket", "FramedWebSocket", "connect"]

RECEIVE_SIZE = 65536  # bytes read per socket receive
FAIL_LINGER_S = 1.0  # seconds a peer that broke the protocol has to read our close frame...
FAIL_QUIET_S = 0.05  # ...while it still sends: what it sends after a pause this long is not waited for
MAX_RESPONSE = 65536  # bytes: the largest handshake response (headers and a refusal's body)

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = (OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def _valid_close_code(code: int) -> bool:
    """A close code a peer may send (RFC 6455 §7.4.1-§7.4.2; 1004-1006 and 1015 never go on
    the wire)."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _mask(payload: bytes, key: bytes) -> bytes:
    """payload XOR the repeated 4-byte key (RFC 6455 §5.3), as one big-integer XOR."""
    n = len(payload)
    if not n:
        return b""
    keys = key * (n // 4 + 1)
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys[:n], "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, *, mask: bool = True) -> bytes:
    """One final frame (FIN set) with `payload`, masked with a fresh random key when `mask`
    (every client frame is, RFC 6455 §5.3)."""
    n = len(payload)
    b0 = 0x80 | opcode
    m = 0x80 if mask else 0
    if n < 126:
        header = bytes((b0, m | n))
    elif n < 65536:
        header = _PACK_16(b0, m | 126, n)
    else:
        header = _PACK_64(b0, m | 127, n)
    if not mask:
        return header + payload
    key = _mask_key()
    return header + key + _mask(payload, key)


_KEY_POOL = 4096  # bytes of os.urandom drawn at once: 1024 mask keys
_keys = b""
_key_at = 0


def _mask_key() -> bytes:
    """A fresh 4-byte masking key from the strong source (RFC 6455 §5.3, §10.3)."""
    global _keys, _key_at
    at = _key_at
    if at >= len(_keys):
        _keys, at = os.urandom(_KEY_POOL), 0
    _key_at = at + 4
    return _keys[at:at + 4]


def _forget_keys() -> None:
    global _keys, _key_at
    _keys, _key_at = b"", 0


os.register_at_fork(after_in_child=_forget_keys)  # a worker forked from the zygote draws its own


class _Fail(Exception):
    """A peer's frame broke RFC 6455: close with `code` (1002, 1007, 1009) and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class FramedWebSocket:
    """An open client WebSocket on `stream` (plain TCP or TLS), after the opening handshake.

    `get_message()` -> str | bytes (one whole message); `send_message(str | bytes)`;
    `ping()` waits for its pong; `aclose(code, reason)` runs the closing handshake. Each raises
    `ConnectionClosed` (whose `reason` is the `CloseReason`: the peer's close code, 1006 for
    a connection lost without one) once the connection is closed. One task at a time may call
    `get_message` (as with trio-websocket); any number may send.
    """

    def __init__(self, stream: trio.abc.Stream, raw: socket.socket | None, *, leftover: bytes = b"",
                 max_message_size: int = 2**20, client: bool = True) -> None:
        self._client = client
        """The client's end (frames sent masked, the peer's must not be) or, False, the
        server's (`gateway.adapters.wsserver`: the peer's must be masked, ours are not)."""
        self._stream = stream
        self._raw = raw  # the stream's TCP socket, for synchronous writes (None on TLS)
        self._max = max_message_size
        self._buf = bytearray(leftover)
        self._unparsed = bool(leftover)  # frames the server sent with its upgrade answer
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._fragments: list[bytes] | None = None
        self._fragment_op = 0
        self._fragment_size = 0
        self._pings: dict[bytes, trio.Event] = {}
        self._send_lock = trio.StrictFIFOLock()  # held while queued bytes are written
        self._queued: collections.deque[bytes] = collections.deque()  # bytes behind a short write, in order
        self._close_sent = False
        self._close_reason: CloseReason | None = None
        self._closed = trio.Event()  # the connection is closed (the handshake is over, or lost)
        self._reader: str | None = None  # who is reading the socket now: "app" (get_message), "close" (aclose)
        self._changed = trio.Event()  # set when a read ends or the connection closes
        self._drained = False  # the last read emptied the socket: wait for readable before the next

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed (None while open)."""
        return self._close_reason

    # ---------------------------------------------------------------------------- sending
    async def send_message(self, message: str | bytes) -> None:
        """Send one message: bytes as a binary frame, str as text. Raises ConnectionClosed.
        A checkpoint only when cancelled or when the socket's buffer is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._close_reason is not None or self._close_sent:
            raise ConnectionClosed(self._close_reason or CloseReason(CloseCode.NORMAL, None))
        if isinstance(message, str):
            await self._write(encode_frame(OP_TEXT, message.encode(), mask=self._client))
        else:
            await self._write(encode_frame(OP_BINARY, bytes(message), mask=self._client))

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for its pong (a pong answers its ping and every earlier one,
        RFC 6455 §5.5.3). Raises ConnectionClosed, ValueError for a payload in flight."""
        if self._close_reason is not None:
            raise ConnectionClosed(self._close_reason)
        if payload is None:
            payload = os.urandom(4)
        if payload in self._pings:
            raise ValueError(f"ping payload {payload!r} is already in flight")
        answered = self._pings[payload] = trio.Event()
        await self._write(encode_frame(OP_PING, payload, mask=self._client))
        await answered.wait()
        if self._close_reason is not None and payload in self._pings:
            raise ConnectionClosed(self._close_reason)

    def _write_now(self, data: bytes) -> bytes:
        """Write what the kernel takes at once; returns what is left (all of it on TLS, or
        while earlier bytes still wait: they go first). Raises OSError."""
        raw = self._raw
        if raw is None or self._queued or self._send_lock.locked():
            return data
        try:
            sent = raw.send(data)
        except BlockingIOError:
            return data
        return data[sent:]

    async def _write(self, data: bytes) -> None:
        try:
            rest = self._write_now(data)
        except OSError:
            self._lost()
            raise ConnectionClosed(self._close_reason) from None
        if rest:
            self._queued.append(rest)
            await self._write_queued()

    async def _write_queued(self) -> None:
        """Write what waits in `_queued`, in order (whoever holds the lock writes all of it,
        so a chunk queued behind another task's is written when the lock is got)."""
        try:
            async with self._send_lock:
                while self._queued:
                    await self._stream.send_all(self._queued.popleft())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._queued.clear()
            self._lost()
            raise ConnectionClosed(self._close_reason) from None

    # -------------------------------------------------------------------------- receiving
    async def get_message(self) -> str | bytes:
        """The next message (str for text, bytes for binary). Raises ConnectionClosed once
        the peer closed (after the messages that came before its close frame)."""
        messages = self._messages
        if self._unparsed:
            self._unparsed = False
            try:
                self._parse()
            except _Fail as fail:
                await self._fail(fail)
        while not messages:
            if self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            if self._reader == "close":  # aclose reads up to the peer's close frame
                await self._closed.wait()
                continue
            await self._receive("app")
        return messages.popleft()

    async def _receive(self, reader: str) -> None:
        """Read once and take in every whole frame."""
        self._reader = reader
        raw = self._raw
        try:
            if raw is None:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            else:
                data = await self._read_raw(raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        finally:
            self._reader = None
            self._changed.set()
        if not data:
            self._lost()
            return
        self._buf += data
        try:
            self._parse()
        except _Fail as fail:
            await self._fail(fail)

    async def _read_raw(self, raw: socket.socket) -> bytes:
        """One read of the plain TCP socket (module doc): waits for readable after a read that
        drained it, else reads at once (after a scheduler checkpoint, as a trio read is)."""
        if self._drained:
            await trio.lowlevel.wait_readable(raw)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = raw.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(raw)
                continue
            self._drained = len(data) < RECEIVE_SIZE
            return data

    def _parse(self) -> None:
        buf = self._buf
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                length = b1 & 0x7F
                head = 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                    head = 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                    head = 10
                masked = b1 & 0x80
                if masked and self._client:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "the server sent a masked frame (RFC 6455 §5.1)")
                if not masked and not self._client:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "the client sent an unmasked frame (RFC 6455 §5.1)")
                if masked:
                    head += 4  # the masking key
                if b0 & 0x70:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "a frame has RSV bits set and no extension was negotiated (RFC 6455 §5.2)")
                if length > self._max:
                    raise _Fail(CloseCode.MESSAGE_TOO_BIG,
                                f"a frame of {length} bytes exceeds the maximum message size limit ({self._max} bytes)")
                if end - pos < head + length:
                    break
                payload = bytes(buf[pos + head:pos + head + length])
                if masked:
                    payload = _mask(payload, bytes(buf[pos + head - 4:pos + head]))
                pos += head + length
                self._frame(b0 & 0x80, b0 & 0x0F, payload)
                if self._close_reason is not None:
                    break
        finally:
            del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in _DATA_OPS:
            if self._fragments is not None:
                raise _Fail(CloseCode.PROTOCOL_ERROR, "a new message began inside a fragmented one (RFC 6455 §5.4)")
            if fin:
                self._deliver(opcode, payload)
            else:
                self._fragments, self._fragment_op, self._fragment_size = [payload], opcode, len(payload)
        elif opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise _Fail(CloseCode.PROTOCOL_ERROR, "a continuation frame outside a fragmented message (RFC 6455 §5.4)")
            self._fragment_size += len(payload)
            if self._fragment_size > self._max:
                raise _Fail(CloseCode.MESSAGE_TOO_BIG, f"a message exceeds the maximum message size limit ({self._max} bytes)")
            self._fragments.append(payload)
            if fin:
                parts, self._fragments = self._fragments, None
                self._deliver(self._fragment_op, b"".join(parts))
        elif opcode in _CONTROL_OPS:
            if not fin or len(payload) > 125:
                raise _Fail(CloseCode.PROTOCOL_ERROR, "a fragmented or oversized control frame (RFC 6455 §5.5)")
            if opcode == OP_PING:
                self._reply(encode_frame(OP_PONG, payload, mask=self._client))
            elif opcode == OP_PONG:
                self._pong(payload)
            else:
                self._peer_closed(payload)
        else:
            raise _Fail(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x} (RFC 6455 §5.2)")

    def _deliver(self, opcode: int, payload: bytes) -> None:
        if self._close_sent:
            return  # we are closing: what the peer sent before it saw our close is not read
        if opcode == OP_TEXT:
            try:
                self._messages.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise _Fail(CloseCode.INVALID_PAYLOAD, "a text message that is not UTF-8 (RFC 6455 §8.1)") from None
        else:
            self._messages.append(payload)

    def _pong(self, payload: bytes) -> None:
        if payload not in self._pings:
            return  # unsolicited: allowed (RFC 6455 §5.5.3)
        for key in list(self._pings):  # this ping and every earlier one
            self._pings.pop(key).set()
            if key == payload:
                break

    def _peer_closed(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise _Fail(CloseCode.PROTOCOL_ERROR, "a close frame with a 1-byte body (RFC 6455 §5.5.1)")
        code, reason = 1005, None
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not _valid_close_code(code):
                raise _Fail(CloseCode.PROTOCOL_ERROR, f"invalid close code {code} (RFC 6455 §7.4)")
            try:
                reason = payload[2:].decode("utf-8") or None
            except UnicodeDecodeError:
                raise _Fail(CloseCode.INVALID_PAYLOAD, "a close reason that is not UTF-8 (RFC 6455 §5.5.1)") from None
        if not self._close_sent:  # echo its code (RFC 6455 §5.5.1)
            self._close_sent = True
            self._reply(encode_frame(OP_CLOSE, payload[:2] if code != 1005 else b"", mask=self._client))
        self._finish(CloseReason(code, reason))

    def _reply(self, frame: bytes) -> None:
        """A pong or a close echo, from the reading task without waiting for the socket: what
        the kernel does not take at once is queued, in order, and written by a system task."""
        try:
            rest = self._write_now(frame)
        except OSError:
            return
        if rest:
            self._queued.append(rest)
            trio.lowlevel.spawn_system_task(self._write_queued_quietly)

    async def _write_queued_quietly(self) -> None:
        try:
            await self._write_queued()
        except ConnectionClosed:
            pass

    async def _fail(self, fail: _Fail) -> None:
        """The peer broke the protocol: close with the code, then drop the connection."""
        if not self._close_sent:
            self._close_sent = True
            self._reply(encode_frame(OP_CLOSE, fail.code.to_bytes(2, "big") + fail.reason.encode()[:123], mask=self._client))
        self._finish(CloseReason(fail.code, fail.reason))
        # Read what the peer still sends (the rest of an oversize frame, its close) until it
        # pauses for FAIL_QUIET_S, closes, or FAIL_LINGER_S pass: closing with unread bytes
        # makes the kernel answer with a reset, which can destroy our close frame before the
        # peer reads it (it would see 1006, not the code naming its fault).
        with trio.move_on_after(FAIL_LINGER_S):
            try:
                while True:
                    with trio.move_on_after(FAIL_QUIET_S) as quiet:
                        if not await self._stream.receive_some(RECEIVE_SIZE):
                            break
                    if quiet.cancelled_caught:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await self._close_stream()

    # ---------------------------------------------------------------------------- closing
    async def aclose(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Send a close frame (`code`, `reason`) and wait for the peer's, then close the
        stream. Idempotent. Bound it with a timeout: a peer that never answers is waited for."""
        try:
            if self._close_reason is None and not self._close_sent:
                self._close_sent = True
                body = code.to_bytes(2, "big") + (reason or "").encode()[:123]
                try:
                    await self._write(encode_frame(OP_CLOSE, body, mask=self._client))
                except ConnectionClosed:
                    return
            while self._close_reason is None:
                if self._reader == "app":  # the task in get_message sees the peer's close
                    self._changed = trio.Event()
                    await self._changed.wait()
                else:
                    await self._receive("close")
        finally:
            if self._close_reason is None:
                self._finish(CloseReason(code, reason))
            await self._close_stream()

    def _lost(self) -> None:
        if self._close_reason is None:
            self._finish(CloseReason(CloseCode.ABNORMAL, None))

    def _finish(self, reason: CloseReason) -> None:
        if self._close_reason is None:
            self._close_reason = reason
        self._closed.set()
        self._changed.set()
        for event in self._pings.values():
            event.set()

    async def _close_stream(self) -> None:
        self._raw = None
        with trio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


ClientWebSocket = FramedWebSocket  # the dial roles' name for it


def _split(url: str) -> tuple[bool, str, int, str, str]:
    """(tls, host, port, resource, Host header) of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {parts.scheme}://")
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if tls else 80
    header = host if port == default else f"{host}:{port}"
    if ":" in host:  # IPv6 literal
        header = f"[{host}]" if port == default else f"[{host}]:{port}"
    return tls, host, port, resource, header


async def connect(url: str, *, extra_headers: list[tuple[bytes, bytes]] | None = None,
                  max_message_size: int = 2**20, ssl_context: ssl.SSLContext | None = None) -> ClientWebSocket:
    """Open a client WebSocket to `url` (ws:// or wss://) and run the opening handshake
    (RFC 6455 §4.1, with wsproto's h11 handshake).

    Raises ConnectionRejected (status, headers, body) when the server answers the upgrade
    with something else than 101, HandshakeError for an answer that is not a valid upgrade,
    OSError for network errors (ConnectionResetError when it closes during the handshake).
    Bound it with a timeout (`gateway.adapters.ws.dial` does).
    """
    tls, host, port, resource, host_header = _split(url)
    stream: trio.abc.Stream
    raw: socket.socket | None = None
    if tls:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context or ssl.create_default_context(),
                                                      https_compatible=True)
    else:
        raw = await _open_tcp(host, port)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))  # the same socket object
    try:
        handshake = H11Handshake(ConnectionType.CLIENT)
        request = Request(host=host_header, target=resource, extra_headers=list(extra_headers or []))
        try:
            await stream.send_all(handshake.send(request))
            leftover = await _answer(stream, handshake)
        except trio.BrokenResourceError as err:
            raise ConnectionResetError(f"the connection closed during the WebSocket handshake ({err.__cause__ or err})") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        raise
    return ClientWebSocket(stream, raw, leftover=leftover, max_message_size=max_message_size)


async def _open_tcp(host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket to the first of `host`'s addresses that answers
    (stdlib, so that `ClientWebSocket` writes to it without a scheduler trip)."""
    last: OSError | None = None
    for family, kind, proto, _, address in await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await trio.socket.from_stdlib_socket(sock).connect(address)
        except OSError as err:
            sock.close()
            last = err
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last or OSError(f"no address for {host}")


async def _answer(stream: trio.abc.Stream, handshake: H11Handshake) -> bytes:
    """Read the server's answer to the upgrade; returns the bytes after its headers (frames
    the server sent at once) or raises (see `connect`)."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_RESPONSE:
            raise HandshakeError(f"no end of the upgrade response's headers in {MAX_RESPONSE} bytes")
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise ConnectionResetError("the connection closed during the WebSocket handshake")
        buf += data
    head, rest = bytes(buf[:end + 4]), bytes(buf[end + 4:])
    try:
        handshake.receive_data(head)
        events = list(handshake.events())
    except (WsprotoRemoteError, LocalProtocolError) as err:
        raise HandshakeError(f"invalid upgrade response: {err}") from None
    for event in events:
        if isinstance(event, AcceptConnection):
            return rest
        if isinstance(event, RejectConnection):
            body = await _refusal_body(stream, handshake, rest) if event.has_body else None
            raise ConnectionRejected(event.status_code, tuple(event.headers), body)
    raise HandshakeError("the server's answer to the upgrade was neither 101 nor a refusal")


async def _refusal_body(stream: trio.abc.Stream, handshake: H11Handshake, rest: bytes) -> bytes:
    """The body of a refused upgrade (up to MAX_RESPONSE bytes, as far as it came)."""
    body = bytearray()
    data: bytes | bytearray | None = rest
    with trio.move_on_after(2.0):
        while len(body) <= MAX_RESPONSE:
            try:
                if data != b"":  # b"" would tell h11 the stream ended (None does, at EOF)
                    handshake.receive_data(data)  # type: ignore[arg-type]  # wsproto says bytes; h11 takes bytearray too
                for event in handshake.events():
                    if isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            return bytes(body)
            except (WsprotoRemoteError, LocalProtocolError):
                break
            if data is None:
                break
            try:
                data = await stream.receive_some(RECEIVE_SIZE) or None  # None: EOF
            except (trio.BrokenResourceError, OSError):
                data = None
    return bytes(body)
