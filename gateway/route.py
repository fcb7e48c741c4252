"""Routes: endpoints joined through codec chains, paced on a media clock, mixed (mix-minus).

For every source → sink pair the route plans a decode chain (source wire format → the sink's
PCM format: decode, channel mix, resample) that runs in the source's task, on `emit`. Each sink
has one pacer task: it owns one `Reframer` per source (the playout buffer), and at absolute
deadlines `anchor + k·ptime` (trio.sleep_until semantics, so no drift) it takes one ptime from
each, mixes them (a sink never hears itself: mix-minus), encodes, and calls `sink.send`.

Playout rules, per sink (DESIGN.md, "Route"):
- The clock anchors when the first whole packet of audio is buffered, so the first packet goes
  out at once and the gateway adds no waiting of its own. Audio that queued up while the route
  was still connecting is stale: it is dropped and the clock anchors on the next live frame.
- At each deadline a source that is short waits up to `jitter_ms` for its audio; then its slot
  is filled with silence (counted `late`) and the late audio, when it arrives, is discarded up
  to the concealed amount (counted `dropped`) so latency returns to its target at once.
- A source short for `IDLE_AFTER` packets in a row is idle: no more waiting for it; silence
  flows. When every source was idle, the clock re-anchors on the next audio.
- Audio buffered beyond `max_delay_ms` is dropped oldest first (bounded latency, bounded memory).
- Latency control, every `ADJUST_EVERY` packets: audio that stayed buffered through a whole
  window (after a stall, or queued while the route came up) is excess and is dropped; if every
  packet waited for its deadline, the clock moves earlier by the least wait. So the latency the
  gateway adds returns to "processing only" after anything pushes it up.
- When a source ends, what it buffered is played out (the last packet padded), then the route
  ends; every endpoint says its protocol's goodbye.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Sequence

import attrs
import numpy as np
import trio

from gateway.codecs import Chain, Reframer, plan
from gateway.codecs.formats import AudioFrame, Frame
from gateway.endpoint import Endpoint, RouteEvent, Tagged
from gateway._util import collapse, goodbye_scope
from gateway.errors import CallEnded

log = logging.getLogger("gateway.route")

SINK_QUEUE = 64  # frames queued for one sink pacer before the newest are dropped
IDLE_AFTER = 5  # consecutive short packets after which a source counts as idle
GOODBYE_DEADLINE = 2.0  # seconds for every endpoint to say goodbye when a route stops
ADJUST_EVERY = 50  # packets per latency-control window (1 s at 20 ms)
RECENT_EVENTS = 32  # route events kept for the report / control API
_END = None  # end-of-stream marker in a sink queue
_NEVER = 1 << 62
_NEVER_S = float("inf")
_CARRIED = object()  # the next packet was already whole at the last pop


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
    targets: list[tuple[trio.MemorySendChannel, int, Endpoint]] = attrs.Factory(list)


class Route:
    """Joins two or more endpoints. One `run()` is one session of the route.

    `jitter_ms` and `max_delay_ms` come from the route config (README, "Routes").
    """

    def __init__(self, name: str, endpoints: Sequence[Endpoint], *, jitter_ms: int = 20, max_delay_ms: int = 200) -> None:
        if len(endpoints) < 2:
            raise ValueError(f"route {name}: a route joins two or more endpoints")
        self.name = name
        self.endpoints = list(endpoints)
        self.jitter_ms = jitter_ms
        self.max_delay_ms = max_delay_ms
        self.stats = RouteStats()
        self.log = Tagged(log, route=name)
        for endpoint in self.endpoints:
            endpoint.bind_route(name, self.post_event)
        names = {e.name for e in self.endpoints}
        for endpoint in self.endpoints:
            unknown = sorted(set(endpoint.hears or ()) - names)
            if unknown:
                raise ValueError(f"route {name}: endpoint {endpoint.name} hears {unknown}, which are not endpoints of the route")
        self.sources = [e for e in self.endpoints if e.ingress is not None]
        self.sinks = [e for e in self.endpoints if e.egress is not None]
        if not self.sources or not self.sinks:
            raise ValueError(f"route {name}: needs at least one endpoint that produces audio and one that takes it")
        self.up = trio.Event()
        self._finish = None
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

    def post_event(self, event: RouteEvent) -> None:
        """Log and count an endpoint's event, and hand it to every other endpoint that carries
        events. Synchronous; an endpoint that fails to take it is logged, never fatal."""
        self.stats.events += 1
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio (tests of the plumbing)
            now = 0.0
        self.stats.recent_events.append((now, event))
        self.log.info("event from %s: %s", event.source, event.summary())
        for ep in self.endpoints:
            if ep.accepts_events and ep.name != event.source:
                try:
                    ep.on_route_event(event)
                except Exception:  # a bug in one endpoint must not stop the others
                    self.log.exception("endpoint %s failed to take event %s", ep.name, event.kind)

    # ----------------------------------------------------------------------------- plumbing
    def _legs(self) -> tuple[dict[int, list[_Leg]], dict[int, tuple[trio.MemoryReceiveChannel, list[Endpoint]]]]:
        """Plan the source → sink chains; returns legs by source and queues by sink."""
        legs: dict[int, dict] = {id(s): {} for s in self.sources}
        queues: dict[int, tuple[trio.MemoryReceiveChannel, list[Endpoint]]] = {}
        for sink in self.sinks:
            send, recv = trio.open_memory_channel(SINK_QUEUE)
            feeding = [s for s in self.sources if s is not sink and (sink.hears is None or s.name in sink.hears)]
            queues[id(sink)] = (recv, feeding)
            target = sink.egress.as_pcm()
            for slot, source in enumerate(feeding):
                leg = legs[id(source)].get(target)
                if leg is None:
                    leg = legs[id(source)][target] = _Leg(plan(source.ingress, target))
                    self.log.debug("%s → %s: %s", source.name, target, leg.chain)
                leg.targets.append((send, slot, sink))
        return {key: list(by_format.values()) for key, by_format in legs.items()}, queues

    def _emitter(self, legs: list[_Leg]):
        """The synchronous `emit` a source calls per frame: decode once per target format,
        queue for each sink, never block."""

        def emit(frame: Frame) -> None:
            for leg in legs:
                for out in leg.chain.process(frame):
                    for queue, slot, sink in leg.targets:
                        try:
                            queue.send_nowait((slot, out))
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
        legs, queues = self._legs()
        done = trio.Event()
        ended_by: list[str] = []
        failures: list[Exception] = []

        self._finish = lambda reason: finish(reason)

        def finish(reason: str) -> None:
            if not done.is_set():
                ended_by.append(reason)
                done.set()

        async def run_endpoint(ep: Endpoint, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            emit = self._emitter(legs.get(id(ep), []))
            started = False

            def mark_started() -> None:
                nonlocal started
                started = True
                task_status.started()

            try:
                await ep.run(emit, task_status=_Started(mark_started))
                reason = f"{ep.name}: ended"
            except BaseException as raised:
                err = collapse(raised)
                if isinstance(err, CallEnded):
                    if not started:
                        raise err from None  # ended before it was up: the route's start failed
                    reason = f"{ep.name}: {err.reason}"
                elif isinstance(err, Exception) and not isinstance(err, BaseExceptionGroup):
                    if not started:
                        raise err from None  # a failed connect fails the route's start
                    if done.is_set():
                        return  # the route is closing: peers going away now is expected
                    failures.append(err)
                    finish(f"{ep.name}: failed: {err}")
                    return
                else:
                    raise
            self.log.info("endpoint %s ended: %s", ep.name, reason)
            if ep.ingress is not None and legs.get(id(ep)):
                for leg in legs[id(ep)]:
                    tail = leg.chain.flush()  # the resampler's last few ms
                    for queue, slot, _ in leg.targets:
                        try:
                            for out in tail:
                                queue.send_nowait((slot, out))
                            queue.send_nowait((slot, _END))
                        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                # the sinks' pacers play out what this source buffered, then the route ends
                # (a bursty source may have queued up to its whole burst buffer)
                backlog_ms = ep.burst_buffer_ms if ep.bursty else self.max_delay_ms
                with trio.move_on_after(backlog_ms / 1000 + 1.0):
                    await drained[id(ep)].wait()
            finish(reason)

        drained = {id(s): trio.Event() for s in self.sources}

        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as startup:
                    self._startup = startup
                    if self._stopping:
                        startup.cancel()
                    # Listen endpoints first: the route comes up when their clients connect (no
                    # outgoing stream is held open for nobody). Then the other peers, concurrently;
                    # local sources (files) last, so a file plays from its beginning to someone.
                    listen = [e for e in self.endpoints if e.role == "listen"]
                    peers = [e for e in self.endpoints if e.role != "listen" and not e.local_source]
                    local = [e for e in self.endpoints if e.local_source]
                    await _start_all(nursery, run_endpoint, listen)
                    await _start_all(nursery, run_endpoint, peers)
                    for sink in self.sinks:
                        recv, feeding = queues[id(sink)]
                        nursery.start_soon(self._pace, sink, recv, feeding, drained)
                    await _start_all(nursery, run_endpoint, local)
                self._startup = None
                if startup.cancelled_caught:  # stop() while connecting / waiting for a client
                    task_status.started()
                    await self._goodbye()
                    nursery.cancel_scope.cancel()
                    self.stats.ended_by = "stopped"
                    return "stopped"
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
        recv: trio.MemoryReceiveChannel,
        feeding: list[Endpoint],
        drained: dict[int, trio.Event],
    ) -> None:
        """Send one packet per ptime to `sink` on absolute deadlines (see the module doc)."""
        pcm_format = sink.egress.as_pcm()
        n = pcm_format.samples(sink.ptime_ms)
        ptime = sink.ptime_ms / 1000
        grace = self.jitter_ms / 1000
        max_buffer = max(pcm_format.samples(self.max_delay_ms), 2 * n)
        # Buffered sources (an agent's text-to-speech arrives in bursts) queue: played at real
        # time without drops, up to their own bound; only live sources get latency control.
        live = [not s.bursty for s in feeding]
        limit = [max_buffer if live[i] else max(pcm_format.samples(s.burst_buffer_ms), 2 * n) for i, s in enumerate(feeding)]
        jitter_samples = pcm_format.samples(self.jitter_ms)
        encoder = plan(pcm_format, sink.egress, **sink.encoder_options)
        buffers = [Reframer(pcm_format, sink.ptime_ms) for _ in feeding]
        owed = [0] * len(feeding)  # samples concealed whose late audio is still to be discarded
        short_run = [IDLE_AFTER] * len(feeding)  # consecutive short packets (starts idle)
        ended = [False] * len(feeding)
        largest = [0] * len(feeding)  # largest frame each source has sent (samples at sink rate)
        # Latency control over windows of ADJUST_EVERY packets: `floor` is the least audio left
        # in a buffer after its pop (audio that waited a whole window is excess: dropped);
        # `earliest` is the least time a whole packet waited for its deadline (the clock then
        # moves earlier by that much, so deadlines line up with the audio's arrival).
        floor = [_NEVER] * len(feeding)
        complete_at: list = [None] * len(feeding)  # when the next packet became whole
        earliest = _NEVER_S
        window = 0
        stats = sink.stats
        timestamp = 0
        # Added latency (stats.latency): per source, when each pushed frame arrived, keyed by
        # the running count of samples pushed; `consumed` counts samples popped or dropped, so
        # the arrival of a popped packet's last sample is the first entry at or past it.
        arrivals = [collections.deque() for _ in feeding]
        pushed = [0] * len(feeding)
        consumed = [0] * len(feeding)
        latency = stats.latency

        def drop(slot: int, samples: int) -> int:
            dropped = buffers[slot].drop(samples)
            consumed[slot] += dropped
            return dropped

        def accept(item: tuple[int, AudioFrame | None]) -> None:
            slot, frame = item
            if frame is _END:
                ended[slot] = True
                return
            if feeding[slot].bursty == live[slot]:  # the source found out it is bursty (or not)
                live[slot] = not feeding[slot].bursty
                limit[slot] = max_buffer if live[slot] else max(pcm_format.samples(feeding[slot].burst_buffer_ms), 2 * n)
            buf = buffers[slot]
            buf.push(frame)
            now = trio.current_time()
            if live[slot]:  # bursty sources are queued by design: their latency is not observed
                pushed[slot] += frame.samples
                arrivals[slot].append((pushed[slot], now))
            if frame.samples > largest[slot]:
                largest[slot] = frame.samples
            if complete_at[slot] is None and buf.buffered >= n:
                complete_at[slot] = now
            if owed[slot]:
                dropped = drop(slot, min(owed[slot], buf.buffered))
                owed[slot] -= dropped
                stats.dropped += math.ceil(dropped / n) if dropped else 0
            if buf.buffered > limit[slot]:
                stats.dropped += math.ceil(drop(slot, buf.buffered - limit[slot]) / n)

        def ready(slot: int) -> bool:
            return buffers[slot].buffered >= n or ended[slot]

        anchor: float | None = None
        k = 0
        with recv:
            while True:
                if anchor is None:
                    accept(await recv.receive())
                    while True:
                        try:
                            accept(recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                    backlog = any(live[i] and b.buffered > max(n, largest[i]) + jitter_samples for i, b in enumerate(buffers))
                    if backlog and not any(ended):
                        # Audio queued while the route came up is stale: drop it and anchor
                        # on the next live frame, in phase with the source.
                        for i, buf in enumerate(buffers):
                            if live[i]:
                                stats.dropped += math.ceil(drop(i, buf.buffered) / n)
                                complete_at[i] = None
                        continue
                    if any(b.buffered >= n for b in buffers) or all(ended):
                        anchor, k = trio.current_time(), 0
                    continue
                deadline = anchor + k * ptime
                now = trio.current_time()
                if now > deadline + 2 * ptime:
                    # We fell behind (stalled loop): re-anchor rather than burst.
                    anchor = now - k * ptime
                    deadline = now
                with trio.move_on_at(deadline):
                    while True:
                        accept(await recv.receive())
                waiting = [i for i in range(len(buffers)) if short_run[i] < IDLE_AFTER and not ready(i)]
                if waiting:
                    with trio.move_on_at(deadline + grace):
                        while any(not ready(i) for i in waiting):
                            accept(await recv.receive())
                # Take one ptime from each source; mix-minus (the sink is never among `feeding`).
                mixed: np.ndarray | None = None
                contributors = 0
                now = trio.current_time()
                for i, buf in enumerate(buffers):
                    frame = buf.pop()
                    if frame is None and ended[i] and buf.buffered:
                        frame = buf.flush()[0]
                    if frame is None:
                        floor[i] = 0
                        complete_at[i] = None
                        if short_run[i] < IDLE_AFTER and not ended[i] and live[i]:
                            # Late: conceal this slot; its audio is stale once it arrives.
                            stats.late += 1
                            stale = drop(i, buf.buffered)
                            owed[i] = min(owed[i] + n - stale, max_buffer)
                        short_run[i] = min(short_run[i] + 1, IDLE_AFTER)
                        if short_run[i] >= IDLE_AFTER:
                            owed[i] = 0
                        continue
                    short_run[i] = 0
                    contributors += 1
                    consumed[i] += frame.samples
                    if live[i]:
                        pending = arrivals[i]
                        while len(pending) > 1 and pending[0][0] < consumed[i]:
                            pending.popleft()
                        if pending:
                            latency.observe(max(0.0, now - pending[0][1]))
                    done_at = complete_at[i]
                    if done_at is not None and done_at is not _CARRIED:
                        earliest = min(earliest, deadline - done_at)
                    # a packet already whole after this pop is excess, measured by `floor`
                    complete_at[i] = _CARRIED if buf.buffered >= n else None
                    floor[i] = min(floor[i], buf.buffered)
                    mixed = frame.pcm if mixed is None else _mix(mixed, frame.pcm)
                if mixed is None and all(ended):
                    for source in feeding:
                        drained[id(source)].set()
                    return  # every source ended and was played out
                if mixed is None:
                    mixed = np.zeros((n, pcm_format.channels), dtype=np.int16)
                frame = AudioFrame(mixed, pcm_format.rate, timestamp)
                timestamp += n
                stats.level_dbfs = _dbfs(mixed) if contributors else -120.0
                for out in encoder.process(frame):
                    await sink.send(out)
                k += 1
                stats.buffered_ms = sum(b.buffered for b in buffers) * 1000 // pcm_format.rate
                window += 1
                if window == ADJUST_EVERY:
                    for i, buf in enumerate(buffers):
                        if 0 < floor[i] < _NEVER and not ended[i] and live[i]:
                            stats.dropped += math.ceil(drop(i, floor[i]) / n)
                    if contributors and 0.001 < earliest < _NEVER_S:
                        anchor -= earliest
                    floor = [_NEVER] * len(feeding)
                    earliest = _NEVER_S
                    window = 0
                for i, source in enumerate(feeding):
                    if ended[i] and buffers[i].buffered == 0:
                        drained[id(source)].set()
                if all(ended) and all(b.buffered == 0 for b in buffers):
                    return
                if contributors == 0 and all(s >= IDLE_AFTER for s in short_run):
                    # Everyone idle: silence keeps flowing; when audio comes back the clock
                    # re-anchors on it, so it goes out at once instead of up to a ptime later.
                    with trio.move_on_at(anchor + k * ptime):
                        while not any(b.buffered >= n for b in buffers):
                            accept(await recv.receive())
                        anchor = trio.current_time() - k * ptime


def _dbfs(pcm: np.ndarray) -> float:
    """RMS level of int16 PCM in dBFS (full-scale sine: -3 dB; digital silence: -120)."""
    x = pcm.astype(np.float32).ravel()
    mean_square = float(np.dot(x, x)) / max(1, x.size)
    return max(-120.0, 10 * math.log10(mean_square / (32768.0 * 32768.0))) if mean_square > 0 else -120.0


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum two int16 (samples, channels) blocks with saturation."""
    return np.clip(a.astype(np.int32) + b, -32768, 32767).astype(np.int16)


class _Started:
    """A task_status stand-in that tells the route when an endpoint called started()."""

    def __init__(self, callback) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


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
