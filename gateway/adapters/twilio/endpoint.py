"""Twilio Media Streams, listen and dial (wire facts and sources: `wire.py`).

Both roles carry u-law 8 kHz mono, base64 in JSON text messages. Towards the route the endpoint
is `PCMU_8K` both ways: the codec graph decodes and encodes the u-law (`gateway.codecs.g711`),
the adapter only moves payload bytes.

**Listen** (`TwilioListen`, `role: listen`): the gateway is the Media Streams WebSocket server
Twilio connects to, on `{server.media}/twilio/{stream}`. A Twilio number whose voice webhook is
`{server.http}/twilio/{stream}/voice` (POST or GET) gets the TwiML
``<Connect><Stream url="{media_url}/twilio/{stream}">`` with the endpoint's `parameters` as
``<Parameter>`` nouns; while the stream's one call is in progress, or while admission is closed,
it gets ``<Reject reason="busy"/>`` instead (a busy tone, not a failed stream). Twilio's
``<Stream>`` takes only ``wss://``: set `server.media_url: wss://…` to the public address (a TLS
proxy in front of `server.media`).

- With `services.twilio.auth_token`, the upgrade and the webhook must carry a valid
  ``X-Twilio-Signature`` (https://www.twilio.com/docs/usage/security#validating-requests; the
  media upgrade: "Media Streams Configuration"): the upgrade is signed over
  `{media_url}{path}` (the URL the TwiML gave Twilio), the webhook over its public URL (the
  ``Host`` header, https or http, with or without the default port) and its form
  parameters. Missing or wrong: 403 and one log line naming the cause, nothing else.
- Twilio's ``media`` (track ``inbound``) goes to the route as it comes (20 ms, live); an
  ``outbound`` track (a ``<Start><Stream track="both_tracks">``) is not the caller and is not
  used. ``dtmf`` is a ``dtmf`` route event (``digit``), ``stop`` ends the session normally.
- What the route sends goes back as ``media`` messages, 20 ms each, at the route's pace.
- A ``clear`` route event (a `TwilioDial` raises one when its server barges in) sends
  ``clear`` with the next frame, so Twilio drops what it buffered (the route has dropped what
  it held: `gateway.route`, "Barge-in and marks").
- A route mark (`played_mark`): a ``mark`` of ours (``gw-N``) goes after the frame that held
  its audio, and the route hears it played when Twilio sends it back (played, or cleared).
- One call at a time per stream (a second upgrade waits up to 1 s, then 409; its webhook is
  answered busy). A stream that sends nothing for `idle_timeout_s` (default 10 s: Twilio sends
  a media message every 20 ms from the start) is closed with 1008 and the session ends.
- A ``dtmf`` route event cannot be played: Media Streams has no message for it (logged, ignored).

**Dial** (`TwilioDial`): the gateway plays Twilio toward a Media Streams server (an AI voice
bot written for Twilio): connects to `url` (with ``X-Twilio-Signature`` when an auth token is
set), sends ``connected`` and ``start`` (new ``MZ…`` stream SID per connection, the configured
`parameters` as ``customParameters``), the route's audio as ``media`` (track ``inbound``, chunk,
timestamp), ``dtmf`` for each ``dtmf`` route event, ``stop`` and close 1000 as goodbye. What the
server sends is played as Twilio plays it (`playback.Playback`): queued, one 20 ms frame per
20 ms on the endpoint's own clock (`Endpoint.clocked`). Each ``mark`` becomes a route mark once
the audio before it has gone to the route, and is sent back on its ``mark-played``: once the
route's sinks have played that audio (a Twilio listen stream: Twilio has). ``clear`` drops what
is queued, sends back the waiting marks (those in the route first) and raises a ``clear``
route event, which drops what the route holds of this endpoint. The server closing with 1000 ends the call (as the end of a
``<Connect><Stream>`` does); any other failure reconnects this endpoint alone (README,
"Reconnect"), with a new stream.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable
from typing import NoReturn

import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.listen import IdleLimit, ListenSlot
from gateway.adapters.playback import Playback
from gateway.adapters.twilio import wire
from gateway.adapters.twilio.config import account_sid_option
from gateway.adapters.ws import (
    Closing,
    WebSocket,
    WsEndpoint,
    WsSession,
    close,
    close_description,
    dial,
    encoded_payload,
    refuse,
    send_quietly,
)
from gateway.codecs.formats import PCMU_8K, EncodedFrame
from gateway.config.options import Options, is_name
from gateway.endpoint import Emit, RouteEvent, route_dtmf_key
from gateway.errors import CallEnded, CloseCode, RemoteProtocolError, ServiceError
from gateway.mediaclock import Waker
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, MediaRequest

IDLE_TIMEOUT_S = 10.0  # seconds a listen stream may send nothing (Twilio sends media every 20 ms)
IDLE_CLOSE_CODE = CloseCode.POLICY_VIOLATION  # 1008 (RFC 6455 §7.4.1): the gateway's rule
BUFFER_MS = 60_000  # dial: the most of the server's audio queued for playing (ms)
WEBHOOK_MAX_BODY = 16 * 1024  # bytes: a voice webhook's form is ~1-2 KiB
PATH_PREFIX = "/twilio/"

REJECTED = {
    400: ("the server refused the upgrade request", True),
    401: ("the server wants authentication (X-Twilio-Signature: set services.twilio.auth_token)", True),
    403: ("the server refused our X-Twilio-Signature (is services.twilio.auth_token the server's?)", True),
    404: ("no Media Streams server at that path", True),
}


class _TwilioEndpoint(WsEndpoint[EncodedFrame]):
    """What both roles share. `send()` is the kit's (`WsEndpoint`): `session` is set once the
    stream has started (the `media` message needs its streamSid) and cleared when it stops."""

    kind = "twilio"
    ingress = PCMU_8K
    egress = PCMU_8K
    ptime_ms = 20
    accepts_events = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._ws: WebSocket | None = None
        self._closing = Closing()
        self._warned_unknown = False
        self._out: list[str] = []  # control messages (clear, mark, dtmf) to send before the next frame

    def _can_queue(self) -> bool:
        """A control message can wait for the next frame (a session, and room: at most 64)."""
        return self.session is not None and len(self._out) < 64

    def _queue(self, message: str) -> None:
        """Send `message` before the next frame (`_can_queue` first): no task, no wait here."""
        assert self.session is not None
        self._out.append(message)
        self.session.interleave = self._send_out

    async def _send_out(self, session: WsSession[EncodedFrame], frame: EncodedFrame) -> EncodedFrame | None:
        """`session.interleave` while control messages wait: they go before the frame, in order."""
        session.interleave = None
        out, self._out = self._out, []
        try:
            for message in out:
                await session.ws.send_message(message)
        except ConnectionClosed as closed:
            self.send_failed(session, closed)
            return None
        return frame

    def _unknown(self, event: wire.Unknown, peer: str) -> None:
        if not self._warned_unknown:  # once per session: Twilio itself only warns (31951)
            self._warned_unknown = True
            self.log.warning("%s sent an unknown message event %r; ignoring it (and any more)", peer, event.event)


def _parameters(opts: Options) -> dict[str, str]:
    """Option `parameters`: a mapping of names to strings (``<Parameter>`` nouns / customParameters)."""
    sub = opts.sub("parameters")
    values = {}
    for key in list(sub.keys()):
        if not isinstance(key, str) or not key:
            raise sub.error(None, f"parameter names are non-empty strings, got {key!r}")
        values[key] = sub.get_str(key)
    sub.finish()
    return values


# ==================================================================================== listen
class TwilioListen(_TwilioEndpoint):
    """The Media Streams WebSocket server Twilio connects to, and its voice webhook (module doc)."""

    role = "listen"

    def __init__(self, name: str, *, stream: str, runtime: Runtime, auth_token: str | None,
                 parameters: dict[str, str] | None = None, twiml: bool = True,
                 idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        super().__init__(name)
        self.stream = stream
        self.runtime = runtime
        self._auth_token = auth_token
        self.parameters = dict(parameters or {})
        self.twiml = twiml
        self.idle_timeout = idle_timeout
        self._slot: ListenSlot[None] = ListenSlot(f"Twilio stream {stream}")
        self._unregister: list[Callable[[], None]] = []
        self._proto: wire.StreamServer | None = None
        self._played: dict[str, Callable[[], None]] = {}  # our marks at Twilio -> the route's played()
        self._marks = 0
        self.call_sid: str | None = None
        self._ended: str | None = None

    @property
    def media_path(self) -> str:
        return PATH_PREFIX + self.stream

    @property
    def webhook_path(self) -> str:
        return PATH_PREFIX + self.stream + "/voice"

    def stream_url(self) -> str:
        """The ``<Stream url>`` of the TwiML: `server.media_url` (or ws://{server.media}) + path."""
        return self.runtime.media_url() + self.media_path

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> TwilioListen:
        service = runtime.config.services.twilio
        stream = opts.get_str("stream", allow_empty=False)
        if not is_name(stream):
            raise opts.error("stream", f"{stream[:40]!r} is not a valid stream name: use 1 to 64 of A-Z a-z 0-9 . _ -")
        twiml = opts.get_bool("twiml", runtime.config.server.http is not None)
        if twiml and runtime.config.server.http is None:
            raise opts.error("twiml", "the voice webhook needs server.http (HOST:PORT), or set twiml: false")
        endpoint = cls(name, stream=stream, runtime=runtime,
                       auth_token=service.auth_token.reveal() if service.auth_token else None,
                       parameters=_parameters(opts), twiml=twiml,
                       idle_timeout=opts.get_float("idle_timeout_s", IDLE_TIMEOUT_S, minimum=0.0))
        opts.finish()
        try:
            endpoint.attach(runtime)
        except ValueError:
            raise opts.error("stream", f"stream {stream} already has a listen endpoint") from None
        return endpoint

    def describe(self) -> str:
        return f"{self.name} (listen Twilio stream {self.stream})"

    def attach(self, runtime: Runtime) -> None:
        self._unregister.append(runtime.media.add(re.escape(self.media_path), self._on_upgrade))
        if self.twiml:
            pattern = re.escape(self.webhook_path)
            for method in ("POST", "GET"):
                self._unregister.append(runtime.http.add(method, pattern, self._on_webhook, max_body=WEBHOOK_MAX_BODY,
                                                         json_depth=None))

    def detach(self) -> None:
        while self._unregister:
            self._unregister.pop()()

    # ------------------------------------------------------------------------ webhook, upgrade
    async def _on_webhook(self, request: HttpRequest) -> HttpResponse:
        """A voice webhook: TwiML connecting the call to this stream (module doc)."""
        who = request.client or "?"
        if self._auth_token is not None:
            try:
                params = wire.parse_form(request.body) if request.method == "POST" else {}
            except ValueError:
                params = None
            if params is None or not wire.signature_valid(self._auth_token, self._webhook_urls(request), params,
                                                          request.headers.get(wire.SIGNATURE_HEADER)):
                cause = self._signature_problem(request.headers.get(wire.SIGNATURE_HEADER))
                self.log.info("refused the voice webhook from %s (403): %s", who, cause)
                return HttpResponse(403, f"{cause}\n".encode(), "text/plain; charset=utf-8")
        if self._slot.busy:
            self.log.info("voice webhook from %s answered busy: stream %s has a call in progress", who, self.stream)
            return _twiml(wire.reject_twiml("busy"))
        if self.runtime.admission.check(f"Twilio voice webhook from {who}") is not None:
            return _twiml(wire.reject_twiml("busy"))  # admission logs the spell once
        return _twiml(wire.connect_stream_twiml(self.stream_url(), self.parameters))

    @staticmethod
    def _webhook_urls(request: HttpRequest) -> list[str]:
        """What Twilio may have signed: the public URL from the Host header (https or http; a
        TLS proxy's X-Forwarded-Proto says which), the path and the query (rebuilt from their
        decoded forms: the same for a plain webhook URL)."""
        host = request.headers.get("host", "")
        target = urllib.parse.quote(request.path, safe="/%:@!$&'()*+,;=-._~")
        query = urllib.parse.urlencode(request.query) if request.query else ""
        suffix = target + ("?" + query if query else "")
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        schemes = [proto] if proto in ("http", "https") else ["https", "http"]
        return [f"{scheme}://{host}{suffix}" for scheme in schemes]

    @staticmethod
    def _signature_problem(header: str | None) -> str:
        return ("no X-Twilio-Signature header" if not header
                else "X-Twilio-Signature does not match (not signed with services.twilio.auth_token for this URL)")

    async def _on_upgrade(self, request: MediaRequest) -> None:
        if self._auth_token is not None:
            header = _header(request, wire.SIGNATURE_HEADER)
            url = self.runtime.media_url() + request.request.path
            if not wire.signature_valid(self._auth_token, url, None, header):
                cause = self._signature_problem(header)
                self.log.info("refused the media upgrade from %s (403): %s", request.remote, cause)
                await request.reject(403, cause)
                return
        await self._slot.offer(request, None)

    # ------------------------------------------------------------------------------ session
    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        session = await self._slot.take()
        peer = f"Twilio stream client {session.request.remote}"
        try:
            ws = await session.accept()
            proto = wire.StreamServer()
            self._ws, self._proto, self._ended = ws, proto, None
            self._out, self._played = [], {}
            self._warned_unknown = False
            self.call_sid = None
            self.stats.connects += 1
            self.log.info("client %s connected", session.request.remote)
            task_status.started()
            await self._receive(ws, proto, emit, peer)
        finally:
            self._ws = self._proto = self.session = None
            if session.ws is not None:
                await close(session.ws, CloseCode.NORMAL, "call ended")
            session.finished.set()

    async def _receive(self, ws: WebSocket, proto: wire.StreamServer, emit: Emit, peer: str) -> None:
        """Receive until the stream ends: raises CallEnded (stop, close, idle) or RemoteProtocolError."""
        stats = self.stats
        # from the upgrade, moved by every message (the limit never ends a stream before
        # `idle_timeout` s without one); `refuse` runs with it held
        idle = IdleLimit(self.idle_timeout)
        timestamp = 0
        with idle.scope:
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed as closed:
                    raise CallEnded(f"Twilio {close_description(closed)}") from None
                idle.activity()
                try:
                    event = proto.receive(message)
                except RemoteProtocolError as err:
                    idle.hold()
                    await refuse(ws, err, self.log, "Twilio media stream")
                    raise
                if type(event) is wire.Media:
                    if event.track == "inbound" and event.payload:
                        size = len(event.payload)
                        stats.frames_in += 1
                        stats.bytes_in += size
                        emit(EncodedFrame(event.payload, PCMU_8K, size, timestamp))
                        timestamp += size
                elif isinstance(event, wire.Start):
                    self.session = WsSession(ws, payload=encoded_payload, wrap=proto.media, peer="Twilio ")
                    self.call_sid = event.call_sid
                    self.log.info("stream %s started: call %s, account %s, tracks %s, parameters %s",
                                  event.stream_sid, event.call_sid, event.account_sid, ",".join(event.tracks),
                                  ",".join(sorted(event.custom_parameters)) or "none")
                elif isinstance(event, wire.Dtmf):
                    stats.dtmf_in += 1
                    self.route_event("dtmf", digit=event.digit)
                elif isinstance(event, wire.Stop):
                    self.session = None  # no media after Twilio's stop
                    raise CallEnded("Twilio stopped the stream (stop)")
                elif isinstance(event, wire.Mark):
                    played = self._played.pop(event.name, None)  # Twilio played (or cleared) up to it
                    if played is not None:
                        played()
                elif isinstance(event, wire.Unknown):
                    self._unknown(event, peer)
                # Connected needs nothing
        await self._close_idle(ws, peer)

    async def _close_idle(self, ws: WebSocket, peer: str) -> NoReturn:
        reason = f"idle timeout: no message for {self.idle_timeout:g} s"
        self._ended = f"{reason} (closed {IDLE_CLOSE_CODE})"
        self._ws = self._proto = self.session = None
        self.log.warning("closing the media stream (%d): %s sent nothing for %g s", IDLE_CLOSE_CODE, peer,
                         self.idle_timeout)
        await close(ws, IDLE_CLOSE_CODE, reason)
        raise CallEnded(self._ended)

    def on_route_event(self, event: RouteEvent) -> None:
        if event.kind == "clear":
            if self._can_queue() and self._proto is not None:
                self._queue(self._proto.clear())  # Twilio drops what it buffered, echoes our marks
        elif event.kind == "dtmf":
            self.log.info("dtmf %s from %s not played: Twilio Media Streams has no message to play a key",
                          str(event.data.get("digit"))[:8], event.source)

    def played_mark(self, name: str, played: Callable[[], None]) -> None:
        """Twilio buffers what it is sent: a route mark is played once Twilio sends back a mark
        of ours sent after that audio (`gateway.route`, "marks")."""
        proto = self._proto
        if self.session is None or proto is None:
            played()  # no stream: nothing of it waits at Twilio
            return
        if not self._can_queue():
            played()  # a flood of marks: this one is not tracked at Twilio
            return
        self._marks += 1
        ours = f"gw-{self._marks}"
        self._played[ours] = played
        self._queue(proto.mark(ours))

    async def goodbye(self) -> None:
        ws = self._ws
        if ws is not None:
            await self._closing.close(ws, CloseCode.NORMAL, "call ended")


def _twiml(text: str) -> HttpResponse:
    return HttpResponse(200, text.encode("utf-8"), "text/xml; charset=utf-8")


def _header(request: MediaRequest, name: str) -> str | None:
    """The last value of a request header (lower-case `name`), or None."""
    found = None
    for key, value in request.request.headers:
        if key.lower() == name.encode("ascii"):
            found = value.decode("latin-1")
    return found


# ====================================================================================== dial
class TwilioDial(_TwilioEndpoint):
    """The gateway as Twilio toward a Media Streams server (module doc)."""

    role = "dial"
    reconnects = True
    clocked = True  # the server's audio plays out on the endpoint's own clock (Playback)

    def __init__(self, name: str, *, url: str, auth_token: str | None = None, parameters: dict[str, str] | None = None,
                 account_sid: str | None = None, buffer_ms: int = BUFFER_MS) -> None:
        super().__init__(name)
        self.url = url
        self._auth_token = auth_token
        self.parameters = dict(parameters or {})
        self.account_sid = account_sid
        self.call_sid = wire.new_sid("CA")  # one call: kept across reconnects (each gets a new stream)
        self.buffer_ms = buffer_ms
        self._proto: wire.StreamClient | None = None
        self.playback: Playback | None = None
        self._player: _Player | None = None
        self._route_marks: dict[str, str] = {}  # the session's marks in the route: our name -> the server's

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> TwilioDial:
        service = runtime.config.services.twilio
        url = opts.get_str("url", allow_empty=False)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise opts.error("url", "expected a ws:// or wss:// URL of a Media Streams server")
        token = opts.get_str("auth_token", None, secret=True) or (service.auth_token.reveal() if service.auth_token else None)
        endpoint = cls(name, url=url, auth_token=token or None, parameters=_parameters(opts),
                       account_sid=account_sid_option(opts, service.account_sid),
                       buffer_ms=opts.get_int("buffer_ms", BUFFER_MS, minimum=200, maximum=600_000))
        opts.finish()
        return endpoint

    def describe(self) -> str:
        return f"{self.name} (dial Twilio stream to {_safe(self.url)})"

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._closing = Closing()
        self._warned_unknown = False
        headers = None
        if self._auth_token:
            headers = [(wire.SIGNATURE_HEADER.encode(), wire.signature(self._auth_token, self.url).encode())]
        proto = wire.StreamClient(call_sid=self.call_sid, custom_parameters=self.parameters,
                                  account_sid=self.account_sid or wire.new_sid("AC"))
        playback = Playback(self.buffer_ms * 8)
        async with trio.open_nursery() as nursery:
            ws = await dial(nursery, self.url, service="Twilio Media Streams server", rejected=REJECTED,
                            extra_headers=headers)
            try:
                await ws.send_message(proto.connected())
                await ws.send_message(proto.start())
                player = _Player(playback, emit, self, ws, proto)
                self._ws, self._proto, self._out, self.playback, self._player = ws, proto, [], playback, player
                self._route_marks = {}
                self.session = WsSession(ws, payload=encoded_payload, wrap=proto.media)
                self.stats.connects += 1
                self.log.info("stream %s connected to %s", proto.stream_sid, _safe(self.url))
                task_status.started()
                nursery.start_soon(player.run)
                while True:
                    event = proto.receive(await ws.get_message())
                    if isinstance(event, wire.Play):
                        if event.payload:
                            player.push(event.payload)
                    elif isinstance(event, wire.Mark):
                        player.mark(event.name)
                    elif isinstance(event, wire.Clear):
                        # what the route holds of ours goes too (its marks first: sent earlier)
                        dropped, names = playback.clear()
                        names = [*self._route_marks.values(), *names]
                        self._route_marks.clear()
                        self.log.info("the server cleared %d ms of queued audio (barge-in)", dropped // 8)
                        self.route_event("clear", dropped_ms=dropped // 8)
                        for name in names if not proto.stopped else ():
                            await ws.send_message(proto.mark(name))
                    elif isinstance(event, wire.Unknown):
                        self._unknown(event, "the server")
            except ConnectionClosed as closed:
                if self._closing.started:
                    return
                if closed.reason is not None and closed.reason.code == CloseCode.NORMAL:
                    raise CallEnded(f"the server {close_description(closed)}") from None
                raise ServiceError(f"Twilio Media Streams server {close_description(closed)}") from None
            except RemoteProtocolError as err:
                await refuse(ws, err, self.log, "Twilio media stream")
                raise
            finally:
                self._ws = self._proto = self.playback = self.session = self._player = None
                await self._closing.settle()
                await close(ws, CloseCode.NORMAL)
                nursery.cancel_scope.cancel()

    def on_route_event(self, event: RouteEvent) -> None:
        if event.kind == "mark-played":
            name = self._route_marks.pop(str(event.data.get("name")), None)
            if name is not None and self._player is not None:
                self._player.echo(name)  # the audio before the server's mark has played: send it back
            return
        if event.kind != "dtmf":
            return
        proto = self._proto
        key = route_dtmf_key(event, self.log)
        if key is None:
            return
        if proto is None or not proto.started or proto.stopped:
            self.log.info("dtmf %s from %s not sent: no stream connected", key, event.source)
        elif self._can_queue():
            self._queue(proto.dtmf(key))
            self.stats.dtmf_out += 1
        else:
            why = "the stream is ending" if self.session is None else f"{len(self._out)} control messages already wait"
            self.log.warning("dtmf %s from %s not sent: %s", key, event.source, why)

    async def goodbye(self) -> None:
        ws, proto = self._ws, self._proto
        if ws is None or proto is None:
            return
        self.session = None  # nothing after our stop
        if not proto.stopped:
            await send_quietly(ws, proto.stop(), timeout=0.5)
        await self._closing.close(ws, CloseCode.NORMAL, "call ended")


class _Player:
    """The dial session's playout task: the server's audio (`Playback`) to the route, one frame
    per ptime. A server's mark whose audio has gone to the route becomes a route ``mark``
    (`gateway.route`, "marks"), and is sent back (`echo`) on its ``mark-played``: once the
    route's sinks have played that audio. Parks on a `Waker` between due times (no cancel scope
    per frame); a push or a mark wakes it only when it brings the next due time forward."""

    def __init__(self, playback: Playback, emit: Emit, endpoint: TwilioDial, ws: WebSocket,
                 proto: wire.StreamClient) -> None:
        self.playback, self.emit, self.endpoint, self.ws, self.proto = playback, emit, endpoint, ws, proto
        self._waker = Waker()
        self._sleeping_until = math.inf
        self._timestamp = 0
        self._echoes: list[str] = []
        self._marks = 0

    def echo(self, name: str) -> None:
        """Send the server's mark `name` back (from the player's task: never blocks here)."""
        self._echoes.append(name)
        self._waker.wake()

    def push(self, payload: bytes) -> None:
        playback = self.playback
        dropped = playback.dropped_bytes
        playback.push(payload, trio.current_time())
        if playback.dropped_bytes != dropped:
            self.endpoint.stats.dropped += 1
        self._rewake()

    def mark(self, name: str) -> None:
        self.playback.mark(name, trio.current_time())
        self._rewake()

    def _rewake(self) -> None:
        due = self.playback.next_due()
        if due is not None and due < self._sleeping_until:
            self._waker.wake()

    async def run(self) -> None:
        playback, emit, stats, waker = self.playback, self.emit, self.endpoint.stats, self._waker
        while True:
            due = playback.next_due()
            self._sleeping_until = math.inf if due is None else due
            if self._echoes:  # came while it was sending: no waiting
                self._sleeping_until = -math.inf
            await waker.wait(self._sleeping_until)
            self._sleeping_until = -math.inf  # awake: pushes need not wake it
            frames, marks = playback.pop(trio.current_time())
            for payload in frames:
                size = len(payload)
                stats.frames_in += 1
                stats.bytes_in += size
                emit(EncodedFrame(payload, PCMU_8K, size, self._timestamp))
                self._timestamp += size
            for name in marks:  # after the frames they follow, in band through the route
                self._marks += 1
                ours = f"{self.proto.stream_sid}/{self._marks}"
                self.endpoint._route_marks[ours] = name
                self.endpoint.route_event("mark", name=ours)
            echoes, self._echoes = self._echoes, []
            try:
                for name in echoes:
                    if self.proto.stopped:
                        break  # our goodbye (stop) went out: nothing follows it
                    await self.ws.send_message(self.proto.mark(name))
            except ConnectionClosed:
                return  # the session is ending: its reader reports why


def _safe(url: str) -> str:
    """The URL without its query string (which may carry a token), for logs."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


__all__ = ["IDLE_TIMEOUT_S", "TwilioDial", "TwilioListen"]
