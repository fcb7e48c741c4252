"""The contract between a route and the endpoints it joins.

An endpoint owns one peer (a WebSocket connection, a file, a recording). The route calls
`run()` in its own nursery and `send()` from its pacer; it never touches the peer directly.

Per-frame rules (DESIGN.md, "Performance model"): `emit` is synchronous and never blocks;
`send` is called once per egress ptime at the route's media-clock deadline; neither logs.
"""

from __future__ import annotations

import abc
import bisect
import logging
from collections.abc import Callable, MutableMapping
from typing import Any, Generic, TypeVar

import attrs
import trio

from gateway.codecs.formats import AudioFormat, AudioFrame, Frame
from gateway.errors import CallEnded, ServiceError

Emit = Callable[[Frame], None]

FrameT = TypeVar("FrameT", bound=Frame)
"""What an endpoint's `send` takes: the frames of its `egress` format (`AudioFrame` for a PCM
sink, `EncodedFrame` for an Opus one, `Frame` for one that takes either)."""


@attrs.frozen
class RouteEvent:
    """Something an endpoint saw that is not audio: a DTMF digit, a pub/sub message, a
    participant joining, an agent becoming ready. The route logs and counts every event and
    hands it to the other endpoints of the route that carry events (`accepts_events`).

    `kind` names it in the field's terms ("dtmf", "message", "participant-joined",
    "agent_ready", ...); `data` holds JSON-able fields (never a secret)."""

    source: str
    """Name of the endpoint that saw it."""
    kind: str
    data: dict[str, Any] = attrs.field(factory=dict)

    def summary(self) -> str:
        """One short line for logs: `dtmf digit=5`."""
        fields = " ".join(f"{k}={_short(v)}" for k, v in self.data.items())
        return f"{self.kind} {fields}".strip()


def route_dtmf_key(event: RouteEvent, log: logging.Logger | logging.LoggerAdapter) -> str | None:
    """The DTMF key of a `dtmf` route event (its `digit`: 0-9, *, #, A-D), or None after one
    warning naming the sender (the endpoints that play route events' keys all check it so)."""
    from gateway.codecs.dtmf import dtmf_key

    digit = event.data.get("digit")
    key = dtmf_key(digit)
    if key is None:
        log.warning("ignoring the dtmf event from %s: digit %r is not a DTMF key (0-9, *, #, A-D)",
                    event.source, str(digit)[:20])
    return key


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Tagged(logging.LoggerAdapter):
    """Attaches `route` and/or `endpoint` to every record, so each log line says where it is
    from: the plain format prints `[route/endpoint] message`, JSON lines carry them as fields
    (gateway/logs.py); the message itself stays clean. A record's own `extra` wins."""

    def __init__(self, logger: logging.Logger, *, route: str | None = None, endpoint: str | None = None) -> None:
        super().__init__(logger, {k: v for k, v in (("route", route), ("endpoint", endpoint)) if v})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}  # extra: set in __init__
        return msg, kwargs


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
"""Upper bounds (seconds) of the added-latency histogram buckets; the last bucket is +Inf."""


