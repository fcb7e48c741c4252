"""VoIPBIN call / conference media stream, dial and listen (spec: shared/protocols/
002_fcf346ba8b7becb9.txt, "Bi-Directional Media Streaming").

Both roles carry 20 ms of 8 kHz mono per binary message in one of three encapsulations (rtp,
sln, audiosocket; framing in `wire.py`). Towards the route the endpoint is always PCM16 8 kHz
mono: the payload codec (u-law or slin) is the adapter's business, because with `codec: auto`
it is only known once the peer's first packet arrives (`wire.MediaStreamProtocol`).

The service ends a call by closing without a close frame (1006): that is the call ending
(`CallEnded`), not a failure to retry.

A client on audiosocket that sends raw slin without AudioSocket headers (the spec's own Node.js
example: the whole file in 320-byte chunks, as fast as it can) is served (`wire`,
"Headerless AudioSocket"): one warning says so, and the endpoint is `bursty` for that session,
so the route queues the unpaced burst (up to `burst_buffer_ms`) and plays it at real time
instead of dropping it as excess latency; when the client closes right after sending, the
route still plays out what it queued before ending.

Idle listen clients: the listen role serves one client per call, so a client that upgrades and
then sends nothing would hold the call (every other client gets 409) for as long as it likes.
A listen client that sends no media message for `idle_timeout_s` (default `IDLE_TIMEOUT_S`,
60 s, as Argon's server ends an idle /audio/connect session) is closed with 1008 (policy
violation: the gateway's rule, like the agent token and VideoSDK start timeouts) and the
reason "idle timeout: no media for 60 s", with one warning line; the route ends that session
as a normal end (`CallEnded`) and waits for the next client at once. The time counts from
the upgrade and from each well-formed message: any message the wire accepts, audio or not
(an RTP packet with an empty payload, the RFC 6263 keepalive; AudioSocket UUID, DTMF, error
or empty audio frames). WebSocket pings are not media: the framing answers them without
telling us, and a silent client must not hold the call by pinging. `idle_timeout_s: 0` turns
the limit off, for receive-only clients (the spec's recording and analysis tools). The dial
role has no idle limit (the service streams continuously and ends calls itself).

Jitter buffer (rtp only; sln and audiosocket arrive in order over the WebSocket and play as
they come). Each session's packets go into a `codecs.jitter.JitterBuffer`: put back in RTP
sequence order (RFC 3550 Appendix A.1 wrap-around and restarts), duplicates dropped, held for
an adaptive depth (from the RFC 3550 §6.4.1 interarrival jitter and the spread of transit
times: it grows at once, by inserting a concealed slot, and shrinks by 5 ms per second in
calm), never more than `jitter_buffer_ms` (default 60). A task of the session plays each slot
at its due time, so the route gets one 20 ms frame per 20 ms, in order and without gaps: a
packet that is not there in time is concealed by `codecs.plc.G711Plc` (ITU-T G.711 Appendix I
waveform repeat, fading to silence after 60 ms, the next packet joined without a click; it
delays the stream by 3.75 ms), or is silence with `concealment: false`; if it comes later it
is dropped (`late_packets`). RFC 4733 telephone-event packets take their slots as silence.
`jitter_buffer_ms: 0` plays packets in arrival order as they come (duplicates still dropped,
sequence gaps concealed). Stats: `jitter_ms`, `jitter_depth_ms`, `reordered`, `duplicates`,
`late_packets`, `concealed` (slots filled in: lost, late or inserted).

DTMF both ways (`dtmf.py`). In: every key press, an RFC 4733 event on rtp (payload type
`dtmf_payload_type`, default 101; its packets never reach the audio path) or an AudioSocket
DTMF frame, is one ``dtmf`` route event (``digit``; ``duration_ms`` too for RFC 4733) counted
in `stats.dtmf_in`. Out: a ``dtmf`` route event from another endpoint (``digit``, optional
``duration_ms``, default 100) is queued (`on_route_event` never blocks) and played by the
next 20 ms slots of our stream: RFC 4733 packets in place of the audio on rtp, one DTMF frame
on audiosocket, the Q.23 tone pair on sln; counted in `stats.dtmf_out`. A digit that is not
a DTMF key is logged and ignored. Presses play only while a session is up and the route sends
audio (the slots are the pacer's); a new session starts with an empty queue.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NoReturn
from urllib.parse import urlencode

import numpy as np
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.listen import IdleLimit, ListenSlot, secret_in
from gateway.adapters.voipbin.dtmf import PT_TELEPHONE_EVENT, DtmfSender
from gateway.adapters.voipbin.wire import (
    Audio,
    CallUuid,
    Codec,
    Dtmf,
    Encapsulation,
    Hangup,
    Headerless,
    KeyPress,
    MediaStreamProtocol,
    PeerError,
    TelephoneEvent,
)
from gateway.adapters.ws import WebSocket, WsEndpoint, WsSession, close, dial, http_to_ws
from gateway.codecs import G711Decoder, G711Encoder
from gateway.codecs.dtmf import duration_ms_of
from gateway.codecs.formats import PCM16_8K, PCMU_8K, AudioFrame, EncodedFrame
from gateway.codecs.jitter import DEFAULT_MAX_MS, JitterBuffer, Slot
from gateway.codecs.plc import G711Plc
from gateway.config.options import Options
from gateway.endpoint import Emit, EndpointStats, RouteEvent, route_dtmf_key
from gateway.errors import CallEnded, CloseCode, RemoteProtocolError
from gateway.mediaclock import Waker
from gateway.runtime import Runtime
from gateway.server import MediaRequest

FRAME_SAMPLES = 160  # 20 ms at 8 kHz
MAX_CONCEALED = 50  # packets of silence inserted for one RTP sequence gap (1 s)
IDLE_TIMEOUT_S = 60.0  # seconds a listen client may send no media message (default of idle_timeout_s)
IDLE_CLOSE_CODE = CloseCode.POLICY_VIOLATION  # policy violation (RFC 6455 §7.4.1): the client broke the gateway's rule

REJECTED = {
    401: ("token rejected", True),
    403: ("token not allowed for this call", True),
    404: ("no such call or conference (or it has ended)", True),
    409: ("the media stream already has a client", False),
}


class _VoipbinEndpoint(WsEndpoint[AudioFrame]):
    kind = "voipbin"
    ingress = PCM16_8K
    egress = PCM16_8K
    ptime_ms = 20
    accepts_events = True  # `dtmf` route events are played into the call
    idle_timeout = 0.0
    """Seconds without a media message from the peer before it is closed; 0: no limit."""
    jitter_buffer_ms = DEFAULT_MAX_MS
    """rtp: the most the ingress jitter buffer holds back (option `jitter_buffer_ms`, ms); 0:
    no buffer (arrival order, duplicates dropped). Module doc, "Jitter buffer"."""
    concealment = True
    """rtp: lost packets are concealed by waveform repeat (G.711 Appendix I); False: silence."""
    _playout: _RtpPlayout | None = None  # this session's rtp ingress, while one is up

    def __init__(self, name: str, *, target: str, target_id: str, encapsulation: Encapsulation, codec: Codec,
                 dtmf_payload_type: int = PT_TELEPHONE_EVENT) -> None:
        super().__init__(name)
        self.dtmf_payload_type = dtmf_payload_type
        """RTP payload type of RFC 4733 telephone-events, both ways (rtp only)."""
        self._dtmf_out: DtmfSender | None = None  # key presses to send, while a session is up
        self.target = target  # "calls" or "conferences"
        self.target_id = target_id
        self.encapsulation = encapsulation
        self.codec = codec
        self._proto: MediaStreamProtocol | None = None  # with `session`: the connection's framing
        self._encoder = G711Encoder()
        self._decoder = G711Decoder()
        self._rx_timestamp = 0
        self.dtmf: list[str] = []
        self.call_uuid: str | None = None

    @staticmethod
    def _parse_target(opts: Options) -> tuple[str, str]:
        call_id = opts.get_str("call_id", None)
        conference_id = opts.get_str("conference_id", None)
        if bool(call_id) == bool(conference_id):
            raise opts.error(None, "expected exactly one of call_id or conference_id")
        if call_id:
            return "calls", call_id
        return "conferences", conference_id

    @property
    def media_path(self) -> str:
        return f"/v1.0/{self.target}/{self.target_id}/media_stream"

    @property
    def clocked(self) -> bool:  # type: ignore[override]
        """rtp with a jitter buffer: `_RtpPlayout` plays one 20 ms slot per ptime (Endpoint.clocked)."""
        return self.encapsulation is Encapsulation.RTP and self.jitter_buffer_ms > 0

    def describe(self) -> str:
        return f"{self.name} ({self.role} {self.target[:-1]} {self.target_id}, {self.encapsulation.value})"

    # ------------------------------------------------------------------------- streaming
    def _session(self, ws: WebSocket, proto: MediaStreamProtocol) -> WsSession[AudioFrame]:
        """The connection's `WsSession`: the payload is u-law or slin as `proto.codec` says
        (with `codec: auto`, known from the peer's first packet), framed by `proto`."""
        encoder = self._encoder

        def payload(frame: AudioFrame) -> bytes:
            if proto.codec is Codec.ULAW:
                return encoder.process(frame)[0].payload
            return frame.to_bytes()

        return WsSession(ws, payload=payload, wrap=proto.send_audio)

    async def _stream(self, session: WsSession[AudioFrame], proto: MediaStreamProtocol, emit: Emit,
                      peer: str = "the service") -> None:
        """Receive until the call ends (`_receive`). On rtp the audio goes through the jitter
        buffer and the concealer, played out by a task of this session (module doc, "Jitter
        buffer"); what is still held when the session ends is played out at once."""
        if proto.encapsulation is not Encapsulation.RTP:
            await self._receive(session, proto, emit, peer)
            return
        playout = self._playout = _RtpPlayout(emit, self.stats, self._decoder, max_ms=self.jitter_buffer_ms,
                                              concealment=self.concealment)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(playout.run)
                try:
                    await self._receive(session, proto, emit, peer)
                finally:
                    playout.finish()
                    nursery.cancel_scope.cancel()
        finally:
            self._playout = None

    async def _receive(self, session: WsSession[AudioFrame], proto: MediaStreamProtocol, emit: Emit,
                       peer: str = "the service") -> None:
        """Receive until the call ends; raises CallEnded (hangup, close, idle timeout) or
        RemoteProtocolError. `peer` names the other side in log lines."""
        ws = session.ws
        self.session, self._proto = session, proto
        self._dtmf_out = DtmfSender(proto.encapsulation.value)  # presses of an earlier session are not played
        self.stats.connects += 1
        self.bursty = False  # until this session's peer shows it sends unpaced (Headerless)
        self._rx_timestamp = 0  # of the frames emitted without a jitter buffer (not rtp)
        playout = self._playout  # rtp: audio goes to the jitter buffer
        # from the upgrade; only `refuse` awaits besides get_message, and it runs with the limit held
        idle = IdleLimit(self.idle_timeout)
        try:
            with idle.scope:
                while True:
                    try:
                        message = await ws.get_message()
                    except ConnectionClosed as closed:
                        raise session.call_ended(closed) from None
                    try:
                        events = proto.receive(message)
                    except RemoteProtocolError as err:
                        idle.hold()
                        await session.refuse(err, self.log, "media stream")
                        raise
                    idle.activity()  # any well-formed message, audio or not
                    self._dispatch(events, emit, playout)
            await self._close_idle(session, peer)  # only an idle deadline ends the loop without raising
        finally:
            self.session = self._proto = self._dtmf_out = None
            for press in proto.flush():  # a key press whose end packets never came
                self._key_pressed(press.digit, duration_ms=press.duration_ms)

    def _dispatch(self, events: list, emit: Emit, playout: _RtpPlayout | None) -> None:
        """The events of one received message (synchronous: nothing here waits)."""
        stats, decoder = self.stats, self._decoder
        for event in events:
            if isinstance(event, Audio):
                if playout is not None:  # rtp: in sequence order, concealed (module doc)
                    stats.frames_in += 1
                    stats.bytes_in += len(event.payload)
                    playout.push(event, trio.current_time())
                    continue
                if event.lost:
                    stats.concealed += min(event.lost, MAX_CONCEALED)
                    for _ in range(min(event.lost, MAX_CONCEALED)):
                        emit(AudioFrame.silence(FRAME_SAMPLES, 8000, 1, self._rx_timestamp))
                        self._rx_timestamp += FRAME_SAMPLES
                if event.codec is Codec.ULAW:
                    frame = decoder.process(EncodedFrame(event.payload, PCMU_8K, len(event.payload), self._rx_timestamp))[0]
                else:
                    frame = AudioFrame.from_bytes(event.payload, 8000, 1, self._rx_timestamp)
                self._rx_timestamp += frame.samples
                stats.frames_in += 1
                stats.bytes_in += len(event.payload)
                emit(frame)
            elif isinstance(event, Hangup):
                raise CallEnded("hangup")
            elif isinstance(event, Headerless):
                self.bursty = True  # before its first frame reaches the route's pacer
                self.log.warning(
                    "%s sends raw slin without AudioSocket headers (as the spec's Node.js example does; "
                    "its first message is not AudioSocket framing: %s); treating it as sln and playing "
                    "its unpaced burst at real time",
                    "client" if self.role == "listen" else "the service", event.reason,
                )
            elif isinstance(event, TelephoneEvent) and playout is not None:
                playout.silent_slot(event.sequence, trio.current_time())  # its slot is not audio loss
            elif isinstance(event, KeyPress):  # RFC 4733 (its packets are `TelephoneEvent`s: ignored)
                self._key_pressed(event.digit, duration_ms=event.duration_ms)
            elif isinstance(event, Dtmf):
                self._key_pressed(event.digit)
            elif isinstance(event, CallUuid):
                self.call_uuid = event.uuid
                self.log.info("AudioSocket call UUID %s", event.uuid)
            elif isinstance(event, PeerError):
                self.log.warning("peer reported an AudioSocket error (code %s)", event.code)

    def _key_pressed(self, digit: str, **data) -> None:
        """One key press from the peer: a `dtmf` route event (`digit`, and `duration_ms` for
        RFC 4733), counted in `stats.dtmf_in`."""
        self.stats.dtmf_in += 1
        self.dtmf.append(digit)
        self.route_event("dtmf", digit=digit, **data)

    def on_route_event(self, event: RouteEvent) -> None:
        """A `dtmf` event from another endpoint (`digit`, optional `duration_ms`, default
        100 ms): queued for `send`, which plays it into the call (module doc). Never blocks;
        a digit that is not a DTMF key, no session, or a full queue: logged, not played."""
        if event.kind != "dtmf":
            return
        key = route_dtmf_key(event, self.log)
        if key is None:
            return
        sender = self._dtmf_out
        if sender is None:
            self.log.info("dtmf %s from %s not played: no media stream connected", key, event.source)
        elif not sender.press(key, duration_ms_of(event.data.get("duration_ms"))):
            self.log.warning("dtmf %s from %s not played: %d key presses already waiting", key, event.source,
                             sender.queued)
        elif self.session is not None:
            self.session.interleave = self._dtmf_slot  # the next slots play it (until it is done)

    async def _close_idle(self, session: WsSession[AudioFrame], peer: str) -> NoReturn:
        """The peer sent no media message for `idle_timeout`: close 1008, one warning, and
        end the session normally (raises CallEnded)."""
        idle = self.idle_timeout
        reason = f"idle timeout: no media for {idle:g} s"
        ended = session.end_reason = f"{reason} (closed {IDLE_CLOSE_CODE})"  # a send in flight says so too
        self.session = self._proto = None  # the route's pacer stops sending to it (and blames no one else)
        self.log.warning("closing the media stream (%d): idle timeout: %s sent no media message for %g s "
                         "(idle_timeout_s: 0 allows receive-only clients)", IDLE_CLOSE_CODE, peer, idle)
        await close(session.ws, IDLE_CLOSE_CODE, reason)
        raise CallEnded(ended)

    # `send()` is WsEndpoint's; while a key press plays, `session.interleave` is this:
    async def _dtmf_slot(self, session: WsSession[AudioFrame], frame: AudioFrame) -> AudioFrame | None:
        """This slot's share of the key presses being sent (`DtmfSender.slot`): sends its
        messages; returns the audio frame to send in the slot (sln: the tone), None for none
        (rtp: an RFC 4733 packet took the slot). Unhooks itself once no press is left."""
        dtmf, proto = self._dtmf_out, self._proto
        if dtmf is None or proto is None or not dtmf.busy:
            session.interleave = None
            return frame
        slot = dtmf.slot(proto)
        if slot.started is not None:
            self.stats.dtmf_out += 1
        try:
            for message in slot.messages:
                await session.ws.send_message(message)
        except ConnectionClosed as closed:
            self.send_failed(session, closed)
            return None
        if not dtmf.busy:
            session.interleave = None
        if not slot.audio:
            return None
        if slot.tone is not None:
            return AudioFrame(slot.tone.reshape(-1, 1), 8000, frame.timestamp)
        return frame

    async def goodbye(self) -> None:
        session, proto = self.session, self._proto
        if session is None or proto is None:
            return
        await session.goodbye(proto.send_hangup(), reason="call ended")


class _RtpPlayout:
    """The rtp ingress of one session: packets into the jitter buffer, its slots out as a
    gap-free, in-order stream of 20 ms PCM16 8 kHz frames for `emit`: received packets (through
    the concealer, which delays them by `plc.DELAY` samples), lost and inserted slots concealed
    (or silence with `concealment: false`). `run` is the task that plays slots at their due
    time; `push` plays what is due at once. Buffer counters go into the endpoint's stats."""

    def __init__(self, emit: Emit, stats: EndpointStats, decoder: G711Decoder, *, max_ms: int,
                 concealment: bool) -> None:
        self.buffer = JitterBuffer(max_ms, ptime_ms=20, rate=8000)
        self.plc = G711Plc() if concealment else None
        self._emit, self._stats, self._decoder = emit, stats, decoder
        self._timestamp = 0
        self._waker = Waker()  # `run` parks on it (gateway.mediaclock: no cancel scope per slot)
        self._sleeping_until = math.inf  # when `run` wakes on its own (-inf while it is awake)
        self._counted = (0, 0, 0)  # buffer's reordered, duplicates, late already in stats

    def push(self, event: Audio, now: float) -> None:
        """One audio packet, decoded now (the buffer holds PCM)."""
        if event.codec is Codec.ULAW:
            pcm = self._decoder.process(EncodedFrame(event.payload, PCMU_8K, len(event.payload), 0))[0].pcm
        else:
            pcm = AudioFrame.from_bytes(event.payload, 8000).pcm
        self.buffer.push(event.sequence, event.timestamp, pcm, now)  # type: ignore[arg-type]  # rtp: always set
        self._play(self.buffer.pop(now))
        self._rewake(now)

    def silent_slot(self, sequence: int, now: float) -> None:
        """An RFC 4733 telephone-event packet: it takes a sequence number (and a ptime) of the
        stream, so its slot plays as silence instead of being concealed as lost."""
        self.buffer.push(sequence, None, np.zeros((FRAME_SAMPLES, 1), dtype=np.int16), now)
        self._play(self.buffer.pop(now))
        self._rewake(now)

    def _rewake(self, now: float) -> None:
        """Wake `run` only when the next due time moved before the one it sleeps until: in a
        steady stream it sleeps to its own deadline, one wake-up per slot instead of two."""
        due = self.buffer.next_due(now)
        if due is not None and due < self._sleeping_until:
            self._waker.wake()

    def _play(self, slots: list[Slot]) -> None:
        plc, stats = self.plc, self._stats
        for slot in slots:
            if slot.payload is None:
                stats.concealed += 1
                pcm = plc.conceal(FRAME_SAMPLES) if plc is not None else np.zeros((FRAME_SAMPLES, 1), dtype=np.int16)
            else:
                pcm = plc.good(slot.payload) if plc is not None else slot.payload
            self._emit(AudioFrame(pcm, 8000, self._timestamp))
            self._timestamp += pcm.shape[0]
        counters = self.buffer.stats
        reordered, duplicates, late = self._counted
        stats.reordered += counters.reordered - reordered
        stats.duplicates += counters.duplicates - duplicates
        stats.late_packets += counters.late - late
        self._counted = (counters.reordered, counters.duplicates, counters.late)
        stats.jitter_ms = counters.jitter_ms
        stats.jitter_depth_ms = round(counters.depth_ms)

    async def run(self) -> None:
        """Play each slot at its due time, until cancelled."""
        waker = self._waker
        while True:
            due = self.buffer.next_due(trio.current_time())
            self._sleeping_until = math.inf if due is None else due
            await waker.wait(self._sleeping_until)  # or a push brings the next due time forward
            self._sleeping_until = -math.inf  # awake: pushes need not wake it
            self._play(self.buffer.pop(trio.current_time()))

    def finish(self) -> None:
        """The session ended: what the buffer holds, and what the concealer held back."""
        self._play(self.buffer.flush())
        if self.plc is not None:
            tail = self.plc.flush()
            self._emit(AudioFrame(tail, 8000, self._timestamp))
            self._timestamp += tail.shape[0]


def _jitter_options(endpoint: _VoipbinEndpoint, opts: Options) -> None:
    """Options `jitter_buffer_ms` (int ms, 0-1000, default 60; 0: no buffer) and `concealment`
    (bool, default true) of the rtp ingress (module doc, "Jitter buffer")."""
    endpoint.jitter_buffer_ms = opts.get_int("jitter_buffer_ms", DEFAULT_MAX_MS, minimum=0, maximum=1000)
    endpoint.concealment = opts.get_bool("concealment", True)


def _encapsulation(opts: Options) -> Encapsulation:
    return Encapsulation(opts.get_choice("encapsulation", [e.value for e in Encapsulation], "rtp"))


def _codec(opts: Options) -> Codec:
    return Codec(opts.get_choice("codec", [c.value for c in Codec], "auto"))


def _dtmf_payload_type(opts: Options) -> int:
    """Option `dtmf_payload_type`: the RTP payload type of RFC 4733 telephone-events (dynamic,
    97-127, default 101); 96 is refused, it is the payload type of VoIPBIN's audio."""
    value = opts.get_int("dtmf_payload_type", PT_TELEPHONE_EVENT, minimum=96, maximum=127)
    if value == 96:
        raise opts.error("dtmf_payload_type", "96 is the payload type of VoIPBIN's audio; use another dynamic one (97-127)")
    return value


class VoipbinDial(_VoipbinEndpoint):
    """The gateway as a client of VoIPBIN: `{api_url as ws}/v1.0/calls/{id}/media_stream
    ?encapsulation=…&token=…` (or `/conferences/{id}`), both directions, 20 ms frames."""

    role = "dial"
    reconnects = True  # a mid-call failure reconnects this endpoint alone (Endpoint.reconnects_after)

    def __init__(self, name: str, *, api_url: str, token: str, **kw) -> None:
        super().__init__(name, **kw)
        self.api_url = api_url
        self._token = token

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> VoipbinDial:
        service = runtime.config.services.voipbin
        target, target_id = cls._parse_target(opts)
        token = opts.get_str("token", None, secret=True) or (service.token.reveal() if service.token else None)
        if not token:
            raise opts.error(None, "no VoIPBIN token: set services.voipbin.token (or token: on the endpoint)")
        endpoint = cls(
            name,
            api_url=opts.get_str("api_url", service.api_url).rstrip("/"),
            token=token,
            target=target,
            target_id=target_id,
            encapsulation=_encapsulation(opts),
            codec=_codec(opts),
            dtmf_payload_type=_dtmf_payload_type(opts),
        )
        _jitter_options(endpoint, opts)
        opts.finish()
        return endpoint

    def url(self) -> str:
        query = urlencode({"encapsulation": self.encapsulation.value, "token": self._token})
        return f"{http_to_ws(self.api_url)}{self.media_path}?{query}"

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        proto = MediaStreamProtocol(self.encapsulation, self.codec, dtmf_payload_type=self.dtmf_payload_type)
        ws = await dial(None, self.url(), service=f"VoIPBIN {self.target[:-1]} {self.target_id}", rejected=REJECTED)
        session = self._session(ws, proto)
        self.log.info("media stream connected (%s)", self.encapsulation.value)
        task_status.started()
        try:
            await self._stream(session, proto, emit)
        finally:
            await session.finish()


class VoipbinListen(_VoipbinEndpoint):
    """The gateway as a VoIPBIN-compatible media server for one call or conference:
    clients connect to `{server.media}/v1.0/calls/{id}/media_stream?encapsulation=…&token=…`
    exactly as they would to VoIPBIN. The token must be one of `services.voipbin.listen_tokens`
    (default: `services.voipbin.token`); the client's `encapsulation` wins over the option.
    A client that sends no media message for `idle_timeout` seconds is closed (module doc)."""

    role = "listen"

    def __init__(self, name: str, *, tokens: tuple[str, ...], idle_timeout: float = IDLE_TIMEOUT_S, **kw) -> None:
        super().__init__(name, **kw)
        self._tokens = tokens
        self.idle_timeout = idle_timeout
        self._slot: ListenSlot[Encapsulation] = ListenSlot(f"VoIPBIN {self.target[:-1]} {self.target_id}")
        self._unregister: Callable[[], None] | None = None

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> VoipbinListen:
        service = runtime.config.services.voipbin
        target, target_id = cls._parse_target(opts)
        tokens = tuple(t.reveal() for t in service.listen_tokens)
        endpoint = cls(name, tokens=tokens, target=target, target_id=target_id,
                       encapsulation=_encapsulation(opts), codec=_codec(opts),
                       dtmf_payload_type=_dtmf_payload_type(opts),
                       idle_timeout=opts.get_float("idle_timeout_s", IDLE_TIMEOUT_S, minimum=0.0))
        _jitter_options(endpoint, opts)
        opts.finish()
        try:
            endpoint.attach(runtime)
        except ValueError:
            raise opts.error(f"{target[:-1]}_id", f"{target[:-1]} {target_id} already has a listen endpoint") from None
        return endpoint

    def attach(self, runtime: Runtime) -> None:
        self._unregister = runtime.media.add(re.escape(self.media_path), self._on_upgrade)

    def detach(self) -> None:
        if self._unregister:
            self._unregister()
            self._unregister = None

    async def _on_upgrade(self, request: MediaRequest) -> None:
        token = request.query.get("token", "")
        if not secret_in(token, self._tokens):
            self.log.info("refused %s: token rejected", request.remote)
            await request.reject(401, "token rejected")
            return
        value = request.query.get("encapsulation", self.encapsulation.value)
        try:
            encapsulation = Encapsulation(value)
        except ValueError:
            await request.reject(400, f"unknown encapsulation {value[:20]!r}: expected rtp, sln or audiosocket")
            return
        await self._slot.offer(request, encapsulation)

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        pending = await self._slot.take()
        session: WsSession[AudioFrame] | None = None
        try:
            ws = await pending.accept()
            proto = MediaStreamProtocol(pending.context, self.codec, dtmf_payload_type=self.dtmf_payload_type)
            session = self._session(ws, proto)
            self.log.info("client %s connected (%s)", pending.request.remote, pending.context.value)
            task_status.started()
            await self._stream(session, proto, emit, peer=f"client {pending.request.remote}")
        finally:
            if session is not None:
                await session.finish(CloseCode.NORMAL, "call ended")
            elif pending.ws is not None:
                await close(pending.ws, CloseCode.NORMAL, "call ended")
            pending.finished.set()
