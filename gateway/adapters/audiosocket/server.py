"""The AudioSocket listen service: one TCP server per process (`server.audiosocket: HOST:PORT`)
that Asterisk connects to, each connection routed by the UUID in its first frame.

Asterisk's side (asterisk/asterisk res/res_audiosocket.c `ast_audiosocket_connect` and
`ast_audiosocket_init`; apps/app_audiosocket.c; channels/chan_audiosocket.c): the dialplan's
``AudioSocket(uuid,host:port)`` or ``Dial(AudioSocket/host:port/uuid)`` opens a TCP connection
(TCP_NODELAY, 2 s connect timeout), sends the UUID frame (kind 0x01, the uuid's 16 bytes) and
then the channel's audio. Routing:

- The UUID of the first frame picks the listen endpoint configured with that ``uuid:``; an
  endpoint with ``uuid: "*"`` takes the connections whose UUID no endpoint claims (the
  dialplan's ``AudioSocket(${UUID()},gw:9092)`` gives every call a fresh UUID). Each endpoint
  serves one connection at a time; its route runs one session per call.
- Refused, with one log line naming the cause: a first frame that is not a UUID frame, or that
  is malformed (`wire`, the bytes' fault), no UUID frame within `FIRST_FRAME_TIMEOUT`, an
  unknown UUID (no endpoint, no catch-all), an endpoint busy with another call (after
  `listen.BUSY_WAIT`), an endpoint whose route is not running (after `listen.OFFER_TIMEOUT`;
  both are `gateway.adapters.listen.Handoff`'s, as for the WebSocket listen roles), and admission
  closed or too many set-ups at once (`gateway.admission`, the media server's `SetupPacer`).
- How a refusal looks on the wire: AudioSocket has no close codes and Asterisk reads no error
  frame from the server (`ast_audiosocket_receive_frame` accepts audio and hangup only; any
  other kind logs "Received AudioSocket message other than hangup or audio" and ends the call
  the same way). So a refused connection gets the hangup frame ``00 00 00``, the one
  termination Asterisk and every AudioSocket client understand, then the TCP close. What
  Asterisk logs: ``Failed to receive frame from AudioSocket message for channel …`` (ERROR,
  app_audiosocket), the application returns -1 and the channel hangs up; the channel driver's
  `read` returns no frame and the call ends. The cause is in our log, never on the wire.

Sessions: an admitted connection holds an admission slot and marks a session up
(`Admission.stream`) for as long as its endpoint serves it, as a media upgrade does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import attrs
import trio

from gateway._util import peer_name
from gateway.adapters.audiosocket.wire import (
    Audio,
    CallUuid,
    Dtmf,
    Event,
    FrameParser,
    Hangup,
    PeerError,
    hangup_frame,
)
from gateway.adapters.listen import Handoff
from gateway.admission import Refusal
from gateway.errors import RemoteProtocolError

log = logging.getLogger("gateway.audiosocket")

CATCH_ALL = "*"  # the `uuid:` of a listen endpoint that takes the calls no other endpoint claims
FIRST_FRAME_TIMEOUT = 5.0  # seconds from the TCP connect to the UUID frame (Asterisk sends it at once)
REFUSE_TIMEOUT = 1.0  # seconds for the hangup frame of a refusal
RECEIVE_BYTES = 65536  # bytes asked of the kernel per read


@attrs.define(eq=False)
class Connection:
    """One accepted connection whose UUID frame arrived, handed to its listen endpoint."""

    stream: trio.SocketStream
    parser: FrameParser
    """The connection's parser, holding what followed the UUID frame in the same reads."""
    call_uuid: str
    """The UUID of its first frame (canonical lower-case form)."""
    remote: str
    """`address:port` of the peer (read at accept: the socket may be gone when a log line names it)."""
    pending: list[Event] = attrs.Factory(list)
    """Events that came in the reads before the hand-over, after the UUID frame."""
    finished: trio.Event = attrs.Factory(trio.Event)
    """Set by the endpoint when it is done with the connection (the server then closes it)."""


