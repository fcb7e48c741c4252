"""Barge-in and marks through the route, under trio's MockClock (gateway/route.py, "Barge-in
and marks"): a ``clear`` drops at once what one source said that the route still holds, for
every sink, and what it says next plays at once; a ``mark`` comes back as ``mark-played`` once
every sink that hears the source has sent (and, for a sink with a queue of its own, played) the
audio before it; a clear passes the marks in what it dropped."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from gateway.codecs.formats import PCM16_8K, AudioFrame
from gateway.endpoint import Endpoint, RouteEvent
from gateway.pacer import PlayoutMark, SinkClock, simulate
from gateway.route import Route

RATE = 8000
PTIME = 0.02


def ramp_frame(k: int, samples: int = 160) -> AudioFrame:
    """Frame k of a stream whose sample i has value (i % 30000) + 1 (never 0: silence is visible)."""
    values = (np.arange(k * samples, (k + 1) * samples) % 30000 + 1).astype(np.int16)
    return AudioFrame(values.reshape(-1, 1), RATE, k * samples)


class Agent(Endpoint):
    """An agent's text to speech (bursty): a script of (seconds after start, frame or mark
    name); it records the route events it gets (mark-played)."""

    kind = "agent-test"
    ingress = PCM16_8K
    bursty = True
    accepts_events = True

    def __init__(self, name: str, script: list[tuple[float, AudioFrame | str]]) -> None:
        super().__init__(name)
        self.script = script
        self.events: list[tuple[float, RouteEvent]] = []

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        t0 = trio.current_time()
        for at, item in self.script:
            await trio.sleep_until(t0 + at)
            if isinstance(item, str):
                self.route_event("mark", name=item)
            else:
                emit(item)
        await trio.sleep_forever()

    def on_route_event(self, event: RouteEvent) -> None:
        self.events.append((trio.current_time(), event))


class Sink(Endpoint):
    kind = "sink-test"
    egress = PCM16_8K
    ptime_ms = 20

    def __init__(self, name: str, *, hears: tuple[str, ...] | None = None) -> None:
        super().__init__(name)
        self.hears = hears
        self.sent: list[tuple[float, np.ndarray]] = []

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.sleep_forever()

    async def send(self, frame):
        self.sent.append((trio.current_time(), frame.pcm[:, 0].copy()))

    def audio(self) -> list[tuple[float, np.ndarray]]:
        return [(t, pcm) for t, pcm in self.sent if pcm.any()]


class BufferingSink(Sink):
    """A sink whose peer buffers what it is sent and plays it `lag` seconds later (Twilio's
    side of a listen stream); it carries route events (it is told of a clear)."""

    accepts_events = True

    def __init__(self, name: str, lag: float) -> None:
        super().__init__(name)
        self.lag = lag
        self.clears: list[float] = []
        self._nursery: trio.Nursery | None = None

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def played_mark(self, name, played):
        async def later():
            await trio.sleep(self.lag)
            played()
        assert self._nursery is not None
        self._nursery.start_soon(later)

    def on_route_event(self, event: RouteEvent) -> None:
        if event.kind == "clear":
            self.clears.append(trio.current_time())


def played(agent: Agent) -> list[tuple[float, str, int]]:
    return [(round(t, 6), e.data["name"], e.data["after_ms"]) for t, e in agent.events if e.kind == "mark-played"]


async def test_a_clear_drops_what_the_route_holds_of_one_source_for_every_sink(autojump_clock):
    """2 s of speech at once, a clear at 0.5 s, new speech at 1.0 s: both sinks stop at the
    clear (no more of the first utterance), the new speech starts the moment it arrives, and
    nothing is counted as a drop (it was asked for)."""
    first = [ramp_frame(k) for k in range(100)]
    second = [ramp_frame(1000 + k) for k in range(10)]
    agent = Agent("agent", [(0.0, f) for f in first] + [(1.0, f) for f in second])
    phone, record = Sink("phone"), Sink("record", hears=("agent",))
    route = Route("t", [agent, phone, record])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        t0 = trio.current_time()
        await trio.sleep(0.5 - 1e-6)
        assert phone.stats.buffered_ms > 1400  # the rest of the utterance waits in the route
        dropped_ms = route.clear("agent")
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert 1460 <= dropped_ms <= 1500, dropped_ms
    for sink in (phone, record):
        audio = sink.audio()
        out = np.concatenate([pcm for _, pcm in audio])
        played_first = len(out) - 160 * len(second)
        assert played_first == 25 * 160, played_first  # t = 0 .. 0.48 s: nothing after the clear
        assert np.array_equal(out[:played_first], np.concatenate([f.pcm[:, 0] for f in first[:25]]))
        assert np.array_equal(out[played_first:], np.concatenate([f.pcm[:, 0] for f in second]))
        resumed = audio[25][0] - t0
        assert 1.0 <= resumed <= 1.0 + PTIME, resumed  # the next utterance goes at once
        assert sink.stats.dropped == 0 and sink.stats.buffered_ms == 0
    (clear,) = [e for _, e in route.stats.recent_events if e.kind == "clear"]
    assert clear.source == "agent" and clear.data == {"dropped_ms": dropped_ms}


async def test_a_mark_comes_back_once_every_sink_has_sent_the_audio_before_it(autojump_clock):
    """1 s of speech then a mark, at once: the mark is played when its last packet has gone,
    at 0.98 s (the 50th packet), not when it was sent; a second mark with nothing queued after
    it comes back with the next packet."""
    speech = [ramp_frame(k) for k in range(50)]
    agent = Agent("agent", [(0.0, f) for f in speech] + [(0.0, "greeting"), (2.0, "idle")])
    phone, record = Sink("phone"), Sink("record")
    route = Route("t", [agent, phone, record])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        t0 = trio.current_time()
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    (greeting, idle) = played(agent)
    assert greeting[1:] == ("greeting", 980) and greeting[0] - t0 == pytest.approx(0.98)
    last_packet = max(t for t, _ in phone.audio())
    assert greeting[0] == pytest.approx(last_packet)  # when the packet holding its audio was sent
    assert idle[1] == "idle" and 0 <= idle[2] <= 20  # nothing before it: the next packet
    assert [e.kind for _, e in route.stats.recent_events].count("mark-played") == 2


async def test_a_sink_with_a_queue_of_its_own_holds_the_mark_until_its_peer_played_it(autojump_clock):
    """A sink whose peer plays 0.3 s after it is sent (Twilio's buffer): the mark waits for
    its peer too, and for the slowest of the sinks."""
    speech = [ramp_frame(k) for k in range(50)]
    agent = Agent("agent", [(0.0, f) for f in speech] + [(0.0, "greeting")])
    twilio, record = BufferingSink("twilio", lag=0.3), Sink("record")
    route = Route("t", [agent, twilio, record])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    ((_, name, after_ms),) = played(agent)
    assert (name, after_ms) == ("greeting", 980 + 300)


async def clear_during_speech(clear_at: float) -> tuple[float, str, list[float]]:
    """2 s of speech and a mark after it, a clear at `clear_at` s: (when the mark came back,
    s after the start; its name; the times the buffering sink was told to clear, likewise)."""
    speech = [ramp_frame(k) for k in range(100)]
    agent = Agent("agent", [(0.0, f) for f in speech] + [(0.0, "answer")])
    twilio, record = BufferingSink("twilio", lag=0.0), Sink("record")
    route = Route("t", [agent, twilio, record])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        t0 = trio.current_time()
        await trio.sleep(clear_at)
        route.clear("agent")
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    ((at, name, _),) = played(agent)
    return at - t0, name, [t - t0 for t in twilio.clears]


async def test_a_clear_passes_the_marks_in_what_it_dropped(autojump_clock):
    """2 s of speech, a mark after it, a clear at 0.5 s: the mark comes back at the clear (one
    packet later at most), not at 2 s; a sink with a queue of its own is told to clear too."""
    at, name, clears = await clear_during_speech(0.5)
    assert name == "answer" and 0.5 <= at <= 0.5 + PTIME + 1e-9, at
    assert clears == [pytest.approx(0.5)]


async def test_a_clear_between_two_packets_passes_its_marks_at_the_clear(autojump_clock):
    """A clear 5 ms after a packet went out: the marks in what it dropped come back at the
    clear itself, not with the next packet, which is a grace period away (the source has
    nothing left: its slot waits jitter_ms for it), 0.54 s."""
    at, name, _ = await clear_during_speech(0.505)
    assert name == "answer" and at == pytest.approx(0.505, abs=1e-6), at


async def test_a_mark_nobody_hears_comes_back_at_once_and_an_unknown_endpoint_is_refused(autojump_clock):
    speech = [ramp_frame(k) for k in range(50)]
    agent = Agent("agent", [(0.0, f) for f in speech] + [(0.0, "m")])
    other = Agent("other", [])
    record = Sink("record", hears=("other",))
    route = Route("t", [agent, other, record])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        await trio.sleep(0.1)
        with pytest.raises(KeyError):
            route.clear("nobody")
        with pytest.raises(KeyError):
            route.mark("nobody", "x")
        nursery.cancel_scope.cancel()
    ((_, name, after_ms),) = played(agent)
    assert (name, after_ms) == ("m", 0)
    assert [e.kind for _, e in route.stats.recent_events] == ["mark", "mark-played"]


def test_the_pure_clock_reports_a_mark_when_the_packet_holding_its_last_sample_is_sent():
    """Without an event loop: 10 ms frames into a 20 ms sink, a mark after the third frame
    (in the middle of the second packet): due with the second packet, at its send."""
    clock = SinkClock([Agent("a", [])], PCM16_8K, 20, stats=_Stats())
    token = object()
    arrivals = [(0.0, 0, ramp_frame(k, 80)) for k in range(3)] + [(0.0, 0, PlayoutMark(token))]
    arrivals += [(0.0, 0, ramp_frame(3, 80)), (0.2, 0, None)]
    marks: list[tuple[float, object]] = []
    sent = simulate(clock, arrivals, marks=marks)
    audio = [round(t, 6) for t, packet in sent if packet.pcm.any()]
    assert audio == [0.0, 0.02]  # then silence until the end
    assert marks == [(0.02, token)]


class _Stats:
    late = dropped = skipped = buffered_ms = 0
    level_dbfs = -120.0

    class _Histogram:
        def observe(self, value: float) -> None:
            pass

    latency = _Histogram()
