"""The pacer's rules as pure objects (gateway/pacer.py), without an event loop: frames go in
with made-up arrival times (`simulate`), packets come out with the times the clock sends them.
And one check that the route's trio driver is only that: the same arrivals through a real
Route under MockClock give the same packets at the same times."""

from __future__ import annotations

import random

import attrs
import numpy as np
import pytest
import trio

from gateway.codecs.formats import PCM16_8K, AudioFrame
from gateway.endpoint import Endpoint, EndpointStats
from gateway.pacer import DRAIN, IDLE_AFTER, STEP_AFTER, Send, SinkClock, Wait, simulate
from gateway.route import Route

RATE = 8000


@attrs.define
class Src:
    bursty: bool = False
    burst_buffer_ms: int = 60_000


def ramp(k: int, samples: int = 160) -> AudioFrame:
    """Frame k of a stream whose sample i is (i % 30000) + 1: never 0, so silence shows."""
    values = (np.arange(k * samples, (k + 1) * samples) % 30000 + 1).astype(np.int16)
    return AudioFrame(values.reshape(-1, 1), RATE, k * samples)


def tone(k: int, level: int, samples: int = 160) -> AudioFrame:
    return AudioFrame(np.full((samples, 1), level, np.int16), RATE, k * samples)


def clock(sources=1, ptime_ms=20, **kw) -> SinkClock:
    return SinkClock([Src() for _ in range(sources)], PCM16_8K, ptime_ms, stats=EndpointStats(), **kw)


def stream(times, frames, slot=0, end=True):
    arrivals = [(t, slot, f) for t, f in zip(times, frames)]
    if end:
        arrivals.append((times[-1], slot, None))
    return arrivals


def audio(sent):
    return np.concatenate([f.pcm[:, 0] for _, f in sent])


def test_the_first_packet_goes_at_once_and_the_rest_on_the_grid():
    frames = [ramp(k) for k in range(50)]
    sent = simulate(c := clock(), stream([1.0 + k * 0.02 for k in range(50)], frames))
    assert [t for t, _ in sent] == pytest.approx([1.0 + k * 0.02 for k in range(50)], abs=1e-12)
    assert np.array_equal(audio(sent), np.concatenate([f.pcm[:, 0] for f in frames]))
    assert c.stats.late == 0 and c.stats.dropped == 0 and c.stats.skipped == 0


def test_20ms_frames_into_a_10ms_sink_are_spaced_when_the_source_is_not_clocked():
    sent = simulate(clock(ptime_ms=10), stream([k * 0.02 for k in range(20)], [ramp(k) for k in range(20)]))
    assert len(sent) == 40
    assert np.allclose(np.diff([t for t, _ in sent]), 0.010)


def test_20ms_frames_into_a_10ms_sink_leave_whole_when_the_source_is_clocked():
    times = [k * 0.02 for k in range(20)]
    sent = simulate(c := clock(ptime_ms=10, clocked=True), stream(times, [ramp(k) for k in range(20)]))
    assert [t for t, _ in sent] == pytest.approx([t for t in times for _ in range(2)], abs=1e-12)
    assert c.stats.late == 0


def test_a_clocked_backlog_of_long_frames_still_plays_at_real_time():
    """Five 20 ms frames handed over at once into a 10 ms sink: each frame's two packets go
    together, but frame after frame 20 ms apart (the clock keeps the frames' pace)."""
    times = [0.0] * 5 + [0.02 * k for k in range(5, 10)]
    sent = simulate(clock(ptime_ms=10, clocked=True), stream(times, [ramp(k) for k in range(10)]))
    starts = [t for t, _ in sent][::2]
    assert np.diff(starts).min() == pytest.approx(0.02)
    assert np.array_equal(audio(sent), np.concatenate([ramp(k).pcm[:, 0] for k in range(10)]))


