"""VideoSDK custom WebSocket ingest, dial: the gateway as a device streaming into a VideoSDK
room (spec: /work/shared/protocols/004_c69f0f37162481c1.txt, "Custom WebSocket"; frames in
`frames`, the session call's shapes in `sessions`, webhooks in `webhooks`).

Both roles carry signed 16-bit little-endian PCM, 8 kHz mono, base64 in JSON text frames,
20 ms (320 bytes) per frame both ways; towards the route the endpoint is PCM16 8 kHz mono.
The route's pacer calls `send()` once per 20 ms on absolute deadlines, so the pace on the
wire is the route's ("Stream continuously, about one frame every 20 ms").

Dial (`VideosdkDial`, the gateway as a device): ``POST {api_url}/v2/ingest/sessions`` with
``Authorization: <auth_scheme> <token>`` (spec: Step 1) → ``{wsUrl, callId, expiresIn}``; the
WebSocket to wsUrl is opened before ``expiresIn`` and ``{"event":"start"}`` goes out at once
(Step 2), then ``subscribe`` for the configured topics (Messaging). Room audio becomes
`AudioFrame`s; pub/sub messages and room lifecycle frames become route events
(``message``, ``participant-joined``, ``participant-left``, ``meeting-joined``,
``meeting-left``); ``meeting-left`` ends the endpoint cleanly. A message ``{"dtmf": "5"}``
(on either role, a gateway extension) also raises a ``dtmf`` route event with that digit, which
a VoIPBIN endpoint of the route plays into its call. Route events whose kind is in
`publish_events` are published to `publish_topic` as ``{"kind", "source", **data}``. The
wsUrl holds a single-use ref: it is never logged (`redact_url`, and a log filter installed by
the shared redaction of `gateway.logs` hides ``ref=`` values in library debug lines).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import httpx
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.kit import post_with_retry
from gateway.adapters.videosdk._shared import (
    DEFAULT_PUBLISH_EVENTS,
    GOODBYE_SEND_S,
    _config_list,
    _config_mapping,
    _config_topic,
    _dtmf_of,
    _shown,
)
from gateway.adapters.videosdk.frames import (
    MEETING_JOINED,
    MEETING_LEFT,
    PARTICIPANT_JOINED,
    PARTICIPANT_LEFT,
    SAMPLE_RATE,
    IngestClient,
    Media,
    MeetingJoined,
    MeetingLeft,
    Message,
    ParticipantJoined,
    ParticipantLeft,
    PublishRefused,
    Unknown,
)
from gateway.adapters.videosdk.sessions import (
    SESSIONS_PATH,
    IngestSession,
    parse_session_response,
    session_request,
)
from gateway.adapters.videosdk.webhooks import VideosdkWebhooks
from gateway.adapters.ws import WsEndpoint, WsSession, close_description, dial, pcm_payload
from gateway.codecs.formats import PCM16_8K, AudioFrame
from gateway.config.options import Options
from gateway.endpoint import Emit, PcmIngress, RouteEvent
from gateway.errors import (
    CallEnded,
    LocalProtocolError,
    RemoteProtocolError,
    ServiceError,
)
from gateway.runtime import Runtime

__all__ = ["INGEST_REJECTED", "VideosdkDial"]

EVENT_QUEUE = 64  # route events queued for one dial endpoint's publisher; more are dropped

#: Refused upgrades of the dial side's wsUrl: {status: (cause, permanent)}. A new session
#: may succeed where a spent or expired ref failed, so those are not permanent.
INGEST_REJECTED = {
    401: ("ingest session ref missing", False),
    403: ("ingest session ref unknown", False),
    404: ("no ingest WebSocket at the wsUrl", True),
    409: ("the room's ingest slot already has a device", False),
    410: ("ingest session expired or already claimed", False),
}



# ------------------------------------------------------------------------------------ dial
class VideosdkDial(WsEndpoint[AudioFrame]):
    """The gateway as a device streaming into a VideoSDK room (spec: Steps 1-2, Messaging).

    Audio: PCM16 8 kHz mono both ways, one 20 ms frame per `send`. `run()` creates the
    session (429s retried after Retry-After, at most `MAX_RATE_RETRIES` times), connects
    before it expires, sends start and the subscriptions, then reads until the room ends.
    Raises `ServiceError` (`SessionError` for a refused session call: 401/403 token, 404
    room, both permanent) before `task_status.started()`; after it, `CallEnded` for a normal
    end (``meeting-left``, the server closing, a ``call-hangup`` webhook) and
    `RemoteProtocolError` (after closing with its code) when VideoSDK breaks the protocol.
    """

    kind = "videosdk"
    role = "dial"
    reconnects = True  # a mid-call failure reconnects this endpoint alone (Endpoint.reconnects_after)
    ingress = PCM16_8K
    egress = PCM16_8K
    ptime_ms = 20

    def __init__(
        self,
        name: str,
        *,
        api_url: str,
        token: str,
        room_id: str,
        client: httpx.AsyncClient,
        auth_scheme: str = "Bearer",
        participant: dict[str, Any] | None = None,
        agent: dict[str, Any] | None = None,
        region: str | None = None,
        subscribe: Iterable[str] = (),
        publish_topic: str | None = None,
        publish_events: Iterable[str] = DEFAULT_PUBLISH_EVENTS,
        webhooks: VideosdkWebhooks | None = None,
    ) -> None:
        """Raises `LocalProtocolError` (without the token) for a token that cannot go in a
        header, or a session body field the spec's table refuses."""
        super().__init__(name)
        if not isinstance(token, str) or not token or not token.isprintable() or any(c.isspace() for c in token):
            raise LocalProtocolError("VideoSDK token must be a non-empty string without spaces or control characters")
        self.api_url = api_url.rstrip("/")
        self._authorization = f"{auth_scheme} {token}" if auth_scheme else token
        self.room_id = room_id
        self.request_body = session_request(room_id, participant, agent, region)
        self.client = client
        self.subscribe = tuple(subscribe)
        self.publish_topic = publish_topic
        self.publish_events = frozenset(publish_events)
        self.accepts_events = publish_topic is not None
        self.webhooks = webhooks
        self.call_id: str | None = None
        """callId of the current (last) session: lifecycle webhooks name it."""
        self.session_id: str | None = None
        """The room's meeting session, from ``meeting-joined``."""
        self.events_dropped = 0
        """Route events not published: not connected, or the publish queue was full."""
        self.publish_refused = 0
        """Publishes the spec's limits refused (topic > 128 characters, payload > 8 KB)."""
        self._proto: IngestClient | None = None  # with `session` (WsEndpoint): the stream's framing
        self._events: trio.MemorySendChannel | None = None
        self._tasks: trio.CancelScope | None = None
        self._hangup: str | None = None

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> VideosdkDial:
        """Options: room_id (required), participant_id, participant_name,
        participant_metadata (mapping), agent_id, agent_metadata (mapping), region, token
        (secret; default services.videosdk.token), api_url, subscribe (topics),
        publish_topic, publish_events (route event kinds, default [dtmf])."""
        service = runtime.config.services.videosdk
        token = opts.get_str("token", None, secret=True) or (service.token.reveal() if service.token else None)
        if not token:
            raise opts.error(None, "no VideoSDK token: set services.videosdk.token (or token: on the endpoint)")
        room_id = opts.get_str("room_id", allow_empty=False)
        participant = {}
        for key, field in (("participant_id", "id"), ("participant_name", "name")):
            value = opts.get_str(key, None)
            if value is not None:
                if not value:
                    raise opts.error(key, "expected a non-empty string")
                participant[field] = value
        metadata = _config_mapping(opts, "participant_metadata")
        if metadata is not None:
            participant["metadata"] = metadata
        agent_id = opts.get_str("agent_id", None)
        agent_metadata = _config_mapping(opts, "agent_metadata")
        if agent_metadata is not None and not agent_id:
            raise opts.error("agent_metadata", "needs agent_id (spec: agent.id is required if agent is provided)")
        agent = None
        if agent_id:
            agent = {"id": agent_id} | ({"metadata": agent_metadata} if agent_metadata is not None else {})
        region = opts.get_str("region", None)
        subscribe = _config_list(opts, "subscribe", topics=True) or ()
        publish_topic = _config_topic(opts, "publish_topic")
        publish_events = _config_list(opts, "publish_events")
        if publish_events is not None and publish_topic is None:
            raise opts.error("publish_events", "needs publish_topic (the topic the events are published to)")
        try:
            endpoint = cls(
                name,
                api_url=opts.get_str("api_url", service.api_url),
                token=token,
                auth_scheme=service.auth_scheme,
                room_id=room_id,
                client=runtime.http_client(),
                participant=participant or None,
                agent=agent,
                region=region or None,
                subscribe=subscribe,
                publish_topic=publish_topic,
                publish_events=publish_events if publish_events is not None else DEFAULT_PUBLISH_EVENTS,
                webhooks=VideosdkWebhooks.for_runtime(runtime),
            )
        except LocalProtocolError as err:
            raise opts.error(None, str(err)) from None
        opts.finish()
        return endpoint

    def describe(self) -> str:
        publish = f", events → topic {self.publish_topic!r}" if self.publish_topic else ""
        return f"{self.name} (dial room {self.room_id}{publish})"

    @property
    def _where(self) -> str:
        return f"VideoSDK ingest session (room {self.room_id})"

    # ------------------------------------------------------------------------------ REST
    async def create_session(self) -> IngestSession:
        """``POST {api_url}/v2/ingest/sessions`` (spec: Step 1) → the session.

        A 429 (or a 5xx with Retry-After) is retried per the kit's `RetryPolicy`, after its
        Retry-After (header, either form, else body ``retryAfter``, else backoff).
        Raises `SessionError` (status, permanent, retry_after) or `ServiceError` when the API
        cannot be reached; messages name the room and the cause, never the token."""
        return await post_with_retry(
            self.client, f"{self.api_url}{SESSIONS_PATH}",
            headers={"Authorization": self._authorization, "Content-Type": "application/json"},
            content=json.dumps(self.request_body, separators=(",", ":")).encode(),
            parse=lambda status, body, retry_after_s: parse_session_response(
                status, body, room_id=self.room_id, retry_after_s=retry_after_s),
            what=self._where, log=self.log)

    # ------------------------------------------------------------------------- streaming
    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Create the session, connect, start; `task_status.started()` once the start and
        subscribe frames are out; then emit the room's audio (`AudioFrame`, PCM16 8 kHz
        mono, timestamps in samples) until the room ends (see the class doc for errors)."""
        self._hangup = None
        session = await self.create_session()
        expires_at = trio.current_time() + session.expires_in
        self.call_id = session.call_id
        if self.webhooks is not None:
            self.webhooks.calls[session.call_id] = self
        try:
            with trio.move_on_at(expires_at) as in_time:
                ws = await dial(None, session.ws_url, service=f"VideoSDK room {self.room_id}", rejected=INGEST_REJECTED)
            if in_time.cancelled_caught:
                raise ServiceError(f"{self._where}: expired ({session.expires_in:g} s) before the WebSocket connected")
            proto = IngestClient()
            ws_session = WsSession(ws, payload=pcm_payload, wrap=proto.media)
            try:
                await self._stream(ws_session, proto, emit, task_status)
            finally:
                await ws_session.finish()
        finally:
            if self.webhooks is not None and self.webhooks.calls.get(session.call_id) is self:
                del self.webhooks.calls[session.call_id]

    async def _stream(self, session: WsSession[AudioFrame], proto: IngestClient, emit: Emit, task_status) -> None:
        ws = session.ws
        try:
            await ws.send_message(proto.start())
            for topic in self.subscribe:
                await ws.send_message(proto.subscribe(topic))
        except ConnectionClosed as closed:
            raise ServiceError(f"{self._where}: {close_description(closed)} before the stream started") from None
        events_send, events_recv = trio.open_memory_channel[RouteEvent](EVENT_QUEUE)
        self.session, self._proto, self._events = session, proto, events_send
        self.stats.connects += 1
        self.log.info("streaming into room %s (call %s)", self.room_id, self.call_id)
        task_status.started()
        try:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks.cancel_scope
                if self._hangup is not None:
                    tasks.cancel_scope.cancel()
                if self.publish_topic is not None:
                    tasks.start_soon(self._publisher, events_recv, self.publish_topic)
                await self._receive(session, proto, emit)
        finally:
            self.session = self._proto = self._events = self._tasks = None
        if self._hangup is not None:  # the receive loop was cancelled by hang_up()
            if not proto.stopped:
                with trio.move_on_after(GOODBYE_SEND_S):
                    try:
                        await ws.send_message(proto.stop())
                    except ConnectionClosed:
                        pass
            raise CallEnded(self._hangup)

    async def _receive(self, session: WsSession[AudioFrame], proto: IngestClient, emit: Emit) -> None:
        """Read until the room ends; raises CallEnded or RemoteProtocolError."""
        audio = PcmIngress(emit, SAMPLE_RATE, self.stats)
        ws = session.ws
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as closed:
                raise session.call_ended(closed) from None
            try:
                events = proto.receive(message)
            except RemoteProtocolError as err:
                await session.refuse(err, self.log, "ingest stream")
                raise
            for event in events:
                if isinstance(event, Media):
                    audio(event.pcm)
                elif isinstance(event, Message):
                    self.route_event("message", topic=event.topic, data=event.data, sender_id=event.sender_id,
                                     sender_name=event.sender_name, timestamp=event.timestamp, message_id=event.message_id)
                    if (key := _dtmf_of(event.data, self.log)) is not None:
                        self.route_event("dtmf", digit=key)
                elif isinstance(event, (ParticipantJoined, ParticipantLeft)):
                    kind = PARTICIPANT_JOINED if isinstance(event, ParticipantJoined) else PARTICIPANT_LEFT
                    self.route_event(kind, participant_id=event.participant_id, name=event.name)
                elif isinstance(event, MeetingJoined):
                    self.session_id = event.session_id
                    self.route_event(MEETING_JOINED, room_id=event.room_id, session_id=event.session_id)
                elif isinstance(event, MeetingLeft):
                    self.route_event(MEETING_LEFT, message=event.message)
                    raise CallEnded("meeting left" + (f" ({event.message})" if event.message else ""))
                elif isinstance(event, Unknown):
                    self.log.debug("ignored a %s frame", _shown(event.event))

    # send(): WsEndpoint's (one 20 ms frame of PCM16 8 kHz mono, 320 bytes, as a media frame)

    async def goodbye(self) -> None:
        """``{"event":"stop"}`` (spec: Step 2), then close 1000 with the handshake completed."""
        session, proto = self.session, self._proto
        if session is None or proto is None:
            return
        self.session = None  # no audio after stop (the wire refuses it)
        await session.goodbye(None if proto.stopped else proto.stop(), reason="call ended", timeout=GOODBYE_SEND_S)

    # --------------------------------------------------------------------------- pub/sub
    async def publish(self, topic: str, data: Any) -> None:
        """Publish `data` (a string or any JSON value) to `topic` in the room (spec:
        Messaging, "Publish to a topic"); subscribers other than us receive it.

        Raises `PublishRefused` when the spec's limits refuse it (topic not 1-128
        characters, payload over 8 KB of UTF-8: the message names the cause and sizes);
        nothing is sent and the stream goes on. Raises `ServiceError` when not connected,
        `CallEnded` when the stream has closed."""
        session, proto = self.session, self._proto
        if session is None or proto is None or proto.stopped:
            raise ServiceError(f"{self._where}: not connected, cannot publish")
        text = proto.publish(topic, data)
        try:
            await session.ws.send_message(text)
        except ConnectionClosed as closed:
            raise CallEnded(close_description(closed)) from None
        self.stats.events_out += 1

    def on_route_event(self, event: RouteEvent) -> None:
        """Queue an event of a `publish_events` kind for the publisher (never blocks; when
        not connected or the queue of `EVENT_QUEUE` is full it is dropped and counted)."""
        if event.kind not in self.publish_events:
            return
        queue = self._events
        if queue is None:
            self.events_dropped += 1
            return
        try:
            queue.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.events_dropped += 1

    async def _publisher(self, events: trio.MemoryReceiveChannel[RouteEvent], topic: str) -> None:
        async with events:
            async for event in events:
                payload = {"kind": event.kind, "source": event.source, **event.data}
                try:
                    await self.publish(topic, payload)
                except PublishRefused as err:
                    self.publish_refused += 1
                    self.log.warning("did not publish the %s event to topic %s: %s", event.kind, _shown(topic), err)
                except (CallEnded, ServiceError):
                    return  # the stream is over; the receive loop says why

    # -------------------------------------------------------------------------- webhooks
    def on_webhook(self, name: str, call_id: str) -> None:
        """A verified lifecycle webhook for our callId (`VideosdkWebhooks`)."""
        self.log.info("webhook %s for call %s", _shown(name), call_id)
        if name == "call-hangup":
            self.hang_up("call-hangup webhook")
        else:
            self.route_event(name, call_id=call_id)

    def hang_up(self, reason: str) -> None:
        """End the running session cleanly from any task: stop frame, close 1000, and
        `run()` raises `CallEnded(reason)`."""
        if self._hangup is None:
            self._hangup = reason
        if self._tasks is not None:
            self._tasks.cancel()
