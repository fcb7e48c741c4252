"""Prometheus metrics of a running `Gateway`, in the text exposition format (`GET /metrics`).

Nothing here runs on the media path: the route and the endpoints keep their plain counters
(`EndpointStats`, `RouteStats`, `RouteState`), and a custom collector reads them when
Prometheus scrapes. Each `Gateway` gets its own `CollectorRegistry` (created on the first
scrape, cached for as long as the gateway lives), so several gateways in one process (tests,
the demo) never mix their series; the process' global default registry is not used.

Two ways to scrape, both returning (body, content type):

- `await render_async(gateway)`, for the control API: copies the counters into a `Snapshot` in
  the trio thread (~1 ms for 100 routes x 3 endpoints), then builds the metric families and
  the text in a worker thread. The text is most of a scrape's cost (tens of ms for 100 routes,
  bench/bench_metrics.py); off the trio thread it holds the GIL only in slices of
  `sys.getswitchinterval()` (5 ms), which the routes' jitter allowance absorbs, instead of
  stalling every route's pacer for the whole scrape.
- `render(gateway)`: all of it in the calling thread, which must be the gateway's trio thread
  (the collector reads live counters without locks: consistent because no task runs while it
  reads). For tests, tools and small gateways.

Series (labels `route`, `endpoint`, `kind`, where `kind` is the endpoint's kind: voipbin,
argon, agent, videosdk, audiosocket, file, record). Audio counters exist only in the direction an endpoint
has: received for endpoints that produce audio, sent / late / dropped / buffer / level /
latency for endpoints that take it.

| metric | type | labels | from |
| --- | --- | --- | --- |
| gateway_frames_received_total | counter | route, endpoint, kind | frames_in |
| gateway_bytes_received_total | counter | route, endpoint, kind | bytes_in (payload bytes) |
| gateway_frames_sent_total | counter | route, endpoint, kind | frames_out |
| gateway_bytes_sent_total | counter | route, endpoint, kind | bytes_out (payload bytes) |
| gateway_frames_late_total | counter | route, endpoint, kind | late: egress slots concealed with silence |
| gateway_frames_dropped_total | counter | route, endpoint, kind | dropped |
| gateway_frames_concealed_total | counter | route, endpoint, kind | concealed: ingress frames filled in for lost packets |
| gateway_frames_fec_recovered_total | counter | route, endpoint, kind | fec_recovered: Opus frames rebuilt from in-band FEC |
| gateway_jitter_seconds | gauge | route, endpoint, kind | jitter_ms / 1000 (RFC 3550 §6.4.1) |
| gateway_jitter_buffer_depth_seconds | gauge | route, endpoint, kind | jitter_depth_ms / 1000 |
| gateway_packets_reordered_total | counter | route, endpoint, kind | reordered |
| gateway_packets_duplicate_total | counter | route, endpoint, kind | duplicates |
| gateway_packets_late_total | counter | route, endpoint, kind | late_packets: arrived after their playout |
| gateway_dtmf_received_total, gateway_dtmf_sent_total | counter | route, endpoint, kind | dtmf_in, dtmf_out |
| gateway_endpoint_outages_total | counter | route, endpoint, kind | outages: reconnected mid-call |
| gateway_endpoint_down_seconds_total | counter | route, endpoint, kind | down_s |
| gateway_frames_dropped_while_down_total | counter | route, endpoint, kind | dropped_while_down |
| gateway_buffer_depth_seconds | gauge | route, endpoint, kind | buffered_ms / 1000 |
| gateway_audio_level_dbfs | gauge | route, endpoint, kind | level_dbfs of the last egress packet |
| gateway_added_latency_seconds | histogram | route, endpoint, kind | latency (LatencyHistogram, made cumulative) |
| gateway_connects_total | counter | route, endpoint, kind | connects |
| gateway_reconnects_total | counter | route, endpoint, kind | connects beyond the first |
| gateway_events_received_total | counter | route, endpoint, kind | events_in (raised from the peer) |
| gateway_events_sent_total | counter | route, endpoint, kind | events_out (passed to the peer) |
| gateway_route_up | gauge | route | 1 while the route streams (state "up") |
| gateway_route_state | gauge | route, state | 1 for the current state, 0 for the others |
| gateway_route_state_changed_timestamp_seconds | gauge | route | RouteState.since |
| gateway_route_info | gauge | route, origin | 1; origin "file" or "api" |
| gateway_route_restarts_total | counter | route | RouteState.restarts |
| gateway_route_sessions_total | counter | route | RouteStats.sessions |
| gateway_route_events_total | counter | route | RouteStats.events |
| gateway_routes | gauge | | routes configured |
| gateway_reloads_total, gateway_reload_failures_total | counter | | Gateway.reloads, .reload_failures |
| gateway_start_time_seconds | gauge | | Gateway.started_at (Unix seconds) |
| gateway_session_setups_delayed_total, gateway_session_setups_refused_total | counter | | SetupPacer.delayed, .refused |
| gateway_dial_starts_delayed_total | counter | | Runtime.dial_pacer.delayed |
| gateway_admission_open | gauge | | 1 while new sessions are admitted, 0 while refused (gateway.admission) |
| gateway_media_clock_lag_seconds | gauge | | MediaClock.lag: 90th percentile of the last 1 s of 20 ms tick lags (0: idle) |
| gateway_media_clock_behind_total | counter | | MediaClock.episodes: times the media clock fell behind |
| gateway_loop_cpu_ratio | gauge | | MediaClock.busy: share of a core the loop used in the last 1 s (0: idle or no CPU budget) |
| gateway_sessions_active | gauge | | Admission.sessions: media connections, running dial routes and calls |
| gateway_sessions_max | gauge | | server.max_sessions (absent when there is no cap) |
| gateway_sessions_refused_total | counter | reason | Admission.refused: overload (media clock), load (CPU budget), capacity |
| gateway_routes_held_total | counter | | Admission.held: dial route starts that waited for admission |
| gateway_build_info | gauge | version | 1 |

plus prometheus_client's standard `process_*`, `python_info` and `python_gc_*` series.

Two kinds of concealment: `gateway_frames_late_total` counts egress slots sent as silence
because their audio was late (the late audio plays when it arrives, a slot later);
`gateway_frames_concealed_total` counts ingress frames filled in for packets lost on the way
in (RTP sequence gaps).

Counter resets: a route that a reload restarts (its config changed) is built anew, with new
endpoints and a new route state whose counters start at 0 again; Prometheus sees a counter
reset, which `rate()` and `increase()` handle. A route restarted after a failure (same config)
keeps its endpoints, so its counters go on. A removed route disappears from the output. A
listen endpoint counts one connect per client session, so its "reconnects" are the clients
after the first.

Label values are route and endpoint names and kinds only: never a URL, a token or an error
message (which may carry one).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.endpoint import LATENCY_BUCKETS
from gateway.route_state import RouteStatus

ROUTE_STATES = ("starting", "up", "waiting", "held", "restarting", "ended", "failed", "stopped")
"""Every state a route can be in (`RouteState.state`). `gateway_route_state` has one series per
state, 1 for the current one, so a query can select any state at any time (the enum idiom)."""

_ENDPOINT = ("route", "endpoint", "kind")
_LE = tuple(floatToGoString(bound) for bound in LATENCY_BUCKETS) + ("+Inf",)


# ------------------------------------------------------------------------------- snapshot
class EndpointSnapshot(NamedTuple):
    """One endpoint's counters at one instant (see `EndpointStats` for each field)."""

    labels: tuple[str, str, str]
    """(route, endpoint, kind)."""
    ingress: bool
    """The endpoint produces audio (its received counters are exported)."""
    egress: bool
    """The endpoint takes audio (its sent, late, dropped, buffer, level, latency are exported)."""
    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    late: int
    dropped: int
    skipped: int
    concealed: int
    buffered_ms: int
    level_dbfs: float
    connects: int
    peer_errors: int
    events_in: int
    events_out: int
    fec_recovered: int
    jitter_ms: float
    jitter_depth_ms: int
    reordered: int
    duplicates: int
    late_packets: int
    dtmf_in: int
    dtmf_out: int
    outages: int
    down_s: float
    dropped_while_down: int
    latency_counts: tuple[int, ...]
    """Per-bucket (not cumulative) counts, len(LATENCY_BUCKETS) + 1 (the last: above all)."""
    latency_sum: float