@attrs.define
class LatencyHistogram:
    """The latency the gateway added to a sink's audio: for each packet popped from a live
    source's playout buffer, the time from the arrival of its last sample to its send deadline
    (jitter wait and buffering; processing is the same for every packet). Bursty sources are
    played from a queue by design and are not observed. Counts per bucket, not cumulative;
    `metrics` exports them in Prometheus' cumulative form."""

    counts: list[int] = attrs.Factory(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    """counts[i]: observations <= LATENCY_BUCKETS[i] and > the bound before; last: above all."""
    sum: float = 0.0
    """Sum of the observations, seconds."""
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1


@attrs.define
class EndpointStats:
    """Counters of one endpoint, read by the route report, the demo and the metrics."""

    frames_in: int = 0
    """Frames received from the peer (ingress)."""
    bytes_in: int = 0
    """Payload bytes received from the peer."""
    frames_out: int = 0
    """Frames sent to the peer (egress)."""
    bytes_out: int = 0
    """Payload bytes sent to the peer."""
    late: int = 0
    """Egress frames concealed with silence because the audio for them was late (the late
    audio is played when it arrives, a ptime later)."""
    dropped: int = 0
    """Frames of audio lost: beyond a playout buffer's bound (`max_delay_ms`, or the start-up
    allowance) or a full sink queue."""
    skipped: int = 0
    """Egress packets of pause (silence, breath, low background) left out to win back added
    latency: a pause got shorter, no speech was lost."""
    concealed: int = 0
    """Ingress frames filled in for packets lost on the way in (an RTP sequence gap, a lost Opus
    packet): synthesized by loss concealment (G.711 waveform repeat, libopus PLC), fading to
    silence in a long loss, or silence where concealment is off; the media clock stays whole."""
    fec_recovered: int = 0
    """Ingress Opus frames rebuilt from the next packet's in-band FEC (LBRR) data instead of
    concealed (RFC 6716 §2.1.7)."""
    jitter_ms: float = 0.0
    """Interarrival jitter of the ingress packets, ms (RFC 3550 §6.4.1 estimator); 0 where the
    stream carries no RTP timing."""
    jitter_depth_ms: int = 0
    """Current depth of the ingress jitter buffer, ms (what it holds back to reorder and absorb
    jitter); adapts to `jitter_ms`."""
    reordered: int = 0
    """Ingress packets that arrived out of order and were put back in sequence order."""
    duplicates: int = 0
    """Ingress packets received more than once (same sequence number): the copies are dropped."""
    late_packets: int = 0
    """Ingress packets that arrived after their playout time (their slot was already
    concealed): dropped."""
    dtmf_in: int = 0
    """DTMF key presses received from the peer (RFC 4733 events, AudioSocket DTMF frames), one
    per press."""
    dtmf_out: int = 0
    """DTMF key presses sent to the peer (RFC 4733 events, AudioSocket DTMF frames, tones)."""
    outages: int = 0
    """Times this (dial) endpoint's connection failed mid-call and it reconnected on its own
    while the route kept running (route events endpoint-down / endpoint-up)."""
    down_s: float = 0.0
    """Seconds this endpoint was away during its outages that ended (the route's `away_since`
    tells a current one)."""
    dropped_while_down: int = 0
    """Egress packets meant for this endpoint while it was away: dropped, never queued."""
    buffered_ms: int = 0
    """Audio waiting in the route's playout buffers for this sink, after its last packet."""
    peer_errors: int = 0
    """Connections closed because the peer broke the protocol (malformed data: closed with
    the protocol's code) or, for a listen client, failed under us (reset, gone mid-handshake)."""
    connects: int = 0
    """Successful connections (1 + reconnects for dial endpoints, sessions for listen ones)."""
    events_in: int = 0
    """Route events this endpoint raised (DTMF, messages received, participants...)."""
    events_out: int = 0
    """Route events this endpoint passed on to its peer (e.g. published to a topic)."""
    level_dbfs: float = -120.0
    """Level of the audio last sent to this sink (RMS of the last egress packet, dBFS; -120
    for digital silence)."""
    latency: LatencyHistogram = attrs.Factory(LatencyHistogram)
    """Latency the gateway added to this sink's audio (see LatencyHistogram)."""

    def as_dict(self) -> dict[str, object]:
        """Counters as plain JSON-able values (the latency histogram as count and mean)."""
        data = attrs.asdict(self, filter=lambda a, v: a.name != "latency")
        data["level_dbfs"] = round(self.level_dbfs, 1)
        data["jitter_ms"] = round(self.jitter_ms, 2)
        data["down_s"] = round(self.down_s, 3)
        data["latency_count"] = self.latency.count
        data["latency_mean_ms"] = round(1000 * self.latency.sum / self.latency.count, 2) if self.latency.count else None
        return data


class PcmIngress:
    """The ingress of a PCM endpoint: each payload (PCM16 LE mono bytes, whole samples) becomes
    an `AudioFrame` at `rate` Hz with a running timestamp (samples), is counted in
    `frames_in` / `bytes_in`, and goes to the route's `emit`. One per session."""

    __slots__ = ("emit", "rate", "stats", "timestamp")

    def __init__(self, emit: Emit, rate: int, stats: EndpointStats) -> None:
        self.emit, self.rate, self.stats = emit, rate, stats
        self.timestamp = 0

    def __call__(self, pcm: bytes) -> None:
        frame = AudioFrame.from_bytes(pcm, self.rate, 1, self.timestamp)
        self.timestamp += frame.samples
        self.stats.frames_in += 1
        self.stats.bytes_in += len(pcm)
        self.emit(frame)


class Endpoint(abc.ABC, Generic[FrameT]):
    """One side of a route.

    Subclasses set `ingress` (what they emit into the route, None for a sink only), `egress`
    (what `send` accepts, None for a source only) and `ptime_ms` (duration of each egress
    frame). `egress` is the wire format: an Opus sink takes `EncodedFrame`s of `ptime_ms`, a
    PCM sink takes `AudioFrame`s of exactly `egress.samples(ptime_ms)` samples. The type
    parameter says which (`Endpoint[EncodedFrame]`): the route plans each sink's chain to end
    in its `egress`, so a sink is only ever sent frames of that kind.
    """

    kind: str = "endpoint"
    role: str = "dial"
    """"dial" (we are the client of a service, or a local endpoint) or "listen" (we serve)."""
    ingress: AudioFormat | None = None
    egress: AudioFormat | None = None
    ptime_ms: int = 20
    encoder_options: dict = {}
    """Keyword options for `plan()` when the route encodes this endpoint's egress
    (e.g. `opus_bitrate`, `opus_complexity`). For an Opus egress, `opus_input_rate` (Hz, one
    of 8000, 12000, 16000, 24000, 48000; absent or None: from the sources) is also the rate
    the route's pacer mixes this sink's audio at (`Route.pacing_format`)."""
    bursty: bool = False
    """True for sources that send faster than real time in bursts (an AI agent's text to
    speech): the route queues their audio and plays it at real time without dropping or
    speeding up, up to `burst_buffer_ms`, instead of treating early audio as excess latency.
    A source may set it during a session (a client found to send unpaced): the route's pacer
    reads it again with each frame."""
    burst_buffer_ms: int = 60_000
    """Bound of a bursty source's playout queue (ms of audio); beyond it the oldest is dropped."""
    clocked: bool = False
    """True for a source that plays its ingress out on its own media clock, one frame per
    ptime, gap-free and in real time (an RTP jitter buffer with concealment): a pacer fed by it
    alone sends each packet as soon as it is whole, instead of holding it for a deadline of its
    own (a second clock would only add up to a ptime of latency and a wake-up per packet)."""
    local_source: bool = False
    """True for sources that start on their own (a file): the route starts them only once every
    peer endpoint is connected, so their audio plays from the beginning to someone."""
    accepts_events: bool = False
    """True for endpoints that carry route events to their peer (`on_route_event`)."""
    hears: tuple[str, ...] | None = None
    """Names of the route's endpoints this sink takes audio from (option `hears:`); None: every
    other endpoint (mix-minus). A recorder that `hears: [call]` records the call alone."""
    mixes: bool = True
    """False for a sink that takes each source on its own lane instead of a mix (an Argon room
    publishes each participant as a track of its own): the route runs one pacer per source and
    calls `send_from(source, frame)`; `wants_from(source)` says whether a lane is listened to."""
    reconnects: bool = False
    """True for a dial endpoint that reconnects on its own when its connection fails mid-call
    (`reconnects_after`): the route keeps running and calls `run()` again (README, "Reconnect")."""
    identity: str = ""
    """Who this endpoint is as a participant of a room (option `identity:`, default its name):
    a bot in an Argon listen channel that hears identity `call` hears this route's `call`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = EndpointStats()
        self.route_name = ""
        self.log: logging.LoggerAdapter = Tagged(logging.getLogger(f"gateway.endpoint.{self.kind}"), endpoint=name)
        self._post_event: Callable[[RouteEvent], None] = lambda event: None
        self.route_stopping = False
        """Set by `Route.stop()` before the goodbyes: the gateway is shutting the route down
        (a listen endpoint then says "server shutdown" rather than "the other side left")."""
        self.identity = name
        self.peers: tuple[Endpoint, ...] = ()
        """The route's other endpoints (set by the route)."""

    @property
    def start_phase(self) -> int:
        """When the route starts this endpoint: 0 with the listen endpoints (the route comes up
        when their clients connect), 1 with the other peers (dialed once the listen side is
        there), 2 last (local sources such as files, which play from their start to someone)."""
        if self.local_source:
            return 2
        return 0 if self.role == "listen" else 1

    def bind_route(self, route_name: str, post_event: Callable[[RouteEvent], None] | None = None,
                   peers: tuple[Endpoint, ...] = ()) -> None:
        """Called by the route that owns this endpoint: log lines then read `[route/name]`;
        `route_event` goes to `post_event`; `peers` are the route's other endpoints."""
        self.route_name = route_name
        self.peers = peers
        self.log = Tagged(logging.getLogger(f"gateway.endpoint.{self.kind}"), route=route_name, endpoint=self.name)
        if post_event is not None:
            self._post_event = post_event

    def route_event(self, kind: str, **data: Any) -> None:
        """Raise a route event (synchronous, never blocks): the route logs it, counts it and
        forwards it to the endpoints that carry events."""
        self.stats.events_in += 1
        self._post_event(RouteEvent(self.name, kind, data))

    def on_route_event(self, event: RouteEvent) -> None:
        """An event from another endpoint of the route (only called when `accepts_events`).
        Synchronous and must not block: queue it for the endpoint's own task. An endpoint that
        raised a ``mark`` gets its ``mark-played`` here (`gateway.route`, "marks")."""

    def played_mark(self, name: str, played: Callable[[], None]) -> None:
        """As a sink: the packet this endpoint was just sent holds the last audio before a
        route mark `name`; call `played()` once that audio has played (synchronous, must not
        block). The default calls it at once: the peer plays what it is sent as it comes. A
        sink whose peer queues audio of its own (a Twilio listen stream) overrides it."""
        played()

    async def prepare(self) -> None:
        """Work the endpoint can do before its session, so the session starts cheaply (a file
        is decoded once, in small steps between checkpoints). The route awaits it before it
        connects anything or waits for a listen client. Must not raise: whatever is wrong is
        raised by `run()`."""

    def on_route_up(self) -> None:
        """Called once per session when every endpoint of the route is connected (a listen
        endpoint tells its client the other side is there: e.g. agent_ready)."""

    @abc.abstractmethod
    async def run(self, emit: Emit, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the peer, call `task_status.started()` once media can flow, then pass every
        ingress frame to `emit` until the peer ends the session.

        Returns when the session ended normally (hangup, end of file); raises
        `gateway.errors.ServiceError` / `RemoteProtocolError` / `OSError` when it failed.
        A sink-only endpoint keeps running (holding its peer open) until cancelled.
        """

    async def send(self, frame: FrameT) -> None:
        """Send one egress frame to the peer; frames sent before the peer is up are dropped
        and counted. Raises `trio.BrokenResourceError` subclasses' domain equivalents when
        the peer is gone (the route then ends)."""
        raise NotImplementedError(f"{self.kind} endpoint does not accept audio")

    async def send_from(self, source: Endpoint, frame: Frame) -> None:
        """`send` for a sink that does not mix (`mixes = False`): one egress frame of `source`'s
        own lane, at that lane's deadline."""
        raise NotImplementedError(f"{self.kind} endpoint does not take separate sources")

    def wants_from(self, source: Endpoint) -> bool:
        """For a sink that does not mix: whether `source`'s lane has a listener now (when not,
        the route skips encoding and sending it). Synchronous, cheap: called per packet."""
        return True

    def detach(self) -> None:
        """Unregister what `from_config` registered on the runtime (listen paths, channels):
        called once the endpoint's route is removed for good (reload, DELETE). Idempotent."""

    async def goodbye(self) -> None:
        """Say the protocol's goodbye (stop frame, hangup, close 1000). Best effort: the route
        calls it under a short deadline, shielded, before cancelling `run`."""

    def reconnects_after(self, err: BaseException) -> bool:
        """Whether `err`, which ended a session of this endpoint after it was up, is a failure
        that reconnecting can fix while the route keeps running. Default: for endpoints that
        set `reconnects`, any error but `CallEnded` (the peer ended the session normally) and a
        permanent `ServiceError` (a bad token or an unknown channel: the route fails, as
        before). Adapters narrow it where the protocol says more (VoIPBIN: a close without a
        close frame is the call ending)."""
        if not self.reconnects or self.role != "dial":
            return False
        if isinstance(err, CallEnded) or (isinstance(err, ServiceError) and err.permanent):
            return False
        return isinstance(err, Exception)

    def describe(self) -> str:
        """One line for logs: kind, role and what it is connected to (never a secret)."""
        return self.name
