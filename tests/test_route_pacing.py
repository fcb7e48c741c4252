"""The route's media clock, under trio's MockClock: packets leave on absolute deadlines at the
sink's ptime, late audio is concealed with silence and then discarded, pauses keep silence
flowing, nothing drifts over a minute, and mixing is mix-minus."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from gateway.codecs.formats import PCM16_8K, AudioFrame
from gateway.endpoint import Endpoint
from gateway.route import Route

RATE = 8000


def ramp_frame(k: int, samples: int = 160) -> AudioFrame:
    """Frame k of a stream whose sample i has value (i % 30000) + 1 (never 0: silence is visible)."""
    values = (np.arange(k * samples, (k + 1) * samples) % 30000 + 1).astype(np.int16)
    return AudioFrame(values.reshape(-1, 1), RATE, k * samples)


class Source(Endpoint):
    """Emits `frames` at `times` (seconds after start), then ends."""

    kind = "source"
    ingress = PCM16_8K

    def __init__(self, name, times, frames, *, hold_open=False):
        super().__init__(name)
        self.times, self.frames, self.hold_open = times, frames, hold_open

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        t0 = trio.current_time()
        for at, frame in zip(self.times, self.frames):
            await trio.sleep_until(t0 + at)
            emit(frame)
        if self.hold_open:
            await trio.sleep_forever()


class Sink(Endpoint):
    kind = "sink"

    def __init__(self, name, ptime_ms=20, fmt=PCM16_8K):
        super().__init__(name)
        self.egress, self.ptime_ms = fmt, ptime_ms
        self.sent: list[tuple[float, np.ndarray]] = []
        self.goodbyes = 0

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.sleep_forever()

    async def send(self, frame):
        self.sent.append((trio.current_time(), frame.pcm[:, 0].copy()))

    async def goodbye(self):
        self.goodbyes += 1


class Both(Sink):
    """Source and sink at once (a conference participant): sends a constant level."""

    kind = "both"
    ingress = PCM16_8K

    def __init__(self, name, level, frames=50):
        super().__init__(name)
        self.level, self.frames = level, frames

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        t0 = trio.current_time()
        for k in range(self.frames):
            await trio.sleep_until(t0 + k * 0.02)
            emit(AudioFrame(np.full((160, 1), self.level, np.int16), RATE, k * 160))
        await trio.sleep_forever()


async def run_route(source, sink, **kw):
    route = Route("t", [source, sink], **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
    return route


def intervals(sink):
    times = [t for t, _ in sink.sent]
    return np.diff(times)


async def test_10ms_packets_leave_10ms_apart_from_20ms_frames(autojump_clock):
    frames = [ramp_frame(k) for k in range(50)]
    source, sink = Source("src", [k * 0.02 for k in range(50)], frames), Sink("sink", ptime_ms=10)
    route = await run_route(source, sink)
    assert len(sink.sent) == 100
    assert np.allclose(intervals(sink), 0.010, atol=1e-9)
    sent = np.concatenate([pcm for _, pcm in sink.sent])
    assert np.array_equal(sent, np.concatenate([f.pcm[:, 0] for f in frames]))  # intact, in order
    assert sink.stats.late == 0 and sink.stats.dropped == 0
    assert route.stats.ended_by == "src: ended" and sink.goodbyes == 1


async def test_packets_go_out_as_soon_as_the_audio_arrives(autojump_clock):
    t0 = trio.current_time()
    source, sink = Source("src", [k * 0.02 for k in range(10)], [ramp_frame(k) for k in range(10)]), Sink("sink")
    await run_route(source, sink)
    lateness = [t - (t0 + k * 0.02) for k, (t, _) in enumerate(sink.sent)]
    assert max(lateness) == pytest.approx(0, abs=1e-9)  # the gateway adds no waiting of its own


async def test_jitter_within_allowance_is_absorbed(autojump_clock):
    times = [k * 0.02 + (0.012 if k % 3 == 1 else 0) for k in range(30)]  # some 12 ms late
    source, sink = Source("src", times, [ramp_frame(k) for k in range(30)]), Sink("sink")
    await run_route(source, sink, jitter_ms=20)
    sent = np.concatenate([pcm for _, pcm in sink.sent])
    assert np.array_equal(sent[: 30 * 160], np.concatenate([ramp_frame(k).pcm[:, 0] for k in range(30)]))
    assert sink.stats.late == 0


async def test_late_audio_is_concealed_then_played(autojump_clock):
    times = [k * 0.02 for k in range(20)]
    times[10] += 0.035  # frame 10 arrives after its slot + allowance (and after frame 11 is due)
    times[11] = times[10]
    source, sink = Source("src", times, [ramp_frame(k) for k in range(20)]), Sink("sink")
    await run_route(source, sink, jitter_ms=20)
    assert sink.stats.late == 1 and sink.stats.dropped == 0
    pcms = [pcm for _, pcm in sink.sent]
    assert not pcms[10].any()  # slot 10 went out as silence, on time
    # the late audio is not cut: frame 10 plays as soon as it arrives, then the rest in order
    # (a ptime later than planned: excess latency, won back in the next pause)
    assert np.array_equal(np.concatenate(pcms[:10] + pcms[11:]), np.concatenate([ramp_frame(k).pcm[:, 0] for k in range(20)]))
    t0 = sink.sent[0][0]
    assert sink.sent[10][0] - t0 == pytest.approx(0.2 + 0.02)  # waited the allowance, no longer
    assert sink.sent[11][0] - t0 == pytest.approx(0.235)  # at once when it arrived
    assert [round(t - t0, 6) for t, _ in sink.sent[12:]] == [round(k * 0.02, 6) for k in range(12, 21)]
    assert len(sink.sent) == 21


async def test_a_lost_packet_costs_one_slot(autojump_clock):
    """Frame 10 never arrives (lost on a path without sequence numbers): its slot is concealed
    and frame 11, on time, plays in its own slot; nothing after it is lost."""
    keep = [k for k in range(30) if k != 10]
    source = Source("src", [k * 0.02 for k in keep], [ramp_frame(k) for k in keep])
    sink = Sink("sink")
    await run_route(source, sink)
    pcms = [pcm for _, pcm in sink.sent]
    assert sink.stats.late == 1 and sink.stats.dropped == 0 and len(pcms) == 30
    assert not pcms[10].any()
    assert all(np.array_equal(pcms[k], ramp_frame(k).pcm[:, 0]) for k in keep)


async def test_pause_keeps_silence_flowing_and_resumes_at_once(autojump_clock):
    times = [k * 0.02 for k in range(10)] + [1.0 + 0.0073 + k * 0.02 for k in range(10)]
    frames = [ramp_frame(k) for k in range(20)]
    t0 = trio.current_time()
    source, sink = Source("src", times, frames), Sink("sink")
    await run_route(source, sink)
    gaps = intervals(sink)
    # silence every ptime during the pause: one packet waits the 20 ms jitter allowance for
    # audio that does not come, after that they go out on the 20 ms clock
    assert gaps.max() <= 0.04 + 1e-9
    assert np.allclose(gaps[16:45], 0.02, atol=1e-9)
    silent = [pcm for _, pcm in sink.sent if not pcm.any()]
    assert len(silent) >= 35
    resumed = next(t for t, pcm in sink.sent if np.array_equal(pcm, frames[10].pcm[:, 0]))
    assert resumed - (t0 + times[10]) == pytest.approx(0, abs=1e-6)  # re-anchored on the audio


async def test_no_drift_over_a_minute(autojump_clock):
    n = 3000  # 60 s of 20 ms frames on the source's own absolute clock
    t0 = trio.current_time()
    source = Source("src", [k * 0.02 for k in range(n)], [ramp_frame(k % 100) for k in range(n)])
    sink = Sink("sink", ptime_ms=40)
    await run_route(source, sink)
    assert len(sink.sent) == n // 2
    times = np.array([t for t, _ in sink.sent])
    expected = t0 + 0.02 + np.arange(n // 2) * 0.04  # a 40 ms packet is whole when its 2nd frame arrives
    assert np.abs(times - expected).max() < 1e-6
    assert sink.stats.late == 0


async def test_three_endpoints_mix_minus(autojump_clock):
    a, b, c = Both("a", 1000), Both("b", 200), Both("c", 30)
    route = Route("conf", [a, b, c])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    for ep, expected in ((a, 230), (b, 1030), (c, 1200)):
        steady = [pcm for _, pcm in ep.sent[3:20]]
        assert steady and all((pcm == expected).all() for pcm in steady), (ep.name, steady[0][:3])


async def test_source_end_plays_out_the_buffer(autojump_clock):
    """A 50 ms tail (2.5 packets) ends the route only after it is played, padded."""
    frames = [ramp_frame(0, 400)]  # one 50 ms frame
    source, sink = Source("src", [0.0], frames), Sink("sink")
    route = await run_route(source, sink)
    assert len(sink.sent) == 3
    sent = np.concatenate([pcm for _, pcm in sink.sent])
    assert np.array_equal(sent[:400], frames[0].pcm[:, 0]) and not sent[400:].any()
    assert route.stats.ended_by == "src: ended"


async def test_saturating_mix():
    from gateway.route import _mix

    a = np.array([[30000], [-30000], [5]], np.int16)
    assert _mix(a, a).tolist() == [[32767], [-32768], [10]]


def latencies(sink, t0, samples=160, period=0.02):
    """Send time minus the emit time of the source frame each packet starts with."""
    out = []
    for t, pcm in sink.sent:
        if pcm.any():
            k = (int(pcm[0]) - 1) // samples
            out.append(t - (t0 + k * period))
    return np.array(out)


class LateSink(Sink):
    """Connects `delay` seconds after the route starts (an Argon StreamToken round trip...)."""

    def __init__(self, name, delay):
        super().__init__(name)
        self.delay = delay

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        await trio.sleep(self.delay)
        task_status.started()
        await trio.sleep_forever()


class StallingSink(Sink):
    """Blocks the pacer for `stall` seconds once, at packet `at` (a stalled loop or peer)."""

    def __init__(self, name, at, stall):
        super().__init__(name)
        self.at, self.stall = at, stall

    async def send(self, frame):
        await super().send(frame)
        if len(self.sent) == self.at:
            await trio.sleep(self.stall)


def with_pause(n, pause):
    """Frames 0..n-1 of the ramp, the ones in `pause` replaced by digital silence."""
    silent = AudioFrame(np.zeros((160, 1), np.int16), RATE, 0)
    return [silent if k in pause else ramp_frame(k) for k in range(n)]


@pytest.mark.parametrize("delay", [0.005, 0.1, 0.3])
async def test_audio_queued_while_the_route_comes_up_is_played_from_its_start(autojump_clock, delay):
    """The sink comes up `delay` late: what the source sent meanwhile is played from its first
    sample, and the latency it adds is won back in the next pause (1 s of silence), not by
    cutting speech."""
    t0 = trio.current_time()
    n, pause = 150, range(60, 110)
    frames = with_pause(n, pause)
    source = Source("src", [k * 0.02 for k in range(n)], frames)
    sink = LateSink("sink", delay)
    await run_route(source, sink)
    assert sink.sent[0][0] - t0 == pytest.approx(delay)  # the first packet goes out at once...
    assert np.array_equal(sink.sent[0][1], frames[0].pcm[:, 0])  # ...and it is the first audio
    speech = [pcm for _, pcm in sink.sent if pcm.any()]
    assert np.array_equal(np.concatenate(speech), np.concatenate([f.pcm[:, 0] for f in frames if f.pcm.any()]))
    assert sink.stats.dropped == 0 and sink.stats.late == 0
    lat = latencies(sink, t0)
    assert np.abs(lat[:60] - delay).max() < 1e-6, lat[:5]  # before the pause: the sink's delay
    # after it at most one packet's wait (audio arriving with its deadline is not counted as
    # excess) until the clock moves in phase with the audio at the end of a window
    assert lat[60:].max() <= 0.02 + 1e-6, lat[60:65]
    assert np.abs(lat[-25:]).max() < 1e-6, lat[-5:]
    kept = len(sink.sent) - len(speech)  # silent packets sent: what is left of the pause
    assert kept >= 4 + 1 and kept <= len(pause)  # never below MIN_PAUSE_MS (80 ms) + 1 packet
    assert sink.stats.skipped == len(pause) - kept


async def test_latency_recovers_after_a_stall(autojump_clock):
    t0 = trio.current_time()
    n = 180  # ramp values stay unique (below 30000 samples)
    source = Source("src", [k * 0.02 for k in range(n)], with_pause(n, range(60, 100)))
    sink = StallingSink("sink", at=20, stall=0.07)
    await run_route(source, sink)
    lat = latencies(sink, t0)  # of the packets with audio: frames 0..59, then 100..179
    assert lat[:20].max() < 1e-6
    assert lat[20:30].max() > 0.04  # the stall pushed latency up...
    # ...then latency control wins it back: whole packets of the pause are skipped, then the
    # clock moves in phase with the audio; no audio is dropped
    assert lat[110:].max() <= 0.010 + 1e-6
    assert np.abs(lat[-25:]).max() < 1e-6
    assert sink.stats.skipped >= 2 and sink.stats.dropped == 0


class Burst(Source):
    """An agent's text to speech: seconds of audio delivered at once, then a pause."""

    bursty = True


