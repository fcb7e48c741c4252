"""Network impairment for a WebSocket media stream, one message = one packet: a pure schedule
and a trio proxy that applies it on loopback.

What it models. VoIPBIN's media stream carries one RTP packet (or one 20 ms frame) per binary
WebSocket message (shared/protocols/002_fcf346ba8b7becb9.txt, "Encapsulation Types"). The
WebSocket itself runs over TCP, which neither loses nor reorders; what a gateway meets in
practice is the impairment of the service's UDP leg, which the service forwards message by
message. So the impairment is applied to whole messages, never to bytes: a message is dropped,
delayed, swapped with its successor or sent twice, and its content (RTP sequence number,
timestamp, payload) is left exactly as the sender made it, so the receiver sees the gaps and
the disorder in the sequence numbers (RFC 3550 §5.1, Appendix A.1).

Impairments (`Impairment`, all optional, combined in this order for each message):

- **random loss** `loss_pct`: each message is dropped independently (Bernoulli).
- **bursty loss** `burst_loss_pct` with `mean_burst` (packets): the Gilbert-Elliott two-state
  Markov chain (E. N. Gilbert, "Capacity of a burst-noise channel", BSTJ 1960; E. O. Elliott,
  "Estimates of error rates for codes on burst-noise channels", BSTJ 1963; the parameterization
  of G. Hasslinger and O. Hohlfeld, "The Gilbert-Elliott Model for Packet Loss in Real Time
  Services on the Internet", MMB 2008, and ITU-T G.1050 §6). States Good and Bad; p = P(Good →
  Bad), r = P(Bad → Good) per packet; a packet is lost with probability `loss_in_bad` (h) in
  Bad and `loss_in_good` (k) in Good. With h = 1 and k = 0 (the simple Gilbert model, what
  `GilbertElliott.from_mean` builds) every packet in Bad is lost, so a loss burst is exactly a
  stay in Bad: mean burst length 1/r, mean loss p / (p + r). The chain starts in its
  stationary distribution, so the first packets carry no bias.
- **duplicates** `duplicate_pct`: the message is delivered twice, the copy right after it.
- **reordering** `reorder_pct`: the message is held and delivered right after the next one
  (a swap of two adjacent packets); the next one is never itself held, so the share of
  messages delivered one place late is `reorder_pct`. A held message whose successor is lost
  goes out when that successor would have.
- **jitter** `jitter_ms` = J: each message is delayed by J + u, u drawn from `jitter`:
  "uniform" on [-J, +J] (the default) or "normal" with sigma J/2 clipped to [-J, +J]. The delay
  is therefore within [0, 2J], mean J; messages go out in the order of their release times, so
  when the spread of the delays exceeds the 20 ms packet spacing, some arrive out of order
  (uniform ±30 ms at 20 ms spacing: 2/9 = 22 % of adjacent pairs swap, and 24.7 % of the
  messages arrive after some later one, the share `ReleaseQueue.out_of_order` counts).

Every random draw comes from one seeded `random.Random` per impairment (seeded with
"{seed}/{impairment}"), so the same seed gives the same schedule, and turning one impairment
on does not change another's pattern: the same packets are lost with and without jitter.
Decisions depend on the message's index only, never on the clock, so two runs of the same
stream (a bench's two modes) meet the same losses.

Pure objects (no I/O, no clock reads: `now` is passed in, seconds on any monotonic clock):
`GilbertElliott`, `ImpairmentSchedule` (message in, `Release`s out), `ReleaseQueue` (what is
due when). `ImpairProxy` is the trio layer: a WebSocket server on loopback that connects each
client to the same resource (path and query) on the upstream server, forwards both directions,
and impairs the direction from the upstream to the client (the direction towards a gateway
that dials the proxy as if it were VoIPBIN). It refuses any address but loopback.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import random
from functools import partial
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    connect_websocket,
    serve_websocket,
)

__all__ = [
    "GilbertElliott",
    "ImpairProxy",
    "Impairment",
    "ImpairmentSchedule",
    "ProxyLink",
    "Release",
    "ReleaseQueue",
    "require_loopback",
]

log = logging.getLogger("bench.impair")

JITTER_DISTRIBUTIONS = ("uniform", "normal")
MAX_MESSAGE = 2**16  # 64 KiB: the largest media message the gateway's protocols send
MESSAGE_QUEUE = 64  # messages trio-websocket buffers per connection before its reader waits
CONNECT_TIMEOUT = 10.0  # seconds for the upstream's TCP connect and opening handshake
_SENDABLE_CLOSE = range(1000, 5000)  # close codes a peer may send (RFC 6455 §7.4)
_RESERVED_CLOSE = {1004, 1005, 1006, 1015}  # never sent in a close frame (RFC 6455 §7.4.1)


def _pct(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 100.0:
        raise ValueError(f"{attribute.name} must be in [0, 100) %, got {value}")


@attrs.frozen
class Impairment:
    """What to do to a stream of messages (module doc). Percentages are of messages."""

    loss_pct: float = attrs.field(default=0.0, validator=_pct)
    """Independent (Bernoulli) loss, % of messages."""
    burst_loss_pct: float = attrs.field(default=0.0, validator=_pct)
    """Mean loss of the Gilbert-Elliott chain, % of messages (0: no bursty loss)."""
    mean_burst: float = 1.0
    """Mean length of a loss burst of the Gilbert-Elliott chain, messages (>= 1)."""
    jitter_ms: float = 0.0
    """Half-width J of the delay's spread, ms: each message is delayed J + u, u in [-J, +J]."""
    jitter: str = attrs.field(default="uniform", validator=attrs.validators.in_(JITTER_DISTRIBUTIONS))
    """Distribution of u: "uniform" on [-J, J], or "normal" (sigma J/2) clipped to [-J, J]."""
    reorder_pct: float = attrs.field(default=0.0, validator=_pct)
    """Messages held and delivered right after their successor (adjacent swaps), %."""
    duplicate_pct: float = attrs.field(default=0.0, validator=_pct)
    """Messages delivered twice, %."""
    seed: int = 0
    """Seed of every random draw (module doc: one stream per impairment)."""

    def __attrs_post_init__(self) -> None:
        if self.jitter_ms < 0:
            raise ValueError(f"jitter_ms must be >= 0, got {self.jitter_ms}")
        if self.burst_loss_pct:
            GilbertElliott.from_mean(self.burst_loss_pct / 100, self.mean_burst)  # validates

    @property
    def lossless(self) -> bool:
        return not (self.loss_pct or self.burst_loss_pct)

    def describe(self) -> str:
        """One short line: "5 % random loss", "15 % bursty loss (mean burst 3)", "none"."""
        parts = []
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g} % random loss")
        if self.burst_loss_pct:
            parts.append(f"{self.burst_loss_pct:g} % bursty loss (Gilbert-Elliott, mean burst {self.mean_burst:g})")
        if self.jitter_ms:
            parts.append(f"±{self.jitter_ms:g} ms {self.jitter} jitter")
        if self.reorder_pct:
            parts.append(f"{self.reorder_pct:g} % adjacent swaps")
        if self.duplicate_pct:
            parts.append(f"{self.duplicate_pct:g} % duplicates")
        return ", ".join(parts) or "none"