class AudioSocketServer:
    """The listen endpoints by UUID, and the handling of each accepted connection."""

    def __init__(self) -> None:
        self._slots: dict[str, Handoff[Connection]] = {}
        self.port: int | None = None
        """The bound port, once serving (tests bind port 0)."""
        self.runtime = None  # gateway.runtime.Runtime: admission and the set-up pacer (`listen_server`)
        self.refused = 0
        """Connections refused (any cause)."""

    def add(self, call_uuid: str, slot: Handoff[Connection]) -> Callable[[], None]:
        """Serve connections whose UUID is `call_uuid` (canonical form, or `CATCH_ALL`) with
        `slot`; returns the function that undoes it. ValueError when that UUID is taken."""
        if call_uuid in self._slots:
            raise ValueError(f"AudioSocket UUID {call_uuid} already has a listen endpoint")
        self._slots[call_uuid] = slot

        def remove() -> None:
            if self._slots.get(call_uuid) is slot:
                del self._slots[call_uuid]

        return remove

    @property
    def uuids(self) -> list[str]:
        return sorted(self._slots)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted connection, from accept to close: whatever it does ends it alone."""
        remote = peer_name(stream)
        try:
            await self._handle(stream, remote)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            log.info("audiosocket: connection from %s lost: %s", remote, type(err).__name__)
        except Exception:  # a bug ends that connection, never the server
            log.exception("audiosocket: handling the connection from %s failed", remote)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream, remote: str) -> None:
        parser = FrameParser()
        events: list[Event] = []
        with trio.move_on_after(FIRST_FRAME_TIMEOUT):
            try:
                while not events:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    events = parser.receive_data(data)
                    if not data:
                        log.info("audiosocket: %s closed the connection before its UUID frame", remote)
                        return
            except RemoteProtocolError as err:
                await self._refuse(stream, remote, f"its first frame broke the protocol: {err}")
                return
        if not events:
            await self._refuse(stream, remote, f"no UUID frame within {FIRST_FRAME_TIMEOUT:g} s of connecting")
            return
        first = events[0]
        if not isinstance(first, CallUuid):
            await self._refuse(stream, remote, f"the first frame is {_what(first)}, not the UUID frame (kind 0x01)")
            return
        call_uuid = first.uuid
        slot = self._slots.get(call_uuid) or self._slots.get(CATCH_ALL)
        if slot is None:
            await self._refuse(stream, remote, f"no listen endpoint for UUID {call_uuid}")
            return
        what = f"AudioSocket call {call_uuid} from {remote}"
        runtime = self.runtime
        if runtime is not None:
            admission = runtime.admission
            refusal = admission.check(what)
            if refusal is not None:
                await self._refuse(stream, remote, f"call {call_uuid}: {refusal.detail}")
                return
            wait = runtime.media.pacer.turn(trio.current_time())
            if wait is None:
                await self._refuse(stream, remote, f"call {call_uuid}: too many sessions starting at once")
                return
            if wait:
                await trio.sleep(wait)
            seat = admission.try_slot(what)  # again: it may have closed while this one waited
            if isinstance(seat, Refusal):
                await self._refuse(stream, remote, f"call {call_uuid}: {seat.detail}")
                return
            with seat, admission.stream():
                refused = await slot.hand_over(Connection(stream, parser, call_uuid, remote, events[1:]))
        else:
            refused = await slot.hand_over(Connection(stream, parser, call_uuid, remote, events[1:]))
        if refused is not None:
            await self._refuse(stream, remote, f"call {call_uuid}: {refused.cause}")

    async def _refuse(self, stream: trio.SocketStream, remote: str, cause: str) -> None:
        """One warning naming the cause, the hangup frame, and (by `handle`) the TCP close."""
        self.refused += 1
        log.warning("audiosocket: refused the connection from %s: %s (hangup, then close)", remote, cause)
        with trio.move_on_after(REFUSE_TIMEOUT):
            try:
                await stream.send_all(hangup_frame())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


_FRAMES = {Audio: "an audio frame", Hangup: "a hangup frame", Dtmf: "a DTMF frame", PeerError: "an error frame"}


def _what(event: Event) -> str:
    """'an audio frame (kind 0x10-0x18)', 'a hangup frame', ... for log lines."""
    return _FRAMES.get(type(event), type(event).__name__)


async def serve_audiosocket(server: AudioSocketServer, host: str, port: int, *,
                            listeners: Sequence[trio.abc.Listener[trio.SocketStream]] | None = None,
                            task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve AudioSocket on host:port (TCP) until cancelled; reports the bound port (0 binds
    an ephemeral one). Each connection runs in a task of its own (`AudioSocketServer.handle`).
    With `listeners`, serve those instead of binding (a worker serves the connections its
    supervisor accepted and handed over by UUID: `gateway.workers`; `port` is then only
    reported)."""
    bind = listeners is None
    if listeners is None:
        tcp = await trio.open_tcp_listeners(port, host=host)
        port = tcp[0].socket.getsockname()[1]
        listeners = tcp
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        server.port = port
        if bind:
            log.info("AudioSocket listening on %s:%d", host, server.port)
        task_status.started(server.port)


def listen_server(runtime) -> AudioSocketServer:
    """The process's AudioSocket server (one per `Runtime`, created on first use)."""
    server: AudioSocketServer = runtime.singleton(AudioSocketServer, AudioSocketServer)
    server.runtime = runtime
    return server