def test_a_late_packet_from_a_clocked_source_does_not_leave_the_clock_late():
    """One packet 15 ms late every 60 (a stall of the source's jitter buffer playout, say):
    that packet goes when it comes, and the packets after it go as they come again, the next
    one half a ptime after it at the most. Before, the clock stayed on the late packet's phase
    and every packet waited ~15 ms for its deadline, for as long as a packet a window was
    late (bench/README.md, tenth measurement)."""
    n, late = 1500, {k for k in range(30, 1500, 60)}
    times = [1.0 + k * 0.02 + (0.015 if k in late else 0.0) for k in range(n)]
    sent = simulate(c := clock(clocked=True), stream(times, [ramp(k) for k in range(n)]))
    assert np.array_equal(audio(sent)[: n * 160], np.concatenate([ramp(k).pcm[:, 0] for k in range(n)]))
    waits = np.array([t - arrived for (t, _), arrived in zip(sent, times)])
    after_late = np.array([k - 1 in late for k in range(n)])
    assert waits.min() >= -1e-12  # nothing before it is there
    assert waits[~after_late].max() == pytest.approx(0.0, abs=1e-9)  # the late one, and every other, at once
    assert waits[after_late].max() == pytest.approx(0.005, abs=1e-9)  # half a ptime after the late one
    sends = np.array([t for t, _ in sent])
    assert np.diff(sends).min() == pytest.approx(0.010, abs=1e-9)  # never closer: no burst
    assert c.stats.late == 0


def test_a_sink_stalled_in_its_wait_takes_in_what_queued_instead_of_sending_silence():
    """The sink's driver is off the CPU for 100 ms (a busy host, a long GC) while it waits for
    a deadline; the source's frames queue meanwhile. When it runs again it re-anchors and
    plays them: no silence slot, nothing counted late, every sample in order, and never two
    packets closer than a ptime. Before, it finished the stale slot first, found the source
    short (what queued was not taken in yet), sent silence and counted it late, and played the
    audio a packet later (bench/README.md, eleventh measurement)."""
    n = 300
    times = [1.0 + k * 0.02 for k in range(n)]
    sent = simulate(c := clock(), stream(times, [ramp(k) for k in range(n)]), stalls=[(3.0005, 0.1)])
    assert np.array_equal(audio(sent), np.concatenate([ramp(k).pcm[:, 0] for k in range(n)]))
    assert c.stats.late == 0
    sends = np.array([t for t, _ in sent])
    assert sends[101] == pytest.approx(3.1005)  # the first packet after the stall goes at once
    assert np.diff(sends).min() >= 0.02 - 1e-9  # the frames that queued are excess: no burst


def test_after_a_stall_a_packet_of_excess_held_as_phase_is_won_back_at_once():
    """Two sinks of one process stall together, the second fed by the first (a route into
    another route over loopback, as in test_argon_startup). The second comes back with one
    packet of excess that shows as a phase: each packet arrives just after the pop of the one
    before and waits ~18 ms for its deadline. The phase step moves its clock back half a ptime
    after STEP_AFTER such packets; before, every packet waited ~18 ms until a window's end,
    which the packet before the shift spoiled: 99 packets (2 s). Nothing is lost or late."""
    n = 300
    times = [1.0 + k * 0.02 for k in range(n)]
    first = simulate(clock(), stream(times, [ramp(k) for k in range(n)]), stalls=[(3.0005, 0.1)])
    hop = 0.0015  # the loopback hop between the two
    arrived = [t + hop for t, _ in first]
    sent = simulate(c := clock(), stream(arrived, [f for _, f in first]), stalls=[(3.0005, 0.1)])
    assert np.array_equal(audio(sent), np.concatenate([ramp(k).pcm[:, 0] for k in range(n)]))
    assert c.stats.late == 0
    waits = np.array([t for t, _ in sent]) - np.array(arrived)
    after = np.array(arrived) > 3.1
    assert (waits[after] > 0.010).sum() == STEP_AFTER  # then half a ptime less
    assert (waits[after] > 0.010 - 1e-9).sum() <= STEP_AFTER
    assert np.diff([t for t, _ in sent]).min() >= 0.010 - 1e-9  # never a burst


def test_a_packet_late_from_the_source_keeps_its_excess_until_a_pause():
    """No stall: one packet comes 35 ms late (beyond the allowance). Its slot is silence, and
    the packet of excess it leaves stays a cushion against the source's jitter (won back in
    a pause, or by a window, never by the phase step)."""
    n = 40
    times = [k * 0.02 for k in range(n)]
    times[10] += 0.035
    times[11] = times[10]
    sent = simulate(c := clock(jitter_ms=20), stream(times, [ramp(k) for k in range(n)]))
    assert c.stats.late == 1
    sends = [t for t, _ in sent]
    assert np.allclose(np.diff(sends[12:30]), 0.02)  # on the grid: no step