@attrs.define
class GilbertElliott:
    """The Gilbert-Elliott two-state loss model (module doc), one step per packet.

    `p`: P(Good → Bad), `r`: P(Bad → Good), per packet, in (0, 1]; `loss_in_bad` (h) and
    `loss_in_good` (k): loss probability in each state. `lost(rng)` advances the chain one
    packet and says whether that packet is lost.
    """

    p: float
    r: float
    loss_in_bad: float = 1.0
    loss_in_good: float = 0.0
    bad: bool = False
    """Current state (True: Bad)."""

    @classmethod
    def from_mean(cls, loss: float, mean_burst: float, rng: random.Random | None = None) -> GilbertElliott:
        """The simple Gilbert model (h = 1, k = 0) with mean loss `loss` (fraction, 0 < loss
        < 1) and mean burst length `mean_burst` (packets, >= 1): r = 1 / mean_burst, p = r x
        loss / (1 - loss). The start state is drawn from the stationary distribution with
        `rng` (Good when None). Raises ValueError when no chain has those means (p > 1: the
        bursts are too short for that much loss, i.e. mean_burst < loss / (1 - loss))."""
        if not 0.0 < loss < 1.0:
            raise ValueError(f"mean loss must be in (0, 1), got {loss}")
        if mean_burst < 1.0:
            raise ValueError(f"mean burst length must be >= 1 packet, got {mean_burst}")
        r = 1.0 / mean_burst
        p = r * loss / (1.0 - loss)
        if p > 1.0:
            raise ValueError(f"no Gilbert chain has {loss:.0%} loss in bursts of {mean_burst:g}: "
                             f"the mean burst must be >= {loss / (1 - loss):.2f} packets")
        chain = cls(p, r)
        if rng is not None:
            chain.bad = rng.random() < chain.stationary_bad
        return chain

    @property
    def stationary_bad(self) -> float:
        """Long-run share of packets sent in the Bad state, p / (p + r)."""
        return self.p / (self.p + self.r)

    @property
    def mean_loss(self) -> float:
        """Long-run loss probability: h x P(Bad) + k x P(Good)."""
        b = self.stationary_bad
        return self.loss_in_bad * b + self.loss_in_good * (1.0 - b)

    def lost(self, rng: random.Random) -> bool:
        """Advance one packet (transition, then the loss draw in the new state)."""
        if self.bad:
            if rng.random() < self.r:
                self.bad = False
        elif rng.random() < self.p:
            self.bad = True
        h = self.loss_in_bad if self.bad else self.loss_in_good
        return h >= 1.0 or (h > 0.0 and rng.random() < h)


