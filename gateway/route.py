"""Routes: endpoints joined through codec chains, paced on a media clock, mixed (mix-minus).

For every source → sink pair the route plans a decode chain (source wire format → the sink's
PCM format: decode, channel mix, resample) that runs in the source's task, on `emit`. For an
Opus sink that PCM format is at its encoder's input rate (`Route.pacing_format`): the sources'
highest rate rounded up to 8, 12, 16, 24 or 48 kHz, or the sink's `opus_input_rate`, so an 8
kHz call reaches an Argon bot with no resampler and is coded narrowband at about half the
encoder CPU (`opus_input_rate: auto`, an Argon dial's default). Each sink
has one pacer task: it owns one `Reframer` per source (the playout buffer), and at absolute
deadlines `anchor + k·ptime` (trio.sleep_until semantics, so no drift) it takes one ptime from
each, mixes them (a sink never hears itself: mix-minus), encodes, and calls `sink.send`.

Playout rules, per sink: `gateway.pacer` (pure objects: `SourcePlayout` per source,
`SinkClock` per sink, driven here by `Route._pace`). In short: the clock anchors on the first
whole packet, a short source waits up to `jitter_ms` then gets silence (`late`), a clocked
source alone sets its sink's clock, excess latency is won back only in pauses, audio beyond
`max_delay_ms` is dropped oldest first, and an ended source plays out before the route ends.

Per-endpoint reconnect (README, "Reconnect"). A dial endpoint that sets `reconnects` and whose
session fails after the route was up with an error `reconnects_after` accepts (Argon's 1006 drop,
a reset, a refused reconnect; never `CallEnded`, which is the far side ending the call) is
called again by the route, after RECONNECT_FIRST_S doubling to RECONNECT_MAX_S (jittered),
while the route and every other endpoint keep running: an `endpoint-down` route event, then
`endpoint-up` once it is back. Meanwhile its pacer drops what the others say to it (counted
`dropped_while_down`: a reconnect never starts with a backlog), and the others hear silence, or
the route's `on_hold` file (looped) in its place. A send that fails mutes the sink at once; its
reader then tells whether the call ended or the connection failed (a reader that does not notice
within SINK_GONE_WAIT is cancelled with the send's error). An outage longer than `reconnect_s`
fails the route as before (ReconnectTimeout: the daemon restarts it with backoff).

Barge-in and marks through the route (the playout queues every sink has here, whatever its
protocol; Twilio Media Streams' ``clear`` and ``mark`` are the model):
- A ``clear`` route event from endpoint S (a Twilio bot's ``clear``; `Route.clear`, which the
  control API's ``POST /v1/routes/{name}/clear`` calls for any endpoint, an agent's too) drops at
  once everything S said that the route still holds: in every sink's queue and playout of S. It
  then goes to the other endpoints as any event, so a sink with a queue of its own beyond the
  route (a Twilio listen stream: Twilio's buffer) sends its ``clear``.
- A ``mark`` route event from S (``name``; `Route.mark`) goes in band after what S sent, into
  every sink that hears S. Once each of those sinks has sent the packet holding the last sample
  S sent before it (and, for a sink that plays out beyond the route, once that has played:
  `Endpoint.played_mark`), S gets a ``mark-played`` event (``name``, ``after_ms``: from the mark
  to its playout) on `on_route_event`; a sink that never takes it (nobody hears S) reports at
  once. A clear passes every mark in what it dropped, at once (no packet of that audio is left
  to send). What the decode chain holds (a resampler's few samples) is not waited for.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import random
from typing import Callable, Sequence

import attrs
import trio
from trio_websocket import ConnectionClosed

from gateway._util import collapse, goodbye_scope
from gateway.adapters.local import FileSource
from gateway.codecs import Chain, plan
from gateway.codecs.formats import AudioFormat, AudioFrame, Encoding, Frame
from gateway.codecs.opus import OPUS_RATE
from gateway.codecs.planner import opus_input_rate_for
from gateway.endpoint import Endpoint, RouteEvent, Tagged
from gateway.errors import CallEnded, GatewayError, RemoteProtocolError
from gateway.mediaclock import Waker
from gateway.pacer import (  # noqa: F401  # _dbfs, _mix, _Pauses, MIN_PAUSE_MS: for the tests
    MIN_PAUSE_MS,
    STARTUP_BUFFER_MS,
    PlayoutMark,
    Send,
    SinkClock,
    Wait,
    _dbfs,
    _mix,
    _Pauses,
)

log = logging.getLogger("gateway.route")

RECONNECT_FIRST_S = 0.1  # an endpoint that failed mid-call reconnects after this (jittered)...
RECONNECT_MAX_S = 5.0  # ...doubling up to this between attempts, within the route's reconnect_s
PLAYOUT_START_WAIT = 1.0  # seconds an ended source waits for the sinks' pacers to start (a far
# side about to be up gets the audio kept for it; one still ringing is given up)
GOODBYE_DEADLINE = 2.0  # seconds for every endpoint to say goodbye when a route stops
RECENT_EVENTS = 32  # route events kept for the report / control API
_END = None  # end-of-stream marker in a sink queue


@attrs.define
class RouteStats:
    """What a route did, for the report, the control API and the demo."""

    started_at: float | None = None
    """trio clock time when every endpoint was connected."""
    ended_at: float | None = None
    ended_by: str = ""
    """Which endpoint ended the route and how (e.g. "voipbin: closed without a close frame (1006)")."""
    sessions: int = 0
    """Times the route came up (restarts and listen sessions included)."""
    events: int = 0
    """Route events raised by its endpoints (DTMF, messages, participants joining...)."""
    recent_events: collections.deque = attrs.Factory(lambda: collections.deque(maxlen=RECENT_EVENTS))
    """The last `RECENT_EVENTS` events as (trio time, RouteEvent), newest last."""


@attrs.define
class _Leg:
    """One source → sinks fan-out: a decode chain and every (queue, slot, sink) it feeds.

    Sinks that take the same PCM format from a source share one chain, so a source is decoded
    and resampled once per target format, not once per sink.
    """

    chain: Chain
    target: AudioFormat
    """The PCM format the chain delivers (the sinks' pacing format)."""
    targets: list[tuple[_SinkQueue, int, Endpoint]] = attrs.Factory(list)


@attrs.define(eq=False)
class _Session:
    """One run() of one endpoint inside a route session (a reconnect starts another)."""

    scope: trio.CancelScope
    ended: trio.Event = attrs.Factory(trio.Event)
    failure: BaseException | None = None
    """Why the route cancelled it (its sink's send failed and the reader did not notice)."""
    watched: bool = False


@attrs.define(eq=False)
class _PendingMark:
    """A source's mark on its way through the route's sinks (module doc, "marks")."""

    source: Endpoint
    name: str
    posted: float
    waiting: int = 0
    """Sinks that have not played it yet."""


class ReconnectTimeout(GatewayError):
    """An endpoint was away longer than the route's `reconnect_s`: the route fails (and the
    daemon restarts it with backoff, as any failure)."""


class Route:
    """Joins two or more endpoints. One `run()` is one session of the route.

    `jitter_ms` and `max_delay_ms` come from the route config (README, "Routes").
    """

    def __init__(self, name: str, endpoints: Sequence[Endpoint], *, jitter_ms: int = 20, max_delay_ms: int = 200,
                 reconnect_s: float = 60.0, on_hold: str | None = None) -> None:
        if len(endpoints) < 2:
            raise ValueError(f"route {name}: a route joins two or more endpoints")
        self.name = name
        self.endpoints = list(endpoints)
        self.jitter_ms = jitter_ms
        self.max_delay_ms = max_delay_ms
        self.stats = RouteStats()
        self.log = Tagged(log, route=name)
        for endpoint in self.endpoints:
            endpoint.bind_route(name, self.post_event, tuple(e for e in self.endpoints if e is not endpoint))
        names = {e.name for e in self.endpoints}
        for endpoint in self.endpoints:
            unknown = sorted(set(endpoint.hears or ()) - names)
            if unknown:
                raise ValueError(f"route {name}: endpoint {endpoint.name} hears {unknown}, which are not endpoints of the route")
        self.sources = [e for e in self.endpoints if e.ingress is not None]
        self.sinks = [e for e in self.endpoints if e.egress is not None]
        if not self.sources or not self.sinks:
            raise ValueError(f"route {name}: needs at least one endpoint that produces audio and one that takes it")
        self.reconnect_s = reconnect_s
        """How long an endpoint that failed mid-call may take to come back (`Endpoint.reconnects`)
        before the route fails; 0: no reconnect, a failure fails the route."""
        self.on_hold = on_hold
        """A file the others hear in place of an endpoint while it is away (looped); None: silence."""
        self._hold = FileSource(f"{name}-hold", on_hold, loop=True, rate=48000) if on_hold else None
        self.encoders: dict[str, Chain] = {}
        """Each pacer's encode chain (its PCM format -> the sink's egress) of the running session,
        by sink name (a lane of a sink that does not mix: "sink<source"): what the control API
        and the tests read to see, e.g., the rate an Opus sink is encoded at."""
        self._muted: set[int] = set()
        self._away: dict[int, float] = {}
        self._pacers: list[tuple[Endpoint | _Lane, _SinkQueue, list[Endpoint], AudioFormat]] = []
        self._clocks: dict[int, SinkClock] = {}  # the running pacers' clocks, by id of their queue
        self._sink_failed = lambda ep, err: False
        self.up = trio.Event()
        self._finish: Callable[[str], None] | None = None
        self._startup: trio.CancelScope | None = None
        self._stopping = False

    def stop(self, reason: str = "stopped") -> None:
        """End the running session cleanly (every endpoint says its goodbye), from any task."""
        self._stopping = True
        for ep in self.endpoints:
            ep.route_stopping = True
        if self._startup is not None:
            self._startup.cancel()
        if self._finish is not None:
            self._finish(reason)

    def away_since(self, endpoint: Endpoint) -> float | None:
        """trio time since which `endpoint` is away (reconnecting mid-call), else None."""
        return self._away.get(id(endpoint))

    def post_event(self, event: RouteEvent) -> None:
        """Log and count an endpoint's event, and hand it to every other endpoint that carries
        events; ``clear`` and ``mark`` act on the route first (module doc), and a ``mark`` goes
        no further. Synchronous; an endpoint that fails to take it is logged, never fatal."""
        now = self._record(event)
        source = next((e for e in self.endpoints if e.name == event.source), None)
        if source is not None and event.kind == "clear":
            self._clear(source)
        elif source is not None and event.kind == "mark":
            self._mark(source, str(event.data.get("name", "")), now)
            return  # the route's business: the others have nothing to do with it
        self._forward(event)

    def _record(self, event: RouteEvent) -> float:
        self.stats.events += 1
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio (tests of the plumbing)
            now = 0.0
        self.stats.recent_events.append((now, event))
        self.log.info("event from %s: %s", event.source, event.summary())
        return now

    def _forward(self, event: RouteEvent) -> None:
        for ep in self.endpoints:
            if ep.accepts_events and ep.name != event.source:
                try:
                    ep.on_route_event(event)
                except Exception:  # a bug in one endpoint must not stop the others
                    self.log.exception("endpoint %s failed to take event %s", ep.name, event.kind)

    def clear(self, endpoint: str) -> int:
        """Barge-in for `endpoint` (module doc): what it said that the route still holds is
        dropped, and the others get a ``clear`` event (``dropped_ms``). Returns the most audio
        dropped for any one sink (ms). Raises KeyError for an endpoint not in the route."""
        source = self._endpoint(endpoint)
        dropped_ms = self._clear(source)
        event = RouteEvent(endpoint, "clear", {"dropped_ms": dropped_ms})
        self._record(event)
        self._forward(event)
        return dropped_ms

    def mark(self, endpoint: str, name: str) -> None:
        """A mark after what `endpoint` has sent so far (module doc): its ``mark-played`` event
        comes once the sinks have played it (in `recent_events`, and to the endpoint). Raises
        KeyError for an endpoint not in the route."""
        self._endpoint(endpoint)
        self.post_event(RouteEvent(endpoint, "mark", {"name": name}))

    def _endpoint(self, name: str) -> Endpoint:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        raise KeyError(name)

    def _clear(self, source: Endpoint) -> int:
        """Drop what `source` said that the pacers still hold; the most for one sink (ms)."""
        cleared_ms = 0
        for pacer_sink, queue, feeding, fmt in self._pacers:
            clock = self._clocks.get(id(queue))
            for slot, fed in enumerate(feeding):
                if fed is source:
                    dropped_us = queue.drop_slot(slot)
                    if clock is not None:
                        dropped_us += clock.clear(slot) * 1_000_000 // fmt.rate
                        if clock.due:  # the marks in what it dropped: no packet of it is left to send
                            self._marks_sent(pacer_sink.sink if isinstance(pacer_sink, _Lane) else pacer_sink, clock.due)
                    if dropped_us >= 1000:
                        self.log.info("cleared %d ms of %s's audio queued for %s", dropped_us // 1000, source.name,
                                      pacer_sink.name)
                    cleared_ms = max(cleared_ms, dropped_us // 1000)
        return cleared_ms

    def _mark(self, source: Endpoint, name: str, now: float) -> None:
        pending = _PendingMark(source, name, now)
        for _, queue, feeding, _ in self._pacers:
            for slot, fed in enumerate(feeding):
                if fed is source:
                    try:
                        queue.send_nowait((slot, PlayoutMark(pending)))  # a mark takes no room
                    except (trio.BrokenResourceError, trio.WouldBlock):
                        continue  # that pacer has finished: the route is ending
                    pending.waiting += 1
        if not pending.waiting:
            self._mark_played(pending)

    def _marks_sent(self, sink: Endpoint, due: list[PlayoutMark]) -> None:
        """The packet holding the marks in `due` went to `sink`: each is played once the sink
        says so (`Endpoint.played_mark`)."""
        for mark in due:
            pending = mark.token
            assert isinstance(pending, _PendingMark)
            try:
                sink.played_mark(pending.name, functools.partial(self._mark_played, pending))
            except Exception:  # a bug in one sink must not lose the mark for the others
                self.log.exception("endpoint %s failed to take mark %r", sink.name, pending.name)
                self._mark_played(pending)
        due.clear()

    def _mark_played(self, pending: _PendingMark) -> None:
        pending.waiting -= 1
        if pending.waiting > 0:
            return
        now = trio.current_time()
        after_ms = round((now - pending.posted) * 1000)
        event = RouteEvent(pending.source.name, "mark-played", {"name": pending.name, "after_ms": after_ms})
        self.stats.recent_events.append((now, event))
        self.log.debug("mark %r of %s played after %d ms", pending.name, pending.source.name, after_ms)
        if pending.source.accepts_events:
            try:
                pending.source.on_route_event(event)
            except Exception:
                self.log.exception("endpoint %s failed to take event mark-played", pending.source.name)

    # ----------------------------------------------------------------------------- plumbing
    def feeding(self, sink: Endpoint) -> list[Endpoint]:
        """The sources whose audio `sink` takes: every other source, or those it `hears`."""
        return [s for s in self.sources if s is not sink and (sink.hears is None or s.name in sink.hears)]

    @staticmethod
    def pacing_format(sink: Endpoint, sources: Sequence[Endpoint]) -> AudioFormat:
        """The PCM format `sink`'s pacer re-frames, mixes and encodes at, for `sources` feeding
        it: the PCM of its egress, except that an Opus sink's rate is its encoder's input rate,
        `opus_input_rate_for` the sources' formats (the highest rate rounded up to 8, 12, 16,
        24 or 48 kHz: an 8 kHz call is encoded at 8 kHz, narrowband, with no resampler; with a
        48 kHz source among them, 48 kHz) or the sink's `opus_input_rate` encoder option."""
        assert sink.egress is not None  # a sink
        target = sink.egress.as_pcm()
        if sink.egress.encoding is Encoding.OPUS:
            rate = opus_input_rate_for([s.ingress for s in sources if s.ingress is not None],
                                       sink.encoder_options.get("opus_input_rate", OPUS_RATE))
            target = attrs.evolve(target, rate=rate)
        return target

    def _legs(self) -> tuple[dict[int, list[_Leg]], list[tuple[Endpoint | _Lane, _SinkQueue, list[Endpoint], AudioFormat]]]:
        """Plan the source → sink chains; returns legs by source and, per pacer, (the sink or
        one lane of a sink that does not mix, its queue, the sources it takes, the PCM format
        it paces at: `pacing_format`)."""
        legs: dict[int, dict] = {id(s): {} for s in self.sources}
        pacers: list[tuple[Endpoint | _Lane, _SinkQueue, list[Endpoint], AudioFormat]] = []
        for sink in self.sinks:
            feeding = self.feeding(sink)
            lanes = [(sink, feeding)] if sink.mixes else [(_Lane(sink, s), [s]) for s in feeding]
            for pacer_sink, sources in lanes:
                target = self.pacing_format(sink, sources)
                send, recv = _open_sink_queue()
                pacers.append((pacer_sink, recv, sources, target))
                for slot, source in enumerate(sources):
                    leg = legs[id(source)].get(target)
                    if leg is None:
                        assert source.ingress is not None  # a source
                        leg = legs[id(source)][target] = _Leg(plan(source.ingress, target), target)
                        self.log.debug("%s → %s: %s", source.name, target, leg.chain)
                    leg.targets.append((send, slot, sink))
        return {key: list(by_format.values()) for key, by_format in legs.items()}, pacers

    def _emitter(self, legs: list[_Leg]):
        """The synchronous `emit` a source calls per frame: decode once per target format,
        queue for each sink, never block."""

        def emit(frame: Frame) -> None:
            for leg in legs:
                for out in leg.chain.process(frame):
                    for queue, slot, sink in leg.targets:
                        try:
                            queue.send_nowait((slot, out))  # type: ignore[arg-type]  # a leg's chain ends in PCM
                        except trio.WouldBlock:
                            sink.stats.dropped += 1
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass  # that sink's pacer has finished; the route is ending

        return emit

    # ---------------------------------------------------------------------------------- run
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> str:
        """Run one session: connect every endpoint, stream until one ends, say goodbye.

        Returns how the route ended ("file: end of file", ...). Raises what an endpoint raised
        (ServiceError, RemoteProtocolError, OSError...) after the others said goodbye.
        """
        legs, pacers = self._legs()
        self._pacers = pacers
        done = trio.Event()
        ended_by: list[str] = []
        failures: list[Exception] = []

        self._finish = lambda reason: finish(reason)

        def finish(reason: str) -> None:
            if not done.is_set():
                ended_by.append(reason)
                done.set()
                if self._startup is not None:  # ended while others still connect (a caller who
                    self._startup.cancel()     # hung up while the bot rang): stop connecting

        async def run_endpoint(ep: Endpoint, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            emit = self._emitter(legs.get(id(ep), []))
            started = False  # its first session came up (the route's start)
            up = False  # the current session is up
            delay = RECONNECT_FIRST_S
            last_failure = ""

            def mark_started() -> None:
                nonlocal started, up, delay
                up = True
                if started:
                    came_back(ep)
                    delay = RECONNECT_FIRST_S
                else:
                    started = True
                    task_status.started()

            try:
                while True:
                    up = False
                    scope = trio.CancelScope()
                    if id(ep) in away:  # reconnecting: within what is left of the outage's budget
                        scope.deadline = away[id(ep)] + self.reconnect_s
                    session = sessions[id(ep)] = _Session(scope)
                    try:
                        try:
                            with scope:
                                await ep.run(emit, task_status=_Started(mark_started))
                        finally:
                            session.ended.set()
                        if not scope.cancelled_caught:
                            reason = f"{ep.name}: ended"
                            break
                        # cancelled by us: its sink failed and the reader did not notice, or the
                        # outage outlasted reconnect_s while connecting
                        raise session.failure or ReconnectTimeout("still connecting")
                    except BaseException as raised:
                        err = collapse(raised)
                        if isinstance(err, RemoteProtocolError) or client_fault(ep, err):
                            ep.stats.peer_errors += 1
                        if client_fault(ep, err):
                            # A listen client broke the protocol or vanished: its connection is closed
                            # (with the code naming the cause); that is the client's failure, not the
                            # route's, so the session ends and the next client is served at once.
                            err = CallEnded(f"client {describe_fault(err)}")
                        if isinstance(err, CallEnded):
                            if not started:  # ended before it was up (a call the bot rejected): no session
                                self.stats.ended_by = f"{ep.name}: {err.reason}"
                                raise err from None
                            reason = f"{ep.name}: {err.reason}"
                            break
                        elif isinstance(err, Exception) and not isinstance(err, BaseExceptionGroup):
                            if not started:
                                raise err from None  # a failed connect fails the route's start
                            if done.is_set():
                                return  # the route is closing: peers going away now is expected
                            if not isinstance(err, ReconnectTimeout) and ep.reconnects_after(err):
                                # Per-endpoint reconnect: the route and every other endpoint keep
                                # running; this one is away (its audio silence or the hold file,
                                # audio for it dropped) until it is back, within reconnect_s.
                                went_away(ep, err, was_up=up)
                                last_failure = describe_failure(err)
                                wait = delay * random.uniform(0.5, 1.0)  # jittered
                                remaining = away[id(ep)] + self.reconnect_s - trio.current_time()
                                if remaining > 0:  # the last try gets what is left of the budget
                                    self.log.info("reconnecting %s in %.0f ms", ep.name, 1000 * min(wait, remaining))
                                    await trio.sleep(min(wait, remaining))
                                    delay = min(delay * 2, RECONNECT_MAX_S)
                                    continue
                            if id(ep) in away:  # the outage outlasted reconnect_s (or ended in a refusal)
                                last = last_failure if isinstance(err, ReconnectTimeout) else describe_failure(err)
                                err = ReconnectTimeout(f"away for {trio.current_time() - away[id(ep)]:.1f} s, not back "
                                                       f"within reconnect_s {self.reconnect_s:g} s (last: {last})")
                            failures.append(err)
                            finish(f"{ep.name}: failed: {err}")
                            return
                        else:
                            raise
            finally:
                returned[id(ep)].set()
                muted.discard(id(ep))
                stop_hold(ep)
            self.log.info("endpoint %s ended: %s", ep.name, reason)
            if ep.ingress is not None and legs.get(id(ep)):
                for leg in legs[id(ep)]:
                    tail = leg.chain.flush()  # the resampler's last few ms
                    for queue, slot, _ in leg.targets:
                        try:
                            for out in tail:
                                queue.send_nowait((slot, out))  # type: ignore[arg-type]  # a leg's chain ends in PCM
                            queue.send_nowait((slot, _END))
                        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                # the sinks' pacers play out what this source buffered, then the route ends
                # (a bursty source may have queued up to its whole burst buffer)
                backlog_ms = ep.burst_buffer_ms if ep.bursty else self.max_delay_ms + STARTUP_BUFFER_MS
                with trio.move_on_after(PLAYOUT_START_WAIT):  # the others may be about to be up: then
                    await pacing.wait()                       # what was kept for them still plays
                if pacing.is_set():
                    with trio.move_on_after(backlog_ms / 1000 + 1.0):
                        await drained[id(ep)].wait()
            finish(reason)

        drained = {id(s): trio.Event() for s in self.sources}
        returned = {id(e): trio.Event() for e in self.endpoints}  # its run() is over for good
        # Per-endpoint reconnect (Endpoint.reconnects): `away` holds when each endpoint now in an
        # outage went away; `muted` the sinks whose packets are dropped (away, or a send failed
        # and its reader is about to tell); `sessions` each endpoint's current run().
        away: dict[int, float] = {}
        self._away = away
        muted = self._muted = set()
        sessions: dict[int, _Session] = {}
        holds: dict[int, trio.CancelScope] = {}

        def went_away(ep: Endpoint, err: BaseException, *, was_up: bool) -> None:
            muted.add(id(ep))
            cause = describe_failure(err)
            if id(ep) in away:
                self.log.info("reconnecting %s failed: %s", ep.name, cause)
                return
            away[id(ep)] = trio.current_time()
            ep.stats.outages += 1
            self.log.warning("endpoint %s is down (%s); the route keeps running while it reconnects "
                             "(for up to reconnect_s %g s)", ep.name, cause, self.reconnect_s)
            self.post_event(RouteEvent(ep.name, "endpoint-down", {"reason": cause}))
            start_hold(ep)

        def came_back(ep: Endpoint) -> None:
            since = away.pop(id(ep), None)
            muted.discard(id(ep))
            stop_hold(ep)
            if since is not None:
                down = trio.current_time() - since
                ep.stats.down_s += down
                self.log.info("endpoint %s is back after %.2f s away", ep.name, down)
                self.post_event(RouteEvent(ep.name, "endpoint-up", {"after_ms": round(down * 1000)}))

        def sink_failed(ep: Endpoint, err: BaseException) -> bool:
            """A send to `ep` failed. For an endpoint that reconnects: drop its packets from now
            on and let its reader end the session (CallEnded: the route ends; a failure: it
            reconnects); a reader that has not noticed within SINK_GONE_WAIT is cancelled with
            this error. False: the pacer ends as before."""
            if not ep.reconnects or ep.role != "dial" or done.is_set():
                return False
            muted.add(id(ep))
            session = sessions.get(id(ep))
            if session is not None and not session.ended.is_set() and not session.watched:
                session.watched = True
                nursery.start_soon(watch_sink, session, err)
            return True

        async def watch_sink(session: _Session, err: BaseException) -> None:
            with trio.move_on_after(SINK_GONE_WAIT):
                await session.ended.wait()
            if not session.ended.is_set():
                session.failure = err
                session.scope.cancel()

        self._sink_failed = sink_failed

        def start_hold(ep: Endpoint) -> None:
            if self._hold is None or not legs.get(id(ep)) or done.is_set():
                return
            scope = holds[id(ep)] = trio.CancelScope()
            nursery.start_soon(play_hold, ep, scope)

        async def play_hold(ep: Endpoint, scope: trio.CancelScope) -> None:
            hold = self._hold
            assert hold is not None and hold.ingress is not None
            emit = self._emitter([_Leg(plan(hold.ingress, leg.target), leg.target, leg.targets) for leg in legs[id(ep)]])
            with scope:
                try:
                    await hold.run(emit)
                except Exception as err:  # noqa: BLE001 - the hold file is a courtesy: never fatal
                    self.log.warning("hold file %s did not play: %s", self.on_hold, err)

        def stop_hold(ep: Endpoint) -> None:
            scope = holds.pop(id(ep), None)
            if scope is not None:
                scope.cancel()

        async def sink_gone(endpoint: Endpoint, reason: str) -> None:
            # The peer of a sink is gone. When the same endpoint is a source whose run() still
            # reads, that reader sees the close in a moment and ends run(), and what the peer
            # sent before it left (an agent's queued speech) plays out to the others first.
            if endpoint.ingress is not None and not returned[id(endpoint)].is_set():
                with trio.move_on_after(SINK_GONE_WAIT):
                    await returned[id(endpoint)].wait()
                if returned[id(endpoint)].is_set():
                    return
            finish(reason)

        async def pace(sink, recv: _SinkQueue, feeding: list[Endpoint], pcm_format: AudioFormat) -> None:
            # A sink whose peer is gone ends the route as its run() would: CallEnded is the
            # peer hanging up, other errors a failure (after the route ended: expected).
            name = getattr(sink, "sink", sink).name
            endpoint = getattr(sink, "sink", sink)
            try:
                await self._pace(sink, recv, feeding, drained, pcm_format)
            except CallEnded as err:
                await sink_gone(endpoint, f"{name}: {err.reason}")
            except (GatewayError, OSError, trio.BrokenResourceError, ConnectionClosed) as err:
                if client_fault(endpoint, err):
                    await sink_gone(endpoint, f"{name}: client {describe_fault(err)}")
                elif not done.is_set():
                    failures.append(err)
                    finish(f"{name}: failed: {err}")
        pacing = trio.Event()  # the sinks' pacers run (they start once the peers are connected)

        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as startup:
                    self._startup = startup
                    if self._stopping:
                        startup.cancel()
                    for ep in self.endpoints:  # before anyone waits on this route
                        await ep.prepare()
                    if self._hold is not None:
                        await self._hold.prepare()
                    # Listen endpoints first: the route comes up when their clients connect (no
                    # outgoing stream is held open for nobody). Then the other peers, concurrently;
                    # local sources (files) last, so a file plays from its beginning to someone
                    # (Endpoint.start_phase).
                    phase = {ep.name: ep.start_phase for ep in self.endpoints}
                    await _start_all(nursery, run_endpoint, [e for e in self.endpoints if phase[e.name] == 0])
                    await _start_all(nursery, run_endpoint, [e for e in self.endpoints if phase[e.name] == 1])
                    for pacer_sink, recv, feeding, pcm_format in pacers:
                        nursery.start_soon(pace, pacer_sink, recv, feeding, pcm_format)
                    pacing.set()
                    await _start_all(nursery, run_endpoint, [e for e in self.endpoints if phase[e.name] >= 2])
                self._startup = None
                if startup.cancelled_caught:  # stop(), or an endpoint ended, while connecting
                    task_status.started()
                    await self._goodbye()
                    nursery.cancel_scope.cancel()
                    reason = self.stats.ended_by = ended_by[0] if ended_by else "stopped"
                    if failures:
                        raise failures[0]
                    return reason
                self.stats.started_at = trio.current_time()
                self.stats.sessions += 1
                self.up.set()
                self.log.info("route up: %s", ", ".join(e.describe() for e in self.endpoints))
                for ep in self.endpoints:
                    try:
                        ep.on_route_up()
                    except Exception:
                        self.log.exception("endpoint %s failed in on_route_up", ep.name)
                task_status.started()
                await done.wait()
                reason = ended_by[0] if ended_by else "stopped"
                self.stats.ended_by = reason
                await self._goodbye()
                nursery.cancel_scope.cancel()
        except BaseException:
            await self._goodbye()
            raise
        finally:
            self.stats.ended_at = trio.current_time()
        if failures:
            self.log.warning("route ended: %s", reason)
            raise failures[0]
        self.log.info("route ended: %s", reason)
        return reason

    async def _goodbye(self) -> None:
        # shielded: a cancelled route still says goodbye, up to GOODBYE_DEADLINE
        with goodbye_scope(GOODBYE_DEADLINE):
            async with trio.open_nursery() as nursery:
                for ep in self.endpoints:
                    nursery.start_soon(_quiet_goodbye, ep, self.log)

    # -------------------------------------------------------------------------------- pacer
    async def _pace(
        self,
        sink: Endpoint,
        recv: _SinkQueue,
        feeding: list[Endpoint],
        drained: dict[int, trio.Event],
        pcm_format: AudioFormat | None = None,
    ) -> None:
        """Send one packet per ptime to `sink` on absolute deadlines, mixing and re-framing at
        `pcm_format` (`pacing_format`: the egress's PCM, or for an Opus sink its encoder's
        input rate): the driver of a `gateway.pacer.SinkClock`, whose rules those are."""
        if pcm_format is None:
            pcm_format = self.pacing_format(sink, feeding)
        options = dict(sink.encoder_options)
        assert sink.egress is not None  # a sink
        if sink.egress.encoding is Encoding.OPUS:
            options["opus_input_rate"] = pcm_format.rate  # no resampler after the mix
        encoder = self.encoders[sink.name] = plan(pcm_format, sink.egress, **options)
        self.log.debug("%s paces at %s, encodes: %s", sink.name, pcm_format, encoder)
        stats = sink.stats
        clock = SinkClock(feeding, pcm_format, sink.ptime_ms, stats=stats, jitter_ms=self.jitter_ms,
                          max_delay_ms=self.max_delay_ms, clocked=len(feeding) == 1 and feeding[0].clocked)
        playouts, accept, due = clock.playouts, clock.accept, clock.due
        self._clocks[id(recv)] = clock
        endpoint = getattr(sink, "sink", sink)  # a lane's sink
        key, muted = id(endpoint), self._muted
        current_time = trio.current_time
        steps = clock.steps()
        with recv:
            try:
                step = next(steps)
                while True:
                    kind = type(step)
                    if kind is Wait:
                        until, done = step.until, step.done  # type: ignore[union-attr]
                        while not done():
                            item = await recv.receive_until(until)
                            if item is None:
                                break
                            accept(item[0], item[1], current_time())
                    elif kind is Send:
                        if key in muted:  # away (reconnecting): dropped, never queued into latency
                            stats.dropped_while_down += 1
                        elif getattr(sink, "listened", True):  # a lane nobody hears is not encoded
                            for out in encoder.process(step.frame):  # type: ignore[union-attr]
                                try:
                                    await sink.send(out)
                                except SEND_FAILURES as err:
                                    if not self._sink_failed(endpoint, err):
                                        raise
                                    stats.dropped_while_down += 1
                                    break
                        if due:
                            self._marks_sent(endpoint, due)
                        for i, playout in enumerate(playouts):
                            if playout.drained:
                                drained[id(feeding[i])].set()
                    else:  # DRAIN: what is already queued (a (re-)anchor's backlog)
                        while True:
                            try:
                                item = recv.receive_nowait()
                            except trio.WouldBlock:
                                break
                            accept(item[0], item[1], current_time())
                    step = steps.send(current_time())
            except StopIteration:
                pass  # every source ended and was played out
            finally:
                self._clocks.pop(id(recv), None)
        if due:
            self._marks_sent(endpoint, due)  # the last packets went out before the clock ended
        for source in feeding:
            drained[id(source)].set()


def _open_sink_queue(bound_ms: int = STARTUP_BUFFER_MS) -> tuple[_SinkQueue, _SinkQueue]:
    """A sink pacer's queue, in place of `trio.open_memory_channel`: (send end, receive end)."""
    queue = _SinkQueue(bound_ms)
    return queue, queue


class _SinkQueue:
    """The queue from the emitters to one sink pacer, bounded by the duration of the audio in
    it rather than by a count of frames (10 to 60 ms each): up to `bound_ms` of what arrives
    before the pacer runs (a sink still coming up) is kept for it.

    Send side (the emitters): `send_nowait((slot, frame))` never blocks; a frame that would take
    the queue beyond its bound raises `trio.WouldBlock` (the emitter drops that newest frame and
    counts it); the end-of-stream marker always fits; BrokenResourceError once the pacer has
    finished. Receive side (the pacer): `receive`, `receive_nowait`, and `with queue:` closes it.
    A `PlayoutMark` goes in a source's place like a frame and takes no room; `drop_slot` is a
    barge-in's drop of one source's frames.
    """

    __slots__ = ("_items", "_waker", "_closed", "_queued_us", "_bound_us")

    def __init__(self, bound_ms: int) -> None:
        self._items: collections.deque[tuple[int, AudioFrame | PlayoutMark | None]] = collections.deque()
        self._waker = Waker()  # the pacer parks on it (gateway.mediaclock: no cancel scope per wait)
        self._closed = False
        self._queued_us = 0
        self._bound_us = bound_ms * 1000

    def send_nowait(self, item: tuple[int, AudioFrame | PlayoutMark | None]) -> None:
        if self._closed:
            raise trio.BrokenResourceError("the pacer has finished")
        frame = item[1]
        if frame is not _END:
            cost = frame.samples * 1_000_000 // frame.rate
            if self._queued_us + cost > self._bound_us:
                raise trio.WouldBlock
            self._queued_us += cost
        self._items.append(item)
        self._waker.wake()

    def drop_slot(self, slot: int) -> int:
        """Drop the frames of source `slot` waiting here (its marks and end stay); returns
        their duration in microseconds."""
        kept: collections.deque[tuple[int, AudioFrame | PlayoutMark | None]] = collections.deque()
        dropped = 0
        for item in self._items:
            frame = item[1]
            if item[0] == slot and isinstance(frame, AudioFrame):
                dropped += frame.samples * 1_000_000 // frame.rate
            else:
                kept.append(item)
        self._items.clear()  # in place: a parked receive holds this deque
        self._items.extend(kept)
        self._queued_us -= dropped
        return dropped

    def _took(self, item: tuple[int, AudioFrame | PlayoutMark | None]) -> tuple[int, AudioFrame | PlayoutMark | None]:
        frame = item[1]
        if frame is not _END:
            self._queued_us -= frame.samples * 1_000_000 // frame.rate
        return item

    async def receive(self) -> tuple[int, AudioFrame | PlayoutMark | None]:
        item = await self.receive_until(math.inf)
        assert item is not None  # no deadline
        return item

    async def receive_until(self, deadline: float) -> tuple[int, AudioFrame | PlayoutMark | None] | None:
        """The next item, waiting for one until trio time `deadline`; None from the deadline
        on (then nothing is taken, as a receive under `move_on_at(deadline)` would)."""
        items = self._items
        if trio.current_time() >= deadline:
            # a checkpoint, as an expired move_on_at's receive is: tasks woken with the pacer
            # (an endpoint announcing the route is up) keep their turn before its next send
            await trio.lowlevel.cancel_shielded_checkpoint()
            return None
        if items:  # as a trio channel does: the emitters get their turn before the pacer goes on
            item = self._took(items.popleft())
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        while True:
            if not await self._waker.wait(deadline) or trio.current_time() >= deadline:
                return None  # what comes at the deadline is the next wait's, as under move_on_at
            if items:
                return self._took(items.popleft())

    def receive_nowait(self) -> tuple[int, AudioFrame | PlayoutMark | None]:
        if not self._items:
            raise trio.WouldBlock
        return self._took(self._items.popleft())

    def close(self) -> None:
        self._closed = True  # nothing queues any more: senders get BrokenResourceError
        self._items.clear()

    def __enter__(self) -> _SinkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lane:
    """One source's own lane into a sink that does not mix (`Endpoint.mixes` False): what the
    pacer needs of a sink, with `send` going to `sink.send_from(source, frame)`. Counters are the
    sink's own (every lane adds to them)."""

    __slots__ = ("sink", "source", "name", "egress", "ptime_ms", "encoder_options", "stats")

    def __init__(self, sink: Endpoint, source: Endpoint) -> None:
        self.sink, self.source = sink, source
        self.name = f"{sink.name}<{source.name}"
        self.egress, self.ptime_ms, self.encoder_options, self.stats = sink.egress, sink.ptime_ms, sink.encoder_options, sink.stats

    @property
    def listened(self) -> bool:
        return self.sink.wants_from(self.source)

    async def send(self, frame: Frame) -> None:
        await self.sink.send_from(self.source, frame)


class _Started:
    """A task_status stand-in that tells the route when an endpoint called started()."""

    def __init__(self, callback) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


SINK_GONE_WAIT = 2.0  # seconds a sink's peer that left has for its own reader to notice (then the route ends)

CLIENT_FAULTS = (RemoteProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed)
"""What a listen endpoint's client can cause: a protocol break (closed with its code) or a
connection that failed under us (reset, gone between the upgrade and the first read)."""


def client_fault(ep: Endpoint, err: BaseException) -> bool:
    """True when `err`, raised by `ep`, is its listen client's failure, not the route's."""
    return ep.role == "listen" and isinstance(err, CLIENT_FAULTS)


def describe_failure(err: BaseException) -> str:
    """An endpoint's failure in one line for logs and route events (our own messages, which
    never carry a secret, or the exception type and a socket error's text)."""
    if isinstance(err, GatewayError) and str(err):
        return str(err)
    return f"{type(err).__name__}{': ' + str(err) if str(err) else ''}"


SEND_FAILURES = (GatewayError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed)
"""What a sink's `send` raises when its peer is gone."""


def describe_fault(err: BaseException) -> str:
    """'broke the protocol: <cause>' / 'connection lost: <cause>' (never a secret: the causes
    are ours, or socket errors)."""
    if isinstance(err, RemoteProtocolError):
        return f"broke the protocol ({err.close_code}): {err}"
    return f"connection lost: {type(err).__name__}{': ' + str(err) if str(err) else ''}"


async def _start_all(nursery: trio.Nursery, run_endpoint, endpoints: list[Endpoint]) -> None:
    """Start every endpoint concurrently in `nursery`; return once all called started()."""
    if not endpoints:
        return
    async with trio.open_nursery() as starters:
        for ep in endpoints:
            starters.start_soon(nursery.start, run_endpoint, ep)


async def _quiet_goodbye(ep: Endpoint, logger: logging.LoggerAdapter) -> None:
    try:
        await ep.goodbye()
    except Exception as err:  # goodbye is best effort: the peer may already be gone
        logger.debug("goodbye of %s failed: %r", ep.name, err)