def test_jitter_within_the_allowance_is_waited_for():
    times = [k * 0.02 + (0.012 if k % 3 == 1 else 0) for k in range(30)]
    sent = simulate(c := clock(jitter_ms=20), stream(times, [ramp(k) for k in range(30)]))
    assert np.array_equal(audio(sent)[: 30 * 160], np.concatenate([ramp(k).pcm[:, 0] for k in range(30)]))
    assert c.stats.late == 0


def test_audio_later_than_the_allowance_is_concealed_with_silence_then_played():
    times = [k * 0.02 for k in range(20)]
    times[10] += 0.035
    times[11] = times[10]
    sent = simulate(c := clock(jitter_ms=20), stream(times, [ramp(k) for k in range(20)]))
    assert c.stats.late == 1
    silent = [i for i, (_, f) in enumerate(sent) if not f.pcm.any()]
    assert silent == [10]  # one slot of silence, then frame 10 plays
    played = np.concatenate([f.pcm[:, 0] for _, f in sent if f.pcm.any()])
    assert np.array_equal(played, np.concatenate([ramp(k).pcm[:, 0] for k in range(20)]))


def test_a_source_gone_quiet_is_idle_after_a_few_packets_and_silence_keeps_flowing():
    times = [k * 0.02 for k in range(10)] + [1.0 + k * 0.02 for k in range(10)]
    sent = simulate(c := clock(), stream(times, [ramp(k) for k in range(20)]))
    assert c.stats.late == IDLE_AFTER  # waited for it that many times, then no more
    t = [t for t, _ in sent]
    gap = [x for x in t if 0.301 <= x < 1.0]  # (the late slots before it waited jitter_ms each)
    assert len(gap) == 34 and np.allclose(np.diff(gap), 0.02)  # silence on the grid through the pause
    back = next(i for i, (_, f) in enumerate(sent) if i >= 10 and f.pcm.any())
    assert sent[back][0] == pytest.approx(1.0)  # re-anchored on the audio: out at once


def test_mix_minus_sums_the_sources_with_saturation():
    a = stream([k * 0.02 for k in range(10)], [tone(k, 30000) for k in range(10)], slot=0)
    b = stream([k * 0.02 for k in range(10)], [tone(k, 10000) for k in range(10)], slot=1)
    sent = simulate(clock(sources=2), a + b)
    assert len(sent) == 10 and all((f.pcm == 32767).all() for _, f in sent)