async def test_bursty_source_is_played_at_real_time_without_drops(autojump_clock):
    t0 = trio.current_time()
    frames = [ramp_frame(k) for k in range(100)]  # 2 s of speech...
    times = [0.0] * 50 + [0.5] * 50  # ...arriving in two bursts, far ahead of real time
    source, sink = Burst("agent", times, frames, hold_open=True), Sink("sink")
    route = Route("t", [source, sink])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        await trio.sleep(0.11)  # 6 packets out (t = 0 .. 0.1 s)
        assert sink.stats.buffered_ms == 880  # the burst waits in a bounded, visible buffer
        await trio.sleep(2.39)
        nursery.cancel_scope.cancel()
    audio = [(t, pcm) for t, pcm in sink.sent if pcm.any()]
    assert len(audio) == 100 and sink.stats.dropped == 0 and sink.stats.late == 0
    assert np.array_equal(np.concatenate([pcm for _, pcm in audio]), np.concatenate([f.pcm[:, 0] for f in frames]))
    times_out = np.array([t for t, _ in audio]) - t0
    assert np.allclose(times_out, np.arange(100) * 0.02, atol=1e-9)  # real time: no speed-up


async def test_bursty_minute_plays_at_real_time_and_ends_after_the_queue(autojump_clock):
    """A minute of agent speech, delivered at 10x real time in 10 s bursts, then the agent
    ends its session: every sample is played, one packet per 20 ms, no drift, and the route
    only ends once the queue is played out."""
    t0 = trio.current_time()
    frames = [ramp_frame(k) for k in range(3000)]  # 60 s
    times = [(k // 500) * 1.0 + (k % 500) * 0.002 for k in range(3000)]  # 10 s of audio per second
    source, sink = Burst("agent", times, frames), Sink("sink")
    route = Route("t", [source, sink])
    peak = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(route.run)
        while route.stats.ended_at is None:
            await trio.sleep(0.5)
            peak = max(peak, sink.stats.buffered_ms)
    audio = [(t, pcm) for t, pcm in sink.sent if pcm.any()]
    assert len(audio) == 3000 and sink.stats.dropped == 0 and sink.stats.late == 0
    assert np.array_equal(np.concatenate([pcm for _, pcm in audio]), np.concatenate([f.pcm[:, 0] for f in frames]))
    times_out = np.array([t for t, _ in audio]) - t0
    assert np.allclose(times_out, np.arange(3000) * 0.02, atol=1e-6)  # no drift over the minute
    assert peak > 40_000  # the queue depth was visible in the stats while it played out
    assert route.stats.ended_by == "agent: ended"


class Listener(Sink):
    """A sink that carries route events to its peer (a VideoSDK room, say)."""

    accepts_events = True

    def __init__(self, name):
        super().__init__(name)
        self.events = []

    def on_route_event(self, event):
        self.events.append(event)


async def test_route_events_are_counted_logged_and_forwarded_to_the_others(autojump_clock, caplog):
    caplog.set_level("INFO")
    source = Source("call", [0.0], [ramp_frame(0)], hold_open=True)
    plain, room, room2 = Sink("plain"), Listener("room"), Listener("room2")
    route = Route("t", [source, plain, room, room2])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
        source.route_event("dtmf", digit="5")
        room.route_event("message", topic="chat", data="hi")
        nursery.cancel_scope.cancel()
    assert [(e.source, e.kind, e.data) for e in room.events] == [("call", "dtmf", {"digit": "5"})]
    assert [(e.source, e.kind) for e in room2.events] == [("call", "dtmf"), ("room", "message")]  # never its own
    assert route.stats.events == 2 and source.stats.events_in == 1
    assert [e.kind for _, e in route.stats.recent_events] == ["dtmf", "message"]
    (logged,) = [r for r in caplog.records if r.getMessage() == "event from call: dtmf digit=5"]
    assert logged.route == "t"  # Tagged attaches route (and endpoint) as record fields


def test_hears_names_must_exist():
    with pytest.raises(ValueError, match=r"hears \['nobody'\]"):
        sink = Sink("rec")
        sink.hears = ("nobody",)
        Route("t", [Source("a", [], []), sink])


class Clocked(Source):
    """A source that plays out on its own clock (an RTP jitter buffer: Endpoint.clocked)."""

    clocked = True


async def test_a_clocked_source_is_sent_on_its_own_clock(autojump_clock):
    """Frames of a clocked source go out the moment they arrive, and the pacer's next deadline
    follows them: when the source's clock steps earlier or later, no frame waits for a second
    clock, none is late. The same frames from an unclocked source wait for the pacer's grid
    (the control case: the rule is what makes the difference)."""
    t0 = trio.current_time()
    # the source's clock steps 7 ms earlier at frame 10, then 5 ms later at frame 20
    times = [k * 0.02 - (0.007 if k >= 10 else 0) + (0.005 if k >= 20 else 0) for k in range(30)]
    frames = [ramp_frame(k) for k in range(30)]
    source, sink = Clocked("src", times, frames), Sink("sink")
    await run_route(source, sink, jitter_ms=20)
    assert [round(t - t0, 6) for t, _ in sink.sent] == [round(at, 6) for at in times]
    assert np.array_equal(np.concatenate([pcm for _, pcm in sink.sent]), np.concatenate([f.pcm[:, 0] for f in frames]))
    assert sink.stats.late == 0 and sink.stats.dropped == 0

    plain, plain_sink = Source("src", times, frames), Sink("sink")
    t1 = trio.current_time()
    await run_route(plain, plain_sink, jitter_ms=20)
    waited = [t - t1 - at for (t, _), at in zip(plain_sink.sent, times)]
    assert max(waited) == pytest.approx(0.007)  # the pacer's own deadline held frames back


async def test_a_clocked_sources_backlog_still_goes_one_packet_per_ptime(autojump_clock):
    """Five frames that a clocked source hands over at once (its buffer playing out after a
    stall) are not sent as a burst: the first goes at once, the others one ptime apart."""
    times = [k * 0.02 for k in range(10)] + [0.29] * 5 + [0.29 + k * 0.02 for k in range(1, 11)]
    frames = [ramp_frame(k) for k in range(25)]
    source, sink = Clocked("src", times, frames), Sink("sink")
    await run_route(source, sink, jitter_ms=20)
    sent_at = [t for t, pcm in sink.sent if pcm.any()]
    assert sent_at[10] - sent_at[0] == pytest.approx(0.29)  # the first of them at once
    assert np.diff(sent_at).min() >= 0.02 - 1e-9  # never two packets of audio within a ptime
    assert np.array_equal(np.concatenate([pcm for _, pcm in sink.sent if pcm.any()]),
                          np.concatenate([f.pcm[:, 0] for f in frames]))  # every frame, in order


async def test_a_clocked_sources_20ms_frames_leave_whole_into_a_10ms_sink(autojump_clock):
    """Issue 13: a sink whose ptime is shorter than the clocked source's frames sends each
    packet as soon as its samples exist: both 10 ms halves of a 20 ms frame leave the moment
    the frame arrives (before: the second waited a ptime), in order, and the frames' pace holds
    (one frame's packets, then the next frame's 20 ms later)."""
    t0 = trio.current_time()
    times = [k * 0.02 for k in range(30)]
    frames = [ramp_frame(k) for k in range(30)]
    source, sink = Clocked("src", times, frames), Sink("sink", ptime_ms=10)
    await run_route(source, sink, jitter_ms=20)
    assert len(sink.sent) == 60
    sent_at = [round(t - t0, 9) for t, _ in sink.sent]
    assert sent_at == [round(at, 9) for at in times for _ in range(2)]  # both halves at arrival
    assert np.array_equal(np.concatenate([pcm for _, pcm in sink.sent]), np.concatenate([f.pcm[:, 0] for f in frames]))
    assert sink.stats.late == 0 and sink.stats.dropped == 0