@attrs.frozen
class Release:
    """One delivery decided by the schedule: send `item` at `at`."""

    at: float
    """Release time, seconds on the caller's clock (the `now` it passed plus the delay)."""
    index: int
    """Index of the message in the offered stream (0, 1, ...); a duplicate has its original's."""
    item: Any
    """The message as offered (never modified)."""


@attrs.define
class ImpairmentSchedule:
    """The impairment of one stream of messages, pure: `push(item, now)` for each message in
    arrival order returns what to deliver and when (`Release`s, in delivery order); `flush(now)`
    at the end of the stream returns a message still held for a swap.

    Counters (messages): `offered`, `dropped`, `bursts` (runs of consecutive dropped messages,
    so `dropped / bursts` is the mean burst length), `duplicated`, `swapped` (held and
    delivered after their successor), `delayed_s` (sum of the jitter delays, seconds) and
    `max_delay_s`.
    """

    impairment: Impairment
    offered: int = 0
    dropped: int = 0
    bursts: int = 0
    duplicated: int = 0
    swapped: int = 0
    delayed_s: float = 0.0
    max_delay_s: float = 0.0
    _held: list[Release] = attrs.Factory(list)
    _last_lost: bool = False
    _rng: dict[str, random.Random] = attrs.Factory(dict)
    _gilbert: GilbertElliott | None = None
    _hold_q: float = 0.0

    def __attrs_post_init__(self) -> None:
        seed = self.impairment.seed
        self._rng = {name: random.Random(f"{seed}/{name}")
                     for name in ("loss", "burst", "duplicate", "reorder", "jitter")}
        imp = self.impairment
        self._hold_q = imp.reorder_pct / (100 - imp.reorder_pct)
        if imp.burst_loss_pct:
            self._gilbert = GilbertElliott.from_mean(imp.burst_loss_pct / 100, imp.mean_burst, self._rng["burst"])

    def _is_lost(self) -> bool:
        imp, rng = self.impairment, self._rng
        lost = False
        if imp.loss_pct and rng["loss"].random() < imp.loss_pct / 100:
            lost = True
        if self._gilbert is not None and self._gilbert.lost(rng["burst"]):
            lost = True
        return lost

    def _delay(self) -> float:
        """Seconds: J + u (module doc), 0 without jitter."""
        j = self.impairment.jitter_ms / 1000
        if not j:
            return 0.0
        rng = self._rng["jitter"]
        if self.impairment.jitter == "uniform":
            u = rng.uniform(-j, j)
        else:
            u = min(j, max(-j, rng.gauss(0.0, j / 2)))
        return j + u

    def push(self, item: Any, now: float) -> list[Release]:
        """Offer the next message, arrived at `now` (seconds); returns the deliveries this
        decides, in order: none (dropped or held), the message (twice when duplicated), and a
        message held for a swap, which goes right after it (module doc)."""
        imp = self.impairment
        index = self.offered
        self.offered += 1
        # Every draw is made for every message, lost or not, so one impairment's pattern does
        # not depend on another's (module doc).
        lost = self._is_lost()
        duplicate = bool(imp.duplicate_pct) and self._rng["duplicate"].random() < imp.duplicate_pct / 100
        # A message right after a held one is never held, so the draw uses q = p / (1 - p):
        # the share held is then q / (1 + q) = p.
        hold = bool(imp.reorder_pct) and self._rng["reorder"].random() < self._hold_q
        delay = self._delay()
        out: list[Release] = []
        at = now + delay
        if lost:
            self.dropped += 1
            if not self._last_lost:
                self.bursts += 1
            self._last_lost = True
        else:
            self._last_lost = False
            self.delayed_s += delay
            self.max_delay_s = max(self.max_delay_s, delay)
            mine = [Release(at, index, item)]
            if duplicate:
                self.duplicated += 1
                mine.append(Release(at, index, item))
            if hold and not self._held:
                self.swapped += 1
                self._held = mine
                return []
            out = mine
        if self._held:  # the message held for a swap goes right after this one (or its slot)
            out += [attrs.evolve(r, at=max(r.at, at)) for r in self._held]
            self._held = []
        return out

    def flush(self, now: float) -> list[Release]:
        """The end of the stream: a message still held for a swap is delivered at `now` (or
        its own release time, when later)."""
        out = [attrs.evolve(r, at=max(r.at, now)) for r in self._held]
        self._held = []
        return out

    def as_dict(self) -> dict[str, float | int]:
        return {"offered": self.offered, "dropped": self.dropped, "bursts": self.bursts,
                "duplicated": self.duplicated, "swapped": self.swapped,
                "mean_delay_ms": round(1000 * self.delayed_s / max(1, self.offered - self.dropped), 2),
                "max_delay_ms": round(1000 * self.max_delay_s, 2)}