def test_a_start_up_backlog_is_won_back_in_pauses_and_speech_is_never_skipped():
    """2 s queued before the sink's pacer ran, the source live right behind it: speech bursts
    with pauses between.
    The pauses get shorter (packets skipped) until the added latency is gone; every packet of
    speech is played, in order."""
    speech = lambda k: (k // 25) % 2 == 0  # noqa: E731  # 0.5 s speech, 0.5 s pause
    frames = [tone(k, 8000) if speech(k) else tone(k, 3) for k in range(500)]
    times = [0.0] * 100 + [(k - 99) * 0.02 for k in range(100, 500)]
    sent = simulate(c := clock(), stream(times, frames))
    assert c.stats.skipped >= 95  # most of the 2 s backlog (99 packets beyond the first)
    loud = [f for _, f in sent if f.pcm[0, 0] == 8000]
    assert len(loud) == sum(1 for k in range(500) if speech(k))  # all speech, none skipped
    # by the end the packets leave as they arrive: the excess is gone
    last_speech = max(k for k in range(500) if speech(k))
    t_out = [t for t, f in sent if f.pcm[0, 0] == 8000][-1]
    assert t_out - times[last_speech] < 0.021


def test_audio_beyond_max_delay_is_dropped_oldest_first():
    """A live source that sends a second of audio at once while already playing (not idle,
    its start-up allowance used up) keeps at most max_delay_ms of it."""
    times = [k * 0.02 for k in range(150)] + [3.0] * 50
    frames = [ramp(k) for k in range(200)]
    simulate(c := clock(max_delay_ms=200), stream(times, frames))
    assert c.stats.dropped > 0


def test_an_ended_source_is_played_out_then_the_clock_ends():
    frames = [ramp(k, 100) for k in range(3)]  # 300 samples: one packet and a padded one
    sent = simulate(clock(), stream([0.0, 0.0, 0.0], frames))
    assert len(sent) == 2
    out = audio(sent)
    assert np.array_equal(out[:300], np.concatenate([f.pcm[:, 0] for f in frames]))
    assert not out[300:].any()


def test_the_clock_does_not_drift_over_a_minute():
    times = [k * 0.02 + random.Random(k).uniform(0, 0.004) for k in range(3000)]
    sent = simulate(clock(), stream(times, [ramp(k) for k in range(3000)]))
    assert len(sent) == 3000
    assert sent[-1][0] - sent[0][0] == pytest.approx(2999 * 0.02, abs=0.005)


def test_the_steps_are_the_drivers_contract():
    """What a driver sees: a wait for the first frame, a drain, then waits and sends."""
    c = clock()
    steps = c.steps()
    first = next(steps)
    assert isinstance(first, Wait) and first.until == float("inf") and not first.done()
    c.accept(0, ramp(0), 5.0)
    assert first.done()
    assert steps.send(5.0) == DRAIN
    wait = steps.send(5.0)
    assert isinstance(wait, Wait) and wait.until == 5.0
    send = steps.send(5.0)
    assert isinstance(send, Send) and np.array_equal(send.frame.pcm, ramp(0).pcm)


# --- the trio driver is only a driver ------------------------------------------------------


class Player(Endpoint):
    kind = "source"
    ingress = PCM16_8K

    def __init__(self, name, arrivals, *, clocked=False):
        super().__init__(name)
        self.arrivals, self.clocked = arrivals, clocked

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        t0 = trio.current_time()
        for at, frame in self.arrivals:
            await trio.sleep_until(t0 + at)
            emit(frame)


class Recorder(Endpoint):
    kind = "sink"

    def __init__(self, name, ptime_ms):
        super().__init__(name)
        self.egress, self.ptime_ms = PCM16_8K, ptime_ms
        self.sent: list[tuple[float, np.ndarray]] = []

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.sleep_forever()

    async def send(self, frame):
        self.sent.append((trio.current_time(), frame.pcm.copy()))


@pytest.mark.parametrize("seed, ptime_ms, clocked", [(1, 20, False), (2, 10, True), (3, 20, True), (4, 40, False)])
async def test_a_route_sends_what_the_pure_clock_sends(autojump_clock, seed, ptime_ms, clocked):
    """Random jitter, losses, bursts and a stall through a real Route and through `simulate`:
    the same packets at the same times (the driver adds no rule of its own)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for k in range(400):
        t = k * 0.02 + rng.choice([0, 0, 0, 0.004, 0.011, 0.03]) + (0.3 if 200 <= k < 210 else 0)
        if rng.random() > 0.03:  # 3 % lost
            arrivals.append((t, tone(k, rng.choice([4, 9000]))))
    arrivals.sort(key=lambda a: a[0])
    source, sink = Player("src", arrivals, clocked=clocked), Recorder("sink", ptime_ms)
    route = Route("t", [source, sink], jitter_ms=20, max_delay_ms=200)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)
    pure = SinkClock([Src()], PCM16_8K, ptime_ms, stats=EndpointStats(), jitter_ms=20, max_delay_ms=200,
                     clocked=clocked)
    expected = simulate(pure, [(at, 0, f) for at, f in arrivals] + [(arrivals[-1][0], 0, None)])
    got = [(round(t - t0, 9), pcm) for t, pcm in sink.sent]
    assert [t for t, _ in got] == [round(t, 9) for t, _ in expected]
    assert all(np.array_equal(a, f.pcm) for (_, a), (_, f) in zip(got, expected))
    assert (sink.stats.late, sink.stats.skipped, sink.stats.dropped) == \
        (pure.stats.late, pure.stats.skipped, pure.stats.dropped)