class RouteSnapshot(NamedTuple):
    """One route at one instant (`RouteState` and `RouteStats`), its endpoints in route order."""

    name: str
    state: str
    since: float
    origin: str
    restarts: int
    sessions: int
    events: int
    endpoints: tuple[EndpointSnapshot, ...]


class Snapshot(NamedTuple):
    """Everything a scrape exports about one gateway, copied at one instant: plain values,
    safe to format in any thread."""

    routes: tuple[RouteSnapshot, ...]
    reloads: int
    reload_failures: int
    started_at: float
    setups_delayed: int = 0
    setups_refused: int = 0
    admission_open: bool = True
    media_clock_lag: float = 0.0
    media_clock_episodes: int = 0
    sessions_active: int = 0
    sessions_max: int | None = None
    sessions_refused: tuple[tuple[str, int], ...] = ()
    """(reason, count) pairs."""
    routes_held: int = 0
    loop_cpu: float = 0.0
    dial_starts_delayed: int = 0


def snapshot(gateway) -> Snapshot:
    """Copy the gateway's counters. Synchronous and never awaits: call it in the gateway's trio
    thread, where no route runs while it reads (so every value is from the same instant)."""
    routes = []
    for name, state in gateway.routes.items():
        route = state.route
        endpoints = []
        for endpoint in route.endpoints:
            s = endpoint.stats
            latency = s.latency
            endpoints.append(EndpointSnapshot(
                (name, endpoint.name, endpoint.kind), endpoint.ingress is not None, endpoint.egress is not None,
                s.frames_in, s.bytes_in, s.frames_out, s.bytes_out, s.late, s.dropped, s.skipped, s.concealed, s.buffered_ms,
                s.level_dbfs, s.connects, s.peer_errors, s.events_in, s.events_out,
                s.fec_recovered, s.jitter_ms, s.jitter_depth_ms, s.reordered, s.duplicates, s.late_packets,
                s.dtmf_in, s.dtmf_out, s.outages, s.down_s, s.dropped_while_down,
                tuple(latency.counts), latency.sum,
            ))
        routes.append(RouteSnapshot(name, state.state, state.since, state.origin, state.restarts,
                                    route.stats.sessions, route.stats.events, tuple(endpoints)))
    pacer = gateway.runtime.media.pacer
    admission = gateway.runtime.admission
    return Snapshot(tuple(routes), gateway.reloads, gateway.reload_failures, gateway.started_at,
                    pacer.delayed, pacer.refused, admission.open, admission.clock.lag, admission.clock.episodes,
                    admission.sessions, admission.max_sessions, tuple(admission.refused.items()), admission.held,
                    admission.clock.busy or 0.0, gateway.runtime.dial_pacer.delayed)


