"""VideoSDK custom WebSocket ingest, listen: the gateway as a VideoSDK-compatible ingest server
(spec: /work/shared/protocols/004_c69f0f37162481c1.txt, "Custom WebSocket"; frames in
`frames`, the session call's shapes in `sessions`).

Both roles carry signed 16-bit little-endian PCM, 8 kHz mono, base64 in JSON text frames,
20 ms (320 bytes) per frame both ways; towards the route the endpoint is PCM16 8 kHz mono.
The route's pacer calls `send()` once per 20 ms on absolute deadlines, so the pace on the
wire is the route's ("Stream continuously, about one frame every 20 ms").

Listen (`VideosdkListen`, the gateway as a VideoSDK-compatible ingest server, one
`VideosdkListenService` per process): ``POST /v2/ingest/sessions`` checks the token against
`services.videosdk.listen_tokens` (``Bearer <token>`` or the bare token; 401), the body (400
naming the field), the room (404: no listen endpoint has that `room_id`), and answers with a
fresh single-use ref valid `SESSION_EXPIRES_S` (90 s, trio clock) in
``{media_url}/videosdk?ref=…``. The upgrade of ``/videosdk`` is refused without a ref (401),
with an unknown one (403), an expired or already claimed one (410), or when the endpoint that
issued it already has a device (409). The device must send start within `START_TIMEOUT_S`
(5 s) or is closed with 1008 "start timeout"; then ``meeting-joined``, media both ways,
pub/sub between the devices connected to the same room (every connected listen session of a
room is a participant; nobody receives their own messages), ``participant-joined`` /
``participant-left`` to the others. A ping goes out every `PING_INTERVAL_S` (30 s); a device
that does not answer within `PONG_TIMEOUT_S` (10 s) is closed with 1011 and the endpoint
ends. Every `RemoteProtocolError` closes only that connection, with its close code and a
warning naming the cause.
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Any, Iterable

import attrs
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.listen import ListenService, ListenSlot, secret_in
from gateway.adapters.videosdk._shared import (
    DEFAULT_PUBLISH_EVENTS,
    GOODBYE_SEND_S,
    _config_list,
    _config_topic,
    _dtmf_of,
    _iso_now,
    _refused,
    _shown,
    log,
)
from gateway.adapters.videosdk.frames import (
    MEETING_JOINED,
    MEETING_LEFT,
    PING_INTERVAL_S,
    SAMPLE_RATE,
    START_TIMEOUT_CLOSE_CODE,
    START_TIMEOUT_REASON,
    START_TIMEOUT_S,
    IngestServer,
    Media,
    MessagingRefused,
    Publish,
    PublishRefused,
    Stopped,
    Subscribe,
    Unknown,
    Unsubscribe,
)
from gateway.adapters.videosdk.room import Outgoing, Participant, Room
from gateway.adapters.videosdk.sessions import (
    INGEST_PATH,
    SESSION_EXPIRES_S,
    SESSIONS_PATH,
    SessionRequestError,
    error_body,
    ingest_url,
    parse_authorization,
    parse_ingest_ref,
    parse_session_request,
    session_response,
)
from gateway.adapters.ws import WsEndpoint, WsSession, close, close_description, pcm_payload, refuse
from gateway.adapters.wsclient import FramedWebSocket as WebSocketConnection
from gateway.codecs.formats import PCM16_8K, AudioFrame
from gateway.config.options import Options
from gateway.endpoint import Emit, PcmIngress, RouteEvent
from gateway.errors import (
    CallEnded,
    CloseCode,
    LocalProtocolError,
    RemoteProtocolError,
)
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, MediaRequest

__all__ = ["PONG_TIMEOUT_S", "VideosdkListen", "VideosdkListenService"]

PONG_TIMEOUT_S = 10.0  # seconds a device has to answer the listen side's ping before close 1011
OUTBOX = 64  # pub/sub and lifecycle frames queued for one listen device; more are dropped
MAX_PENDING_SESSIONS = 1024  # ingest sessions issued and not yet claimed nor expired; then 503
MAX_REMEMBERED_SESSIONS = 16 * MAX_PENDING_SESSIONS  # claimed or expired ones kept for their 410 (180 s)


@attrs.define(eq=False)
class _Claim:
    """An issued ingest session, waiting for its device (listen side)."""

    endpoint: VideosdkListen
    """The listen endpoint the device is handed to."""
    call_id: str
    """``callId`` of the session response."""
    expires_at: float
    """trio clock time after which the ref is refused (410)."""
    participant: dict[str, Any]
    """``participant`` of the request (``id``, ``name``, ``metadata``), possibly empty."""
    used: bool = False
    """True once a device claimed it (a second claim gets 410)."""


@attrs.define(eq=False)
class _Outbox:
    """Frames for one device other than media (deliveries, lifecycle), sent by its writer task."""

    channel: trio.MemorySendChannel[str]
    dropped: int = 0
    """Frames dropped because it was full (a device that does not read)."""

    def post(self, text: str) -> bool:
        """Queue `text` (never blocks; False when full, then counted in `dropped`, or closed)."""
        try:
            self.channel.send_nowait(text)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


class VideosdkListenService(ListenService):
    """The VideoSDK-compatible session REST endpoint and ingest WebSocket of one process.

    Registered once per runtime (`for_runtime`) on `server.http` (``POST
    /v2/ingest/sessions``) and `server.media` (``/videosdk``). Rooms are the `room_id`s of
    the `videosdk` endpoints with `role: listen`; several endpoints may serve one room, each
    holding one device.
    """

    kind = "videosdk"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.rooms: dict[str, Room] = {}
        """room_id → who is connected to it (the pure room model)."""
        self.endpoints: dict[str, list[VideosdkListen]] = {}
        """room_id → the listen endpoints serving it (config)."""
        self.outboxes: dict[Participant, _Outbox] = {}
        """The outbox of every connected participant, for what its room sends it."""
        self._claims: dict[str, _Claim] = {}
        runtime.http.add("POST", SESSIONS_PATH, self.create_session, refuse=_refused)
        runtime.media.add(re.escape(INGEST_PATH), self.ingest)

    def add(self, endpoint: VideosdkListen) -> None:
        self.endpoints.setdefault(endpoint.room_id, []).append(endpoint)

    def remove(self, endpoint: VideosdkListen) -> None:
        endpoints = self.endpoints.get(endpoint.room_id)
        if endpoints is not None and endpoint in endpoints:
            endpoints.remove(endpoint)

    def send(self, outgoing: list[Outgoing]) -> int:
        """Queue what a room returned on each participant's outbox (never blocks); returns
        how many were queued."""
        queued = 0
        for frame in outgoing:
            outbox = self.outboxes.get(frame.to)
            if outbox is not None and outbox.post(frame.text):
                queued += 1
        return queued

    def _purge(self, now: float) -> None:
        """Forget claims a whole expiry period after they expired (until then a late device
        is told 410 "expired" rather than 403 "unknown")."""
        stale = [ref for ref, claim in self._claims.items() if now > claim.expires_at + SESSION_EXPIRES_S]
        for ref in stale:
            del self._claims[ref]

    def _pick(self, endpoints: list[VideosdkListen], now: float) -> VideosdkListen:
        """The endpoint of `room` a new session goes to: a free one with the fewest sessions
        issued and not yet claimed (the first endpoint when all are busy: its device gets 409)."""
        waiting = {id(ep): 0 for ep in endpoints}
        for claim in self._claims.values():
            if not claim.used and claim.expires_at > now and id(claim.endpoint) in waiting:
                waiting[id(claim.endpoint)] += 1
        free = [ep for ep in endpoints if not ep.busy]
        return min(free or endpoints, key=lambda ep: waiting[id(ep)])

    async def create_session(self, request: HttpRequest) -> HttpResponse:
        """``POST /v2/ingest/sessions`` (spec: Step 1). 401 token missing or not one of
        `listen_tokens`; 400 body naming the field; 404 no listen endpoint for roomId; 503
        too many unclaimed sessions; 200 ``{"message":"Ingest session created","data":
        {"wsUrl","callId","expiresIn":90}}``."""
        token = parse_authorization(request.headers.get("authorization"))
        if not secret_in(token, self.settings.listen_tokens):  # the running config's: a reload applies at once
            log.info("ingest session refused (401): token missing or rejected")
            return HttpResponse(401, error_body("token missing or rejected"))
        try:
            body = parse_session_request(request.body)
        except SessionRequestError as err:
            log.info("ingest session refused (400): %s", err)
            return HttpResponse(400, error_body(str(err)))
        endpoints = self.endpoints.get(body.room_id)
        if not endpoints:
            log.info("ingest session refused (404): no room %s", _shown(body.room_id))
            return HttpResponse(404, error_body(f"room {_shown(body.room_id, 64)} not found"))
        now = trio.current_time()
        self._purge(now)
        # Only sessions still waiting for their device count towards the 503: claimed (and
        # expired) ones are remembered just to answer 410, and counting them refused every
        # client once 1024 sessions had been *used* within 180 s (found by tests/test_fuzz.py).
        # Those are forgotten oldest first beyond MAX_REMEMBERED_SESSIONS (then 403, not 410).
        if sum(1 for c in self._claims.values() if not c.used and c.expires_at > now) >= MAX_PENDING_SESSIONS:
            return HttpResponse(503, error_body("too many unclaimed ingest sessions; retry later"), headers=(("retry-after", "5"),))
        if len(self._claims) >= MAX_REMEMBERED_SESSIONS:
            done = [ref for ref, c in self._claims.items() if c.used or c.expires_at <= now]
            for ref in done[: len(self._claims) - MAX_REMEMBERED_SESSIONS + 1]:
                del self._claims[ref]
        endpoint = self._pick(endpoints, now)
        ref = secrets.token_urlsafe(24)
        claim = _Claim(endpoint, str(uuid.uuid4()), now + SESSION_EXPIRES_S, dict(body.participant or {}))
        self._claims[ref] = claim
        ws_url = ingest_url(self.runtime.media_url() + INGEST_PATH, ref)
        endpoint.log.info("ingest session %s issued (participant %s)", claim.call_id,
                          _shown(str(claim.participant.get("name") or claim.participant.get("id") or "unnamed")))
        return HttpResponse(200, session_response(ws_url, claim.call_id, SESSION_EXPIRES_S))

    async def ingest(self, request: MediaRequest) -> None:
        """The ``/videosdk?ref=…`` upgrade: the ref must be known (403), unexpired and not
        claimed before (410); the issuing endpoint must be free (409). Then the device is
        that endpoint's for the rest of the connection."""
        ref = parse_ingest_ref(request.request.path)
        if ref is None:
            log.info("ingest upgrade from %s refused (401): no ref", request.remote)
            await request.reject(401, "missing ingest ref: create a session with POST /v2/ingest/sessions")
            return
        claim = self._claims.get(ref)
        now = trio.current_time()
        if claim is None:
            log.info("ingest upgrade from %s refused (403): unknown ref", request.remote)
            await request.reject(403, "unknown ingest ref: create a session with POST /v2/ingest/sessions")
            return
        if claim.used:
            log.info("ingest upgrade from %s refused (410): session %s already claimed", request.remote, claim.call_id)
            await request.reject(410, "ingest session already claimed: the wsUrl is single-use")
            return
        if now >= claim.expires_at:
            log.info("ingest upgrade from %s refused (410): session %s expired", request.remote, claim.call_id)
            await request.reject(410, f"ingest session expired ({SESSION_EXPIRES_S} s): create a new one")
            return
        endpoint = claim.endpoint
        claim.used = True
        # a device still on that endpoint: the slot waits a moment for it to end, else 409
        await endpoint._slot.offer(request, claim)


