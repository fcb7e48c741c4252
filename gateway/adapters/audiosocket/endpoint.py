"""Asterisk AudioSocket over TCP, dial and listen (framing: `wire.py`; the protocol: Asterisk
documentation "AudioSocket", https://docs.asterisk.org/Configuration/Channel-Drivers/AudioSocket/,
and asterisk/asterisk res/res_audiosocket.c).

Roles
-----
- Listen (`AudioSocketListen`, ``role: listen``): the gateway is the AudioSocket server that
  Asterisk's ``AudioSocket(uuid,host:port)`` dialplan application or
  ``Dial(AudioSocket/host:port/uuid)`` connects to, on `server.audiosocket` (one TCP port for
  every listen endpoint; `server.py` routes each connection by its UUID frame to the endpoint
  with that ``uuid:``, or to the one with ``uuid: "*"``, and explains refusals).
- Dial (`AudioSocketDial`): the gateway plays Asterisk's part toward an AudioSocket server (an
  AI voice bot written for AudioSocket): it connects to ``address: HOST:PORT`` (TCP_NODELAY, as
  Asterisk), sends the UUID frame (``uuid:``, default a fresh random UUID per connection, as the
  dialplan's ``${UUID()}``), then audio, and takes the server's audio back.

Audio: signed linear 16-bit mono little-endian at ``rate:`` Hz (default 8000, kind 0x10; the
other rates of the kinds 0x11-0x18: 12000, 16000, 24000, 32000, 44100, 48000, 96000, 192000),
the codec graph's PCM16 format at that rate both ways. What we send is one audio frame per
``ptime_ms`` (default 20: 320 bytes at 8 kHz), sent by the route's pacer at its media-clock
deadlines (`Endpoint.send`, as the VoIPBIN endpoint: no clock of our own). Audio received in
a kind of another rate than ``rate:`` is refused (the connection is closed, the cause logged):
the Asterisk side is configured for one rate (the dialplan application is always 8 kHz; the
channel driver uses its ``c(codec)``).

Ingress timing: TCP delivers every byte once and in order, so there is no loss, reordering or
duplicate to repair and no jitter buffer of our own: frames play as they arrive, and the
route's playout absorbs arrival jitter (`jitter_ms`, `Route`). A peer that sends faster than
real time (a bot writing its text-to-speech as fast as it is made) is found out when its audio
runs `UNPACED_AHEAD_S` ahead of the wall clock: the endpoint is then `bursty` for the session
(one log line), so the route queues the burst and plays it at real time instead of dropping it
as excess latency. ``bursty: true`` says so from the start.

Idle calls (listen): each endpoint serves one call at a time, so a connection that stays open
and sends nothing (Asterisk gone without a FIN or reset: a crash, a partition) would hold the
endpoint, and every later call for its UUID would be refused as busy, for as long as TCP
keeps the dead connection. Asterisk sends the channel's audio every 20 ms for the whole call,
so a listen connection that sends no frame for ``idle_timeout_s`` (default `IDLE_TIMEOUT_S`,
60 s, as the VoIPBIN listen role) gets our hangup frame and FIN, with one warning line; the
call ends normally (`CallEnded`, "idle timeout: no frame for 60 s") and the route waits for
the next call at once. The time counts from the hand-over and from each read that completes a
well-formed frame of any kind (audio, DTMF, error, a repeated UUID). ``idle_timeout_s: 0``
turns the limit off (a channel whose peer sends no frames in silence). The dial role has no
idle limit: an AudioSocket server (a bot) may stay silent while it listens.

Ending: a hangup frame or the peer closing the connection ends the call (`CallEnded`); our
goodbye is the hangup frame, then the write side's shutdown (FIN), waiting up to
`LINGER_S` for the peer to close so that unread audio in our receive buffer never turns the
close into a reset that could discard the hangup at the peer.

DTMF: a DTMF frame from the peer is a ``dtmf`` route event (counted `dtmf_in`). A ``dtmf``
route event from another endpoint is sent as one DTMF frame before the next audio frame, by
the dial role only (counted `dtmf_out`): Asterisk reads nothing but audio and hangup from the
server (`ast_audiosocket_receive_frame`), so the listen role never sends DTMF to it.

Bad input (`wire`): a truncated frame at EOF, an unknown kind, an oversize length, audio of an
odd length or of another rate close that one connection, with one warning naming the cause,
after our hangup frame (AudioSocket has no close codes); the route treats a listen client's
fault as the end of its session and waits for the next call, other routes never notice.
An error frame from the peer (kind 0xff) is logged with its code and the call goes on.
"""