# ------------------------------------------------------------------------------- families
_C, _G = CounterMetricFamily, GaugeMetricFamily

ENDPOINT_SERIES = (
    # (name, type, exported for endpoints that: "ingress" | "egress" | None (all), value, HELP)
    ("gateway_frames_received", _C, "ingress", lambda e: e.frames_in, "Audio frames received from the peer."),
    ("gateway_bytes_received", _C, "ingress", lambda e: e.bytes_in, "Audio payload bytes received from the peer."),
    ("gateway_frames_sent", _C, "egress", lambda e: e.frames_out, "Audio frames sent to the peer."),
    ("gateway_bytes_sent", _C, "egress", lambda e: e.bytes_out, "Audio payload bytes sent to the peer."),
    ("gateway_frames_late", _C, "egress", lambda e: e.late,
     ("Frames sent to the peer as silence because the audio for them was late (concealed); "
      "the late audio plays when it arrives.")),
    ("gateway_frames_concealed", _C, "ingress", lambda e: e.concealed,
     ("Frames filled in for packets the peer sent that were lost on the way (RTP sequence gaps, "
      "lost Opus packets): loss concealment, fading to silence in a long loss.")),
    ("gateway_frames_fec_recovered", _C, "ingress", lambda e: e.fec_recovered,
     "Opus frames rebuilt from the next packet's in-band FEC data instead of concealed."),
    ("gateway_jitter_seconds", _G, "ingress", lambda e: e.jitter_ms / 1000,
     "Interarrival jitter of the packets from the peer (RFC 3550 §6.4.1 estimator)."),
    ("gateway_jitter_buffer_depth_seconds", _G, "ingress", lambda e: e.jitter_depth_ms / 1000,
     "Current depth of the ingress jitter buffer (held back to reorder and absorb jitter)."),
    ("gateway_packets_reordered", _C, "ingress", lambda e: e.reordered,
     "Packets from the peer that arrived out of order and were put back in sequence."),
    ("gateway_packets_duplicate", _C, "ingress", lambda e: e.duplicates,
     "Packets from the peer received more than once (the copies are dropped)."),
    ("gateway_packets_late", _C, "ingress", lambda e: e.late_packets,
     "Packets from the peer that arrived after their playout time (already concealed): dropped."),
    ("gateway_dtmf_received", _C, None, lambda e: e.dtmf_in, "DTMF key presses received from the peer."),
    ("gateway_dtmf_sent", _C, None, lambda e: e.dtmf_out, "DTMF key presses sent to the peer."),
    ("gateway_endpoint_outages", _C, None, lambda e: e.outages,
     "Times the endpoint's connection failed mid-call and it reconnected while the route ran on."),
    ("gateway_endpoint_down_seconds", _C, None, lambda e: e.down_s,
     "Seconds the endpoint was away during its outages that ended."),
    ("gateway_frames_dropped_while_down", _C, "egress", lambda e: e.dropped_while_down,
     "Packets meant for the peer while it was away: dropped, never queued into latency."),
    ("gateway_frames_dropped", _C, "egress", lambda e: e.dropped,
     ("Frames of audio for this peer lost: beyond the playout buffer's bound, a full queue, "
      "or audio while the peer was not connected.")),
    ("gateway_frames_skipped", _C, "egress", lambda e: e.skipped,
     ("Packets of pause (silence, breath, low background) left out for this peer to win back added "
      "latency: a pause got shorter, no speech was lost.")),
    ("gateway_buffer_depth_seconds", _G, "egress", lambda e: e.buffered_ms / 1000,
     "Audio waiting in the route's playout buffers for this peer after its last packet."),
    ("gateway_audio_level_dbfs", _G, "egress", lambda e: e.level_dbfs,
     "RMS level of the last audio packet sent to this peer, dBFS (-120: digital silence)."),
    ("gateway_connects", _C, None, lambda e: e.connects,
     "Connections made (dial) or client sessions served (listen)."),
    ("gateway_reconnects", _C, None, lambda e: max(0, e.connects - 1),
     "Connections beyond the first: reconnects (dial) or client sessions after the first (listen)."),
    ("gateway_peer_errors", _C, None, lambda e: e.peer_errors,
     "Connections closed because the peer broke the protocol (closed with the protocol's code), or "
     "listen clients whose connection failed under us; a listen route serves its next client at once."),
    ("gateway_events_received", _C, None, lambda e: e.events_in,
     "Route events this endpoint raised from its peer (DTMF, messages, participants)."),
    ("gateway_events_sent", _C, None, lambda e: e.events_out, "Route events this endpoint passed on to its peer."),
)
"""The per-endpoint series (labels route, endpoint, kind), besides the latency histogram."""