@attrs.define
class ReleaseQueue:
    """Deliveries waiting for their time, pure: `add` `Release`s, `pop_due(now)` takes those
    whose time has come, earliest first (ties in the order they were added).

    `out_of_order` counts deliveries of a message whose index is below one delivered before
    it (it arrives after a later message: jitter, swaps); a duplicate right after its
    original does not count."""

    released: int = 0
    out_of_order: int = 0
    _heap: list[tuple[float, int, Release]] = attrs.Factory(list)
    _added: int = 0
    _highest: int = -1

    def add(self, releases: list[Release]) -> None:
        for r in releases:
            heapq.heappush(self._heap, (r.at, self._added, r))
            self._added += 1

    def next_at(self) -> float | None:
        """Release time of the earliest waiting delivery; None when empty."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def pop_due(self, now: float) -> list[Release]:
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            r = heapq.heappop(heap)[2]
            if r.index < self._highest:
                self.out_of_order += 1
            self._highest = max(self._highest, r.index)
            self.released += 1
            out.append(r)
        return out


def require_loopback(host: str, what: str) -> None:
    """Raise ValueError unless `host` is "localhost" or a loopback address (127.0.0.0/8, ::1):
    the impairment is only ever applied on this machine's loopback."""
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")


@attrs.define
class ProxyLink:
    """One proxied connection: its schedule, its queue and what happened."""

    path: str
    """The requested path, without its query string (which may carry a token)."""
    schedule: ImpairmentSchedule
    queue: ReleaseQueue = attrs.Factory(ReleaseQueue)
    to_client: int = 0
    """Messages delivered to the client (impaired direction)."""
    to_upstream: int = 0
    """Messages forwarded from the client to the upstream (not impaired)."""
    lags: list[float] = attrs.Factory(list)
    """Per delivery to the client: send time - release time, seconds (the proxy's own lateness)."""
    ended: str = ""
    """How the connection ended ("client closed 1000", "upstream closed 1006", ...)."""
    upstream_done: bool = False
    upstream_close: tuple[int | None, str] = (1000, "")
    """The upstream's close code and reason, passed on to the client once all is delivered."""
    _changed: trio.Event = attrs.Factory(trio.Event)


ImpairmentFor = Callable[[str], "Impairment | None"]