from __future__ import annotations

import collections
import uuid as uuid_module
from collections.abc import Callable

import trio

from gateway._util import goodbye_scope
from gateway.adapters.audiosocket.server import (
    CATCH_ALL,
    RECEIVE_BYTES,
    Connection,
    listen_server,
)
from gateway.adapters.audiosocket.wire import (
    AUDIO_KIND_OF_RATE,
    AUDIO_RATES,
    ERROR_FRAME_FORWARDING,
    ERROR_HANGUP,
    ERROR_MEMORY,
    HEADER,
    Audio,
    CallUuid,
    Dtmf,
    Event,
    FrameParser,
    Hangup,
    PeerError,
    audio_frame,
    dtmf_frame,
    hangup_frame,
    uuid_frame,
)
from gateway.adapters.listen import Handoff, IdleLimit
from gateway.codecs.formats import VALID_PTIMES_MS, AudioFormat, AudioFrame, Encoding
from gateway.config.options import Options
from gateway.config.schema import HostPort
from gateway.endpoint import Emit, Endpoint, PcmIngress, RouteEvent, route_dtmf_key
from gateway.errors import CallEnded, CloseCode, RemoteProtocolError, ServiceError
from gateway.runtime import Runtime

CONNECT_TIMEOUT = 10.0  # seconds for the dial role's TCP connect
IDLE_TIMEOUT_S = 60.0  # seconds a listen connection may send no frame (default of idle_timeout_s)
LINGER_S = 1.0  # seconds our goodbye waits for the peer to close after our hangup and FIN
UNPACED_AHEAD_S = 0.3  # a peer this far ahead of real time sends unpaced: the session is bursty
MAX_QUEUED_DTMF = 16  # key presses waiting for the next audio frame, at most
RATES = tuple(sorted(AUDIO_RATES.values()))
_ERROR_NAMES = {ERROR_HANGUP: "hangup of the calling party", ERROR_FRAME_FORWARDING: "frame forwarding error",
                ERROR_MEMORY: "memory error"}


