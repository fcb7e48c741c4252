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
or empty audio frames). WebSocket pings are not media: trio-websocket answers them without
telling us, and a silent client must not hold the call by pinging. `idle_timeout_s: 0` turns
the limit off, for receive-only clients (the spec's recording and analysis tools). The dial
role has no idle limit (the service streams continuously and ends calls itself).
"""

from __future__ import annotations

import hmac
import math
import re
from typing import NoReturn
from urllib.parse import urlencode

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway.adapters.listen import ListenSlot
from gateway.adapters.voipbin.wire import (
    Audio,
    CallUuid,
    Codec,
    Dtmf,
    Encapsulation,
    Hangup,
    Headerless,
    MediaStreamProtocol,
    PeerError,
)
from gateway.adapters.ws import Closing, close, close_description, dial, http_to_ws, refuse
from gateway.codecs import G711Decoder, G711Encoder
from gateway.codecs.formats import PCM16_8K, PCMU_8K, AudioFrame, EncodedFrame
from gateway.config.options import Options
from gateway.endpoint import Emit, Endpoint
from gateway.errors import CallEnded, RemoteProtocolError
from gateway.runtime import Runtime
from gateway.server import MediaRequest

FRAME_SAMPLES = 160  # 20 ms at 8 kHz
MAX_CONCEALED = 50  # packets of silence inserted for one RTP sequence gap (1 s)
IDLE_TIMEOUT_S = 60.0  # seconds a listen client may send no media message (default of idle_timeout_s)
IDLE_CLOSE_CODE = 1008  # policy violation (RFC 6455 §7.4.1): the client broke the gateway's rule

REJECTED = {
    401: ("token rejected", True),
    403: ("token not allowed for this call", True),
    404: ("no such call or conference (or it has ended)", True),
    409: ("the media stream already has a client", False),
}


class _VoipbinEndpoint(Endpoint):
    kind = "voipbin"
    ingress = PCM16_8K
    egress = PCM16_8K
    ptime_ms = 20
    idle_timeout = 0.0
    """Seconds without a media message from the peer before it is closed; 0: no limit."""

    def __init__(self, name: str, *, target: str, target_id: str, encapsulation: Encapsulation, codec: Codec) -> None:
        super().__init__(name)
        self.target = target  # "calls" or "conferences"
        self.target_id = target_id
        self.encapsulation = encapsulation
        self.codec = codec
        self._ws: WebSocketConnection | None = None
        self._proto: MediaStreamProtocol | None = None
        self._encoder = G711Encoder()
        self._decoder = G711Decoder()
        self._closing = Closing()
        self.dtmf: list[str] = []
        self.call_uuid: str | None = None
        self._ended: str | None = None  # why we closed this session ourselves (idle timeout)

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

    def describe(self) -> str:
        return f"{self.name} ({self.role} {self.target[:-1]} {self.target_id}, {self.encapsulation.value})"

    # ------------------------------------------------------------------------- streaming
    async def _stream(self, ws: WebSocketConnection, proto: MediaStreamProtocol, emit: Emit,
                      peer: str = "the service") -> None:
        """Receive until the call ends; raises CallEnded (hangup, close, idle timeout) or
        RemoteProtocolError. `peer` names the other side in log lines."""
        self._ws, self._proto = ws, proto
        self._ended = None
        self.stats.connects += 1
        self.bursty = False  # until this session's peer shows it sends unpaced (Headerless)
        timestamp = 0
        stats = self.stats
        decoder = self._decoder
        idle = self.idle_timeout
        deadline = trio.current_time() + idle if idle > 0 else math.inf  # from the upgrade
        try:
            while True:
                with trio.move_on_at(deadline) as waiting:
                    try:
                        message = await ws.get_message()
                    except ConnectionClosed as closed:
                        raise CallEnded(close_description(closed)) from None
                if waiting.cancelled_caught:
                    await self._close_idle(ws, peer)
                try:
                    events = proto.receive(message)
                except RemoteProtocolError as err:
                    await refuse(ws, err, self.log, "media stream")
                    raise
                if idle > 0:
                    deadline = trio.current_time() + idle  # any well-formed message, audio or not
                for event in events:
                    if isinstance(event, Audio):
                        if event.lost:
                            stats.concealed += min(event.lost, MAX_CONCEALED)
                            for _ in range(min(event.lost, MAX_CONCEALED)):
                                emit(AudioFrame.silence(FRAME_SAMPLES, 8000, 1, timestamp))
                                timestamp += FRAME_SAMPLES
                        if event.codec is Codec.ULAW:
                            frame = decoder.process(EncodedFrame(event.payload, PCMU_8K, len(event.payload), timestamp))[0]
                        else:
                            frame = AudioFrame.from_bytes(event.payload, 8000, 1, timestamp)
                        timestamp += frame.samples
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
                    elif isinstance(event, Dtmf):
                        self.dtmf.append(event.digit)
                        self.route_event("dtmf", digit=event.digit)
                    elif isinstance(event, CallUuid):
                        self.call_uuid = event.uuid
                        self.log.info("AudioSocket call UUID %s", event.uuid)
                    elif isinstance(event, PeerError):
                        self.log.warning("peer reported an AudioSocket error (code %s)", event.code)
        finally:
            self._ws = self._proto = None

    async def _close_idle(self, ws: WebSocketConnection, peer: str) -> NoReturn:
        """The peer sent no media message for `idle_timeout`: close 1008, one warning, and
        end the session normally (raises CallEnded)."""
        idle = self.idle_timeout
        reason = f"idle timeout: no media for {idle:g} s"
        self._ended = f"{reason} (closed {IDLE_CLOSE_CODE})"
        self._ws = self._proto = None  # the route's pacer stops sending to it (and blames no one else)
        self.log.warning("closing the media stream (%d): idle timeout: %s sent no media message for %g s "
                         "(idle_timeout_s: 0 allows receive-only clients)", IDLE_CLOSE_CODE, peer, idle)
        await close(ws, IDLE_CLOSE_CODE, reason)
        raise CallEnded(self._ended)

    async def send(self, frame: AudioFrame) -> None:
        ws, proto = self._ws, self._proto
        if ws is None or proto is None:
            self.stats.dropped += 1
            return
        if proto.codec is Codec.ULAW:
            payload = self._encoder.process(frame)[0].payload
        else:
            payload = frame.to_bytes()
        try:
            await ws.send_message(proto.send_audio(payload))
        except ConnectionClosed as closed:
            raise CallEnded(self._ended or close_description(closed)) from None
        self.stats.frames_out += 1
        self.stats.bytes_out += len(payload)

    async def goodbye(self) -> None:
        ws, proto = self._ws, self._proto
        if ws is None or proto is None:
            return
        hangup = proto.send_hangup()
        if hangup is not None:
            with trio.move_on_after(0.5):
                try:
                    await ws.send_message(hangup)
                except ConnectionClosed:
                    return
        await self._closing.close(ws, 1000, "call ended")


def _encapsulation(opts: Options) -> Encapsulation:
    return Encapsulation(opts.get_choice("encapsulation", [e.value for e in Encapsulation], "rtp"))


def _codec(opts: Options) -> Codec:
    return Codec(opts.get_choice("codec", [c.value for c in Codec], "auto"))


class VoipbinDial(_VoipbinEndpoint):
    """The gateway as a client of VoIPBIN: `{api_url as ws}/v1.0/calls/{id}/media_stream
    ?encapsulation=…&token=…` (or `/conferences/{id}`), both directions, 20 ms frames."""

    role = "dial"

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
        )
        opts.finish()
        return endpoint

    def url(self) -> str:
        query = urlencode({"encapsulation": self.encapsulation.value, "token": self._token})
        return f"{http_to_ws(self.api_url)}{self.media_path}?{query}"

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            ws = await dial(nursery, self.url(), service=f"VoIPBIN {self.target[:-1]} {self.target_id}", rejected=REJECTED)
            proto = MediaStreamProtocol(self.encapsulation, self.codec)
            self._closing = Closing()
            self.log.info("media stream connected (%s)", self.encapsulation.value)
            task_status.started()
            try:
                await self._stream(ws, proto, emit)
            finally:
                await self._closing.settle()
                await close(ws, 1000)
                nursery.cancel_scope.cancel()


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
        self._slot = ListenSlot(f"VoIPBIN {self.target[:-1]} {self.target_id}")
        self._unregister = None

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> VoipbinListen:
        service = runtime.config.services.voipbin
        target, target_id = cls._parse_target(opts)
        tokens = tuple(t.reveal() for t in service.listen_tokens)
        endpoint = cls(name, tokens=tokens, target=target, target_id=target_id,
                       encapsulation=_encapsulation(opts), codec=_codec(opts),
                       idle_timeout=opts.get_float("idle_timeout_s", IDLE_TIMEOUT_S, minimum=0.0))
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
        if not self._tokens or not any(hmac.compare_digest(token.encode(), t.encode()) for t in self._tokens):
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
        session = await self._slot.take()
        try:
            ws = await session.accept()
            proto = MediaStreamProtocol(session.context, self.codec)
            self.log.info("client %s connected (%s)", session.request.remote, session.context.value)
            task_status.started()
            await self._stream(ws, proto, emit, peer=f"client {session.request.remote}")
        finally:
            if session.ws is not None:
                await close(session.ws, 1000, "call ended")
            session.finished.set()