ROUTE_SERIES = (
    ("gateway_route_up", _G, lambda r: 1.0 if r.state == RouteStatus.UP else 0.0,
     "1 while the route streams (every endpoint connected), else 0."),
    ("gateway_route_state_changed_timestamp_seconds", _G, lambda r: r.since,
     "When the route entered its current state, Unix time."),
    ("gateway_route_restarts", _C, lambda r: r.restarts, "Restarts of the route after it failed."),
    ("gateway_route_sessions", _C, lambda r: r.sessions,
     "Times the route came up (restarts and listen sessions included)."),
    ("gateway_route_events", _C, lambda r: r.events, "Route events raised by the route's endpoints."),
)
"""The per-route series (label route), besides gateway_route_state and gateway_route_info."""

LATENCY_HELP = ("Latency the gateway added to the audio sent to this peer: per packet of a live source, "
                "from the arrival of its last sample to its send deadline (jitter wait and buffering).")


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot (pure: any thread). A generator: each family is built
    when the previous one was formatted, so a scrape keeps one family's samples alive at a time
    (fewer objects for the garbage collector's older generations)."""
    endpoints = [e for r in snap.routes for e in r.endpoints]
    for name, kind, direction, value, doc in ENDPOINT_SERIES:
        family = kind(name, doc, labels=_ENDPOINT)
        for e in endpoints:
            if direction is None or getattr(e, direction):
                family.add_metric(e.labels, value(e))
        yield family

    latency = HistogramMetricFamily("gateway_added_latency_seconds", LATENCY_HELP, labels=_ENDPOINT)
    for e in endpoints:
        if e.egress:
            cumulative, buckets = 0, []
            for le, n in zip(_LE, e.latency_counts):
                cumulative += n
                buckets.append((le, cumulative))
            latency.add_metric(e.labels, buckets, e.latency_sum)
    yield latency

    for name, kind, value, doc in ROUTE_SERIES:
        family = kind(name, doc, labels=("route",))
        for r in snap.routes:
            family.add_metric((r.name,), value(r))
        yield family
    states = _G("gateway_route_state",
                "The route's state: 1 for the current one (" + ", ".join(ROUTE_STATES) + "), 0 for the others.",
                labels=("route", "state"))
    for r in snap.routes:
        for each in ROUTE_STATES:
            states.add_metric((r.name, each), 1.0 if each == r.state else 0.0)
        if r.state not in ROUTE_STATES:  # a state this module does not know yet: still shown
            states.add_metric((r.name, r.state), 1.0)
    yield states
    info = _G("gateway_route_info", "A route and where it came from (origin: file or api); always 1.",
              labels=("route", "origin"))
    for r in snap.routes:
        info.add_metric((r.name, r.origin), 1.0)
    yield info

    yield _G("gateway_routes", "Routes configured (from the file and the control API).", value=len(snap.routes))
    yield _C("gateway_reloads", "Configuration reloads applied.", value=snap.reloads)
    yield _C("gateway_reload_failures", "Configuration reloads refused (invalid file: nothing changed).",
             value=snap.reload_failures)
    yield _G("gateway_start_time_seconds", "When the gateway started, Unix time.", value=snap.started_at)
    yield _C("gateway_session_setups_delayed", "Listen session set-ups that waited for their turn "
             "(server.setups_per_second): a crowd of clients spread out so running calls keep their pace.",
             value=snap.setups_delayed)
    yield _C("gateway_session_setups_refused", "Listen session set-ups refused with 503: their turn was more "
             "than 2 s away.", value=snap.setups_refused)
    yield _C("gateway_dial_starts_delayed", "Dial route session starts that waited for their turn "
             "(server.dial_starts_per_second): a crowd of routes (boot, restarts) spread out.",
             value=snap.dial_starts_delayed)
    yield _G("gateway_admission_open", "1 while new sessions are admitted; 0 while they are refused (503) and "
             "dial routes wait: the media clock is behind, the CPU budget is spent or server.max_sessions is reached.",
             value=1.0 if snap.admission_open else 0.0)
    yield _G("gateway_media_clock_lag_seconds", "How late the event loop wakes a 20 ms media clock tick: the 90th "
             "percentile over the last second (admission closes past server.admission_lag_ms); the clock ticks "
             "only while sessions stream, 0 otherwise.",
             value=snap.media_clock_lag)
    yield _C("gateway_media_clock_behind", "Times the media clock fell behind (admission closed for overload).",
             value=snap.media_clock_episodes)
    yield _G("gateway_loop_cpu_ratio", "Share of one core the event loop's thread used over the last second "
             "(admission refuses past server.admission_cpu_percent, projected); measured only with that set and "
             "while sessions stream, 0 otherwise.", value=snap.loop_cpu)
    yield _G("gateway_sessions_active", "Sessions in progress: listen media connections, running dial routes, "
             "answered calls (what server.max_sessions caps).", value=snap.sessions_active)
    if snap.sessions_max is not None:
        yield _G("gateway_sessions_max", "server.max_sessions: sessions admitted at once at most.", value=snap.sessions_max)
    refused = _C("gateway_sessions_refused", "New sessions refused (503, or an incoming call rejected as busy) "
                 "by admission: overload (media clock behind), load (server.admission_cpu_percent) or capacity "
                 "(server.max_sessions).", labels=("reason",))
    for reason, count in snap.sessions_refused:
        refused.add_metric((reason,), count)
    yield refused
    yield _C("gateway_routes_held", "Dial route starts that waited (state held) because admission was closed.",
             value=snap.routes_held)
    build = _G("gateway_build_info", "The gateway's version; always 1.", labels=("version",))
    build.add_metric((__version__,), 1.0)
    yield build


# ------------------------------------------------------------------------------ collector
_pinned = threading.local()  # .snapshot: (collector, Snapshot) while render_async formats one


class GatewayCollector(Collector):
    """The gateway's series (see the module doc), read at each scrape.

    Holds the gateway weakly: the registry cache is keyed on the gateway, and a strong
    reference from its value would keep every gateway alive for good."""

    def __init__(self, gateway) -> None:
        self._gateway = weakref.ref(gateway)

    def collect(self) -> Iterator[Metric]:
        pinned = getattr(_pinned, "snapshot", None)
        if pinned is not None and pinned[0] is self:
            return families(pinned[1])
        gateway = self._gateway()
        if gateway is None:
            return iter(())
        return families(snapshot(gateway))


class _Metrics(NamedTuple):
    registry: CollectorRegistry
    collector: GatewayCollector


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _metrics(gateway) -> _Metrics:
    cached = _cache.get(gateway)
    if cached is None:
        registry = CollectorRegistry(auto_describe=False)
        collector = GatewayCollector(gateway)
        registry.register(collector)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        cached = _cache[gateway] = _Metrics(registry, collector)
    return cached


def registry_for(gateway) -> CollectorRegistry:
    """The gateway's own registry (created on first use, then cached while the gateway lives):
    its `GatewayCollector` and the standard process / platform / GC collectors. Other parts
    of the daemon may register collectors of their own on it (read in the worker thread by
    `render_async`: they must be thread-safe)."""
    return _metrics(gateway).registry


# --------------------------------------------------------------------------------- render
def render(gateway) -> tuple[bytes, str]:
    """The gateway's metrics as (body, content type), all in the calling thread, which must be
    the gateway's trio thread (see the module doc; prefer `render_async` in a server)."""
    return generate_latest(registry_for(gateway)), CONTENT_TYPE_LATEST


async def render_async(gateway) -> tuple[bytes, str]:
    """The gateway's metrics as (body, content type), for `GET /metrics`: the counters are
    copied here, in the trio thread; the text is built in a worker thread."""
    cached = _metrics(gateway)
    snap = snapshot(gateway)
    return await trio.to_thread.run_sync(_render_pinned, cached, snap)


def _render_pinned(cached: _Metrics, snap: Snapshot) -> tuple[bytes, str]:
    _pinned.snapshot = (cached.collector, snap)
    try:
        return generate_latest(cached.registry), CONTENT_TYPE_LATEST
    finally:
        _pinned.snapshot = None