class _AudioSocketEndpoint(Endpoint[AudioFrame]):
    kind = "audiosocket"
    idle_timeout = 0.0
    """Seconds the peer may send no frame before the call is ended (module doc); 0: no limit."""

    def __init__(self, name: str, *, rate: int = 8000, ptime_ms: int = 20, call_uuid: str | None = None,
                 bursty: bool = False) -> None:
        super().__init__(name)
        self.rate = rate
        self.ingress = self.egress = AudioFormat(Encoding.PCM16, rate, 1)
        self.ptime_ms = ptime_ms
        self.call_uuid = call_uuid
        """The call's UUID: configured, or (listen) the connection's, (dial) the one sent."""
        self.bursty_option = bursty
        self.bursty = bursty
        self._audio_kind = AUDIO_KIND_OF_RATE[rate]
        self._frame_bytes = 2 * self.egress.samples(ptime_ms)
        self._header = HEADER.pack(self._audio_kind, self._frame_bytes)  # of every egress frame
        self._out: trio.SocketStream | None = None  # where send() writes, while a session is up
        self._sending = False  # a send_all of ours is in progress (goodbye must not write beside it)
        self._sent: trio.Event | None = None  # set when that send_all returns (created by goodbye)
        self._peer_closed: trio.Event | None = None  # the reader saw the peer's hangup or EOF
        self._keys: collections.deque[str] = collections.deque()
        self._said_goodbye = False

    def describe(self) -> str:
        return f"{self.name} ({self.role} AudioSocket {self._where()}, {self.rate} Hz)"

    def _where(self) -> str:
        return f"call {self.call_uuid}" if self.call_uuid else "any call"

    # ------------------------------------------------------------------------- session
    async def _session(self, stream: trio.SocketStream, parser: FrameParser, emit: Emit,
                       pending: list[Event], peer: str) -> None:
        """Stream until the call ends: raises CallEnded (hangup, close, or after our hangup
        frame the idle timeout, module doc) or RemoteProtocolError (after a warning and our
        hangup frame). `peer` names the other side in log lines."""
        self._out = stream
        self._sent = None
        self._peer_closed = trio.Event()
        self._said_goodbye = False
        self._keys.clear()  # presses queued for an earlier session are not played
        self.bursty = self.bursty_option  # until this session's peer shows it sends unpaced
        self.stats.connects += 1
        ingress = PcmIngress(emit, self.rate, self.stats)
        start = trio.current_time()
        idle = IdleLimit(self.idle_timeout)  # moved by each read that completes a frame
        try:
            try:
                self._dispatch(pending, ingress, peer)
                with idle.scope:
                    while True:
                        data = await stream.receive_some(RECEIVE_BYTES)
                        events = parser.receive_data(data)
                        if events:
                            now = trio.current_time()
                            idle.activity(now)
                            self._dispatch(events, ingress, peer)
                            if not self.bursty and ingress.timestamp / self.rate > now - start + UNPACED_AHEAD_S:
                                self._found_unpaced(peer)
                        if not data:
                            raise CallEnded("closed")
                # only the idle deadline ends the loop without raising
                self.log.warning("closing the AudioSocket connection: idle timeout: %s sent no frame for %g s "
                                 "(idle_timeout_s: 0 turns the limit off)", peer, idle.idle)
                await self._stop_sending()
                await self._hangup(stream)
                raise CallEnded(f"idle timeout: no frame for {idle.idle:g} s")
            except RemoteProtocolError as err:
                self.log.warning("closing the AudioSocket connection: %s broke the protocol: %s", peer, err)
                await self._stop_sending()
                await self._hangup(stream)
                raise
        except (CallEnded, RemoteProtocolError):
            self._peer_closed.set()
            raise
        finally:
            self._out = None

    def _dispatch(self, events: list[Event], ingress: PcmIngress, peer: str) -> None:
        """The events of one read (synchronous: nothing here waits)."""
        rate = self.rate
        for event in events:
            if type(event) is Audio:
                if event.rate != rate:
                    raise RemoteProtocolError(
                        f"audio at {event.rate} Hz on an endpoint configured for {rate} Hz (rate:)", close_code=CloseCode.UNSUPPORTED_DATA
                    )
                ingress(event.payload)
            elif isinstance(event, Hangup):
                raise CallEnded("hangup")
            elif isinstance(event, Dtmf):
                self.stats.dtmf_in += 1
                self.route_event("dtmf", digit=event.digit)
            elif isinstance(event, PeerError):
                what = _ERROR_NAMES.get(event.code or 0, "application-specific")
                code = "no code" if event.code is None else f"code 0x{event.code:02x}"
                self.log.warning("%s reported an AudioSocket error (%s: %s)", peer, code, what)
            elif isinstance(event, CallUuid):
                self.log.info("%s sent a UUID frame again (%s): ignored", peer, event.uuid)

    def _found_unpaced(self, peer: str) -> None:
        self.bursty = True
        self.log.info("%s sends audio faster than real time (more than %g s ahead): queueing it and playing "
                      "it at real time (bursty)", peer, UNPACED_AHEAD_S)

    async def send(self, frame: AudioFrame) -> None:
        stream = self._out
        if stream is None:
            self.stats.dropped += 1
            return
        payload = frame.to_bytes()
        data = self._header + payload if len(payload) == self._frame_bytes else audio_frame(payload, self._audio_kind)
        keys = self._keys
        if keys:  # a key press goes just before the audio of its slot
            data = dtmf_frame(keys.popleft()) + data
            self.stats.dtmf_out += 1
        self._sending = True
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise CallEnded("connection closed") from None
        finally:
            self._sending = False
            if self._sent is not None:
                self._sent.set()
        self.stats.frames_out += 1
        self.stats.bytes_out += len(payload)

    async def goodbye(self) -> None:
        """The hangup frame, the write side shut (FIN), then up to `LINGER_S` for the peer
        to close (module doc, "Ending")."""
        stream = self._out
        if stream is None:
            return
        await self._stop_sending()
        await self._hangup(stream)
        if self._peer_closed is not None:
            with trio.move_on_after(LINGER_S):
                await self._peer_closed.wait()

    async def _stop_sending(self) -> None:
        """The pacer's next `send` drops its frame; one in progress is waited for (up to
        `LINGER_S`): trio refuses a second `send_all` beside it, and our hangup must follow
        the audio whole, never cut into it."""
        self._out = None
        if self._sending:
            self._sent = trio.Event()
            with trio.move_on_after(LINGER_S):
                await self._sent.wait()

    async def _hangup(self, stream: trio.SocketStream) -> None:
        """Once per session: the hangup frame and FIN, best effort (the peer may be gone)."""
        if self._said_goodbye:
            return
        self._said_goodbye = True
        with goodbye_scope(LINGER_S):
            try:
                await stream.send_all(hangup_frame())
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                pass