class ImpairProxy:
    """A WebSocket proxy on loopback that impairs what the upstream sends to the client.

    ``ImpairProxy(upstream, impairment)``: `upstream` is a ``ws://host:port`` base (loopback
    only); `impairment` is an `Impairment` for every connection, or a callable taking the
    request's path (no query) and returning one (None: forward unimpaired). Each client
    connection gets its own `ImpairmentSchedule` (the same seed: a reconnect meets the same
    pattern again) and the proxy opens the same resource (path and query, so a token passes
    through untouched and never reaches a log) on the upstream; a refusal there (401, 404,
    409) is passed back to the client with its status and body. Closing either side closes
    the other with the same code (1000 when the code cannot be sent, e.g. 1006).

    `await nursery.start(proxy.serve)` returns the bound port; `links` lists every connection.
    """

    def __init__(self, upstream: str, impairment: Impairment | ImpairmentFor) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "ws" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be ws://host:port, got {upstream!r}")
        require_loopback(parts.hostname, "the upstream")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self._impairment_for: ImpairmentFor = (impairment if callable(impairment) and not isinstance(impairment, Impairment)
                                               else (lambda path: impairment))
        self.links: list[ProxyLink] = []
        self.port: int | None = None

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started(port)` once bound."""
        require_loopback(host, "the proxy's listen address")
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                serve_websocket, self._handle, host, port, None, handler_nursery=nursery,
                message_queue_size=MESSAGE_QUEUE, max_message_size=MAX_MESSAGE))
            self.port = server.port
            task_status.started(server.port)

    async def _handle(self, request: WebSocketRequest) -> None:
        resource = request.path or "/"
        path = resource.split("?", 1)[0]
        impairment = self._impairment_for(path) or Impairment()
        link = ProxyLink(path, ImpairmentSchedule(impairment))
        # A refused upgrade is raised both by connect_websocket and by the connection's reader
        # task in the nursery: handled once the nursery has collected them.
        try:
            async with trio.open_nursery() as nursery:
                await self._link(request, link, resource, nursery)
        except* ConnectionRejected as group:
            err = group.exceptions[0]
            link.ended = f"upstream refused with HTTP {err.status_code}"
            await request.reject(err.status_code, body=err.body)
        except* (HandshakeError, OSError, trio.TooSlowError) as group:
            link.ended = f"upstream unreachable: {type(group.exceptions[0]).__name__}"
            log.warning("impair proxy %s: %s", path, link.ended)
            await request.reject(502, body=b"upstream unreachable")
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:  # a client or upstream reset
            link.ended = link.ended or f"connection broken: {group.exceptions[0]!r}"

    async def _link(self, request: WebSocketRequest, link: ProxyLink, resource: str, nursery: trio.Nursery) -> None:
        with trio.fail_after(CONNECT_TIMEOUT):
            upstream = await connect_websocket(
                nursery, self.upstream_host, self.upstream_port, resource, use_ssl=False,
                message_queue_size=MESSAGE_QUEUE, max_message_size=MAX_MESSAGE)
        client = await request.accept()
        self.links.append(link)
        nursery.start_soon(self._to_upstream, link, client, upstream)
        nursery.start_soon(self._from_upstream, link, upstream)
        await self._deliver(link, client)
        await _close(upstream, 1000, "")
        nursery.cancel_scope.cancel()

    async def _to_upstream(self, link: ProxyLink, client: WebSocketConnection, upstream: WebSocketConnection) -> None:
        while True:
            try:
                message = await client.get_message()
            except ConnectionClosed as closed:
                link.ended = link.ended or f"client closed {closed.reason.code}"
                await _close(upstream, closed.reason.code, closed.reason.reason)
                return
            try:
                await upstream.send_message(message)
            except ConnectionClosed:
                return  # _from_upstream sees it and ends the link
            link.to_upstream += 1

    async def _from_upstream(self, link: ProxyLink, upstream: WebSocketConnection) -> None:
        schedule, queue = link.schedule, link.queue
        code, reason = 1000, ""
        while True:
            try:
                message = await upstream.get_message()
            except ConnectionClosed as closed:
                code, reason = closed.reason.code, closed.reason.reason or ""
                break
            queue.add(schedule.push(message, trio.current_time()))
            link._changed.set()
        link.ended = link.ended or f"upstream closed {code}"
        queue.add(schedule.flush(trio.current_time()))
        link.upstream_done = True
        link.upstream_close = (code, reason)
        link._changed.set()

    async def _deliver(self, link: ProxyLink, client: WebSocketConnection) -> None:
        """Send each delivery to the client at its release time; returns when the upstream
        ended and everything was delivered (then closes the client), or the client is gone."""
        queue, lags = link.queue, link.lags
        while True:
            now = trio.current_time()
            for r in queue.pop_due(now):
                lags.append(trio.current_time() - r.at)
                try:
                    await client.send_message(r.item)
                except ConnectionClosed:
                    return
                link.to_client += 1
            changed = link._changed = trio.Event()  # set by _from_upstream: no await before waiting
            at = queue.next_at()
            if at is None and link.upstream_done:
                await _close(client, *link.upstream_close)
                return
            with trio.move_on_at(at if at is not None else math.inf):
                await changed.wait()


async def _close(ws: WebSocketConnection, code: int | None, reason: str | None) -> None:
    """Close with `code` when it may be sent (else 1000), best effort, within 1 s."""
    if code not in _SENDABLE_CLOSE or code in _RESERVED_CLOSE:
        code, reason = 1000, f"peer closed ({code})"
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        try:
            await ws.aclose(code, (reason or "")[:120])
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # already closed or broken: nothing left to close