class VideosdkListen(WsEndpoint[AudioFrame]):
    """A participant slot of a VideoSDK-compatible room: one device at a time streams PCM16
    8 kHz mono both ways through the spec's custom WebSocket (see the module doc).

    Ends (raising from `run()`): `CallEnded("stop")` on the device's stop frame,
    `CallEnded("device closed (…)")` when it closes, `CallEnded("no pong …")` when it misses
    a pong (closed with 1011, internal error: the server cannot keep a connection it cannot
    see is alive; 1001 would say the server is going away), `RemoteProtocolError` (after
    closing with its code) for a malformed frame. A device that fails before its start frame
    (start timeout 1008, malformed first frame, gone) is closed and the endpoint waits for
    the next one; the route stays waiting.

    Pub/sub: messages the device publishes go to the other devices of the room subscribed to
    the topic, and are raised as ``message`` route events when their topic is one of
    `subscribe` (any topic when `subscribe` is not set). Route events of a `publish_events`
    kind go to the device as messages on `publish_topic` from sender ``gateway`` (named
    `participant_name`), when the device subscribed to it.
    """

    kind = "videosdk"
    role = "listen"
    ingress = PCM16_8K
    egress = PCM16_8K
    ptime_ms = 20
    start_timeout: float = START_TIMEOUT_S
    """Seconds a device has to send its start frame after connecting (spec: 5)."""
    ping_interval: float = PING_INTERVAL_S
    """Seconds between pings (spec: 30)."""
    pong_timeout: float = PONG_TIMEOUT_S
    """Seconds a device has to answer a ping before it is closed with 1011."""

    def __init__(
        self,
        name: str,
        *,
        service: VideosdkListenService,
        room_id: str,
        participant_name: str = "gateway",
        subscribe: Iterable[str] | None = None,
        publish_topic: str | None = None,
        publish_events: Iterable[str] = DEFAULT_PUBLISH_EVENTS,
    ) -> None:
        super().__init__(name)
        self.service = service
        self.room_id = room_id
        self.participant_name = participant_name
        self.subscribe = frozenset(subscribe) if subscribe is not None else None
        self.publish_topic = publish_topic
        self.publish_events = frozenset(publish_events)
        self.accepts_events = publish_topic is not None
        self.call_id: str | None = None
        """callId of the current (last) session."""
        self.messaging_refused = 0
        """Subscribe / publish frames dropped for breaking the topic or payload rules."""
        self._slot: ListenSlot[_Claim] = ListenSlot(f"VideoSDK room {room_id} ({name})")
        self._proto: IngestServer | None = None  # with `session` (WsEndpoint): the device's framing
        self._participant: Participant | None = None

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> VideosdkListen:
        """Options: room_id (required), participant_name (default "gateway"), subscribe
        (topics raised as route events; default all), publish_topic, publish_events (route
        event kinds, default [dtmf])."""
        service = VideosdkListenService.for_runtime(runtime)
        room_id = opts.get_str("room_id", allow_empty=False)
        participant_name = opts.get_str("participant_name", "gateway", allow_empty=False)
        subscribe = _config_list(opts, "subscribe", topics=True)
        publish_topic = _config_topic(opts, "publish_topic")
        publish_events = _config_list(opts, "publish_events")
        if publish_events is not None and publish_topic is None:
            raise opts.error("publish_events", "needs publish_topic (the topic the events are delivered on)")
        endpoint = cls(
            name, service=service, room_id=room_id, participant_name=participant_name, subscribe=subscribe,
            publish_topic=publish_topic,
            publish_events=publish_events if publish_events is not None else DEFAULT_PUBLISH_EVENTS,
        )
        opts.finish()
        service.add(endpoint)
        return endpoint

    def detach(self) -> None:
        self.service.remove(self)

    @property
    def busy(self) -> bool:
        """True while a device holds this endpoint."""
        return self._slot.busy

    def describe(self) -> str:
        return f"{self.name} (listen room {self.room_id})"

    @property
    def room(self) -> Room:
        return self.service.rooms.setdefault(self.room_id, Room(self.room_id))

    # ------------------------------------------------------------------------- streaming
    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Wait for a device (handed over by `VideosdkListenService.ingest`); once it sent
        start: meeting-joined, `task_status.started()`, then emit its audio (`AudioFrame`,
        PCM16 8 kHz mono) until it stops or goes (see the class doc for how it ends)."""
        while True:
            session = await self._slot.take()
            claim: _Claim = session.context
            participant = None
            ws_session: WsSession[AudioFrame] | None = None
            try:
                try:
                    ws = await session.accept()
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    self.log.info("device %s left during the handshake", session.request.remote)
                    continue
                proto = IngestServer()
                if not await self._await_start(ws, proto):
                    continue  # that device is closed; wait for the next one
                outbox_send, outbox_recv = trio.open_memory_channel[str](OUTBOX)
                info = claim.participant
                participant = Participant(
                    id=info.get("id") or str(uuid.uuid4()), name=info.get("name"), metadata=info.get("metadata"),
                    proto=proto,
                )
                self.service.outboxes[participant] = _Outbox(outbox_send)
                room = self.room
                self.service.send(room.join(participant))
                self.call_id = claim.call_id
                try:
                    await ws.send_message(proto.event(MEETING_JOINED, roomId=self.room_id, sessionId=room.session_id))
                except ConnectionClosed as closed:
                    self.log.info("device %s left before joining: %s", session.request.remote, close_description(closed))
                    continue
                ws_session = WsSession(ws, payload=pcm_payload, wrap=proto.media, peer="device ")
                self.session, self._proto, self._participant = ws_session, proto, participant
                self.stats.connects += 1
                self.log.info("device %s joined room %s (call %s, participant %s)", session.request.remote,
                              self.room_id, claim.call_id, _shown(participant.name or participant.id))
                task_status.started()
                await self._stream(ws, proto, participant, outbox_recv, emit)
            finally:
                self.session = self._proto = self._participant = None
                if participant is not None:
                    self.service.send(self.room.leave(participant))
                    self.service.outboxes.pop(participant).channel.close()
                if ws_session is not None:
                    await ws_session.finish(CloseCode.NORMAL, "call ended")
                elif session.ws is not None:
                    await close(session.ws, CloseCode.NORMAL, "call ended")
                session.finished.set()

    def _closed_by_size(self, closed: ConnectionClosed) -> RemoteProtocolError | None:
        """The framing (`gateway.adapters.wsclient`) closes a connection whose message is over
        the media server's limit (64 KiB) itself, with 1009: report it like the wire layer's errors."""
        reason = closed.reason
        if reason is not None and reason.code == CloseCode.MESSAGE_TOO_BIG:
            err = RemoteProtocolError(reason.reason or "message too big", close_code=CloseCode.MESSAGE_TOO_BIG)
            self.log.warning("closing the ingest stream (1009): %s", err)
            return err
        return None

    async def _await_start(self, ws: WebSocketConnection, proto: IngestServer) -> bool:
        """Wait `start_timeout` for the start frame (spec: Step 2). False when the device
        was closed instead (1008 "start timeout", a malformed first frame, or gone)."""
        with trio.move_on_after(self.start_timeout) as waited:
            try:
                message = await ws.get_message()
            except ConnectionClosed as closed:
                if self._closed_by_size(closed) is None:
                    self.log.info("device left before its start frame: %s", close_description(closed))
                return False
        if waited.cancelled_caught:
            self.log.warning("closing the ingest stream (%d): %s: no start frame within %g s",
                             START_TIMEOUT_CLOSE_CODE, START_TIMEOUT_REASON, self.start_timeout)
            await close(ws, START_TIMEOUT_CLOSE_CODE, START_TIMEOUT_REASON)
            return False
        try:
            proto.receive(message)  # before start: [Started] or RemoteProtocolError
        except RemoteProtocolError as err:
            await refuse(ws, err, self.log, "ingest stream")
            return False
        return True

    async def _stream(self, ws, proto: IngestServer, participant: Participant, outbox, emit: Emit) -> None:
        ended: list[str] = []
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._writer, ws, outbox)
            tasks.start_soon(self._keepalive, ws, tasks.cancel_scope, ended)
            await self._receive(ws, proto, participant, emit, ended)
        if ended:
            raise CallEnded(ended[0])

    async def _writer(self, ws: WebSocketConnection, outbox: trio.MemoryReceiveChannel[str]) -> None:
        async with outbox:
            async for text in outbox:
                try:
                    await ws.send_message(text)
                except ConnectionClosed:
                    return

    async def _keepalive(self, ws: WebSocketConnection, scope: trio.CancelScope, ended: list[str]) -> None:
        """A ping every `ping_interval` (absolute deadlines); no pong within `pong_timeout`
        → close 1011 and end the session."""
        next_ping = trio.current_time()
        while True:
            next_ping += self.ping_interval
            await trio.sleep_until(next_ping)
            with trio.move_on_after(self.pong_timeout) as waited:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
            if waited.cancelled_caught:
                reason = f"no pong within {self.pong_timeout:g} s of a ping"
                self.log.warning("closing the ingest stream (1011): %s", reason)
                ended.append(f"{reason} (closed 1011)")
                await close(ws, CloseCode.INTERNAL_ERROR, "ping timeout")
                scope.cancel()
                return

    async def _receive(self, ws, proto: IngestServer, participant: Participant, emit: Emit, ended: list[str]) -> None:
        """Read until the device stops or goes; raises CallEnded or RemoteProtocolError."""
        audio = PcmIngress(emit, SAMPLE_RATE, self.stats)
        room = self.room
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as closed:
                if ended:
                    raise CallEnded(ended[0]) from None
                too_big = self._closed_by_size(closed)
                if too_big is not None:
                    raise too_big from None
                raise CallEnded(f"device {close_description(closed)}") from None
            try:
                events = proto.receive(message)
            except RemoteProtocolError as err:
                await refuse(ws, err, self.log, "ingest stream")
                raise
            for event in events:
                if isinstance(event, Media):
                    audio(event.pcm)
                elif isinstance(event, Subscribe):
                    room.subscribe(participant, event.topic)
                elif isinstance(event, Unsubscribe):
                    room.unsubscribe(participant, event.topic)
                elif isinstance(event, Publish):
                    self.service.send(room.publish(participant, event.topic, event.data, timestamp=_iso_now()))
                    if self.subscribe is None or event.topic in self.subscribe:
                        self.route_event("message", topic=event.topic, data=event.data,
                                         sender_id=participant.id, sender_name=participant.name)
                        if (key := _dtmf_of(event.value, self.log)) is not None:
                            self.route_event("dtmf", digit=key)
                elif isinstance(event, MessagingRefused):
                    self.messaging_refused += 1
                    self.log.warning("dropped the device's %s frame (topic %s): %s", event.event,
                                     _shown(event.topic), event.reason)
                elif isinstance(event, Stopped):
                    # no audio after the device's stop (the wire refuses it), from now on: the
                    # session's tasks still wind down before run() clears the rest
                    self.session = None
                    raise CallEnded("stop")
                elif isinstance(event, Unknown):
                    self.log.debug("ignored a %s frame", _shown(event.event))

    # send(): WsEndpoint's (one 20 ms frame of room audio, PCM16 8 kHz mono, 320 bytes)

    def on_route_event(self, event: RouteEvent) -> None:
        """Deliver an event of a `publish_events` kind to the device on `publish_topic` when it
        subscribed to it (``{"kind","source",**data}`` serialized, sender ``gateway``)."""
        participant, topic = self._participant, self.publish_topic
        if topic is None or event.kind not in self.publish_events or participant is None:
            return
        if topic not in participant.topics:
            return
        payload = {"kind": event.kind, "source": event.source, **event.data}
        sender = {"senderId": "gateway", "senderName": self.participant_name, "timestamp": _iso_now(),
                  "id": str(uuid.uuid4())}
        try:
            text = participant.proto.deliver(topic, payload, sender)
        except PublishRefused as err:
            self.log.warning("did not deliver the %s event on topic %s: %s", event.kind, _shown(topic), err)
            return
        except LocalProtocolError:
            return  # the device already stopped
        if self.service.send([Outgoing(participant, text)]):
            self.stats.events_out += 1

    async def goodbye(self) -> None:
        """``meeting-left`` (the example's lifecycle frame), then close 1000."""
        session, proto = self.session, self._proto
        if session is None or proto is None:
            return
        farewell = None if proto.stopped else proto.event(MEETING_LEFT, message="call ended")
        await session.goodbye(farewell, reason="call ended", timeout=GOODBYE_SEND_S)