def _rate(opts: Options) -> int:
    """Option `rate` (Hz): one of the AudioSocket audio kinds' rates (wire.AUDIO_RATES), default 8000."""
    return opts.get_int("rate", 8000, choices=RATES)


def _ptime(opts: Options) -> int:
    return opts.get_int("ptime_ms", 20, choices=VALID_PTIMES_MS)


def _uuid(opts: Options, *, catch_all: bool) -> str | None:
    """Option `uuid`: a UUID in its string form (any case), returned canonical; `"*"` where
    `catch_all` is allowed."""
    text = opts.get_str("uuid", None, allow_empty=False)
    if text is None:
        return None
    if catch_all and text == CATCH_ALL:
        return CATCH_ALL
    try:
        return str(uuid_module.UUID(text))
    except ValueError:
        also = ' or "*" (any call no other endpoint takes)' if catch_all else ""
        raise opts.error("uuid", f"expected a UUID such as 40325ec2-5efd-4bd3-805f-53576e581d13{also}, "
                                 f"got {text[:40]!r}") from None


class AudioSocketDial(_AudioSocketEndpoint):
    """The gateway as Asterisk toward an AudioSocket server at ``address: HOST:PORT``."""

    role = "dial"
    accepts_events = True  # `dtmf` route events are sent as DTMF frames
    reconnects = True  # a connection that fails mid-call reconnects (a close or a hangup ends the call)

    def __init__(self, name: str, *, host: str, port: int, **kw) -> None:
        super().__init__(name, **kw)
        self.host, self.port = host, port
        self._configured_uuid = self.call_uuid

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> AudioSocketDial:
        address = opts.get_str("address", allow_empty=False)
        where = HostPort.parse(address, opts, "address")
        if where.port == 0:
            raise opts.error("address", f"expected HOST:PORT with a port, got {address!r}")
        endpoint = cls(name, host=where.host, port=where.port, rate=_rate(opts), ptime_ms=_ptime(opts),
                       call_uuid=_uuid(opts, catch_all=False), bursty=opts.get_bool("bursty", False))
        opts.finish()
        return endpoint

    def _where(self) -> str:
        return f"server {self.host}:{self.port}"

    async def run(self, emit: Emit, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        server = f"AudioSocket server {self.host}:{self.port}"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError:
            raise ServiceError(f"{server}: no answer within {CONNECT_TIMEOUT:g} s") from None
        except OSError as err:
            raise ServiceError(f"{server}: cannot connect: {err.strerror or type(err).__name__}") from None
        try:
            self.call_uuid = self._configured_uuid or str(uuid_module.uuid4())
            try:
                await stream.send_all(uuid_frame(self.call_uuid))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                raise ServiceError(f"{server}: connection lost before the UUID frame: {err}") from None
            self.log.info("connected to %s (call %s)", server, self.call_uuid)
            task_status.started()
            await self._session(stream, FrameParser(), emit, [], peer="the server")
        finally:
            await trio.aclose_forcefully(stream)

    def on_route_event(self, event: RouteEvent) -> None:
        """A ``dtmf`` event: its digit goes as one DTMF frame before the next audio frame."""
        if event.kind != "dtmf":
            return
        key = route_dtmf_key(event, self.log)
        if key is None:
            return
        if self._out is None:
            self.log.info("dtmf %s from %s not sent: no AudioSocket connection", key, event.source)
        elif len(self._keys) >= MAX_QUEUED_DTMF:
            self.log.warning("dtmf %s from %s not sent: %d key presses already waiting", key, event.source,
                             len(self._keys))
        else:
            self._keys.append(key)


class AudioSocketListen(_AudioSocketEndpoint):
    """The gateway as the AudioSocket server for the calls with ``uuid:`` (or, with
    ``uuid: "*"``, every call no other listen endpoint takes), on `server.audiosocket`. A call
    that sends no frame for `idle_timeout` seconds (0: no limit) is hung up (module doc)."""

    role = "listen"

    def __init__(self, name: str, *, idle_timeout: float = IDLE_TIMEOUT_S, **kw) -> None:
        super().__init__(name, **kw)
        self.idle_timeout = idle_timeout
        self.uuid_option = self.call_uuid or CATCH_ALL
        self._slot: Handoff[Connection] = Handoff(f"AudioSocket listen endpoint {name} ({self._where()})", noun="call")
        self._unregister: Callable[[], None] | None = None

    def _where(self) -> str:
        return "any call" if self.uuid_option == CATCH_ALL else f"call {self.uuid_option}"

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> AudioSocketListen:
        call_uuid = _uuid(opts, catch_all=True)
        if call_uuid is None:
            raise opts.error("uuid", 'a listen endpoint needs the uuid: of its calls (the first argument of '
                                     'AudioSocket(uuid,host:port)), or "*" for any call')
        endpoint = cls(name, rate=_rate(opts), ptime_ms=_ptime(opts), call_uuid=None if call_uuid == CATCH_ALL
                       else call_uuid, bursty=opts.get_bool("bursty", False),
                       idle_timeout=opts.get_float("idle_timeout_s", IDLE_TIMEOUT_S, minimum=0.0))
        opts.finish()
        try:
            endpoint.attach(runtime)
        except ValueError as err:
            raise opts.error("uuid", str(err)) from None
        return endpoint

    def attach(self, runtime: Runtime) -> None:
        self._unregister = listen_server(runtime).add(self.uuid_option, self._slot)

    def detach(self) -> None:
        if self._unregister:
            self._unregister()
            self._unregister = None

    async def run(self, emit: Emit, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        connection: Connection = await self._slot.take()
        try:
            self.call_uuid = connection.call_uuid
            self.log.info("Asterisk %s connected (call %s)", connection.remote, connection.call_uuid)
            task_status.started()
            await self._session(connection.stream, connection.parser, emit, connection.pending,
                                peer=f"Asterisk {connection.remote}")
        finally:
            if self.uuid_option == CATCH_ALL:
                self.call_uuid = None
            connection.finished.set()
