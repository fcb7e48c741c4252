"""The RTP jitter buffer (gateway/codecs/jitter.py), pure: packets pushed with a fake arrival
time, slots popped at the buffer's own `next_due`, as the VoIPBIN endpoint's playout task does.

What a listener would check: every packet plays once, in sequence order (across the 65535 → 0
wrap too), a missing packet gives a slot to conceal in its place, a packet that comes after
its slot was concealed is dropped (and counted), and the buffer holds back as little as the
jitter allows: more at once when packets come late, less slowly when it is calm, never more
than `max_ms`. RFC 3550 references: §6.4.1 (jitter), Appendix A.1 (sequence numbers).
"""

from __future__ import annotations

import random

import pytest

from gateway.codecs.jitter import (
    IDLE_AFTER,
    MARGIN_MS,
    SHRINK_MS_PER_S,
    START_DEPTH_MS,
    JitterBuffer,
    Verdict,
)

PTIME = 0.02
BASE = 0.050  # seconds of network transit of the fastest packet (any constant works)


def stream(count: int, *, first: int = 0, delay: dict[int, float] | None = None, order: list[int] | None = None,
           ts_step: int = 160):
    """Packets k = 0..count-1 (sequence first + k mod 2**16, RTP timestamp k * ts_step) sent every
    20 ms; packet k arrives at k * 20 ms + BASE + delay[k]. `order` replaces the send order
    (the packet sent in slot i is order[i]). Returns [(arrival, sequence, timestamp, k)]."""
    delay = delay or {}
    order = order if order is not None else list(range(count))
    return [(i * PTIME + BASE + delay.get(k, 0.0), (first + k) % 65536, (k * ts_step) % (1 << 32), k)
            for i, k in enumerate(order)]


def drive(jb: JitterBuffer, packets, *, watch=None, flush: bool = True):
    """Push each packet at its arrival time and pop at every `next_due`, in time order, as the
    endpoint's playout task does; after the last packet (the session ends), `flush`.
    Returns [(pop time, slot)]. `watch(now)` runs after every push and pop."""
    packets = sorted(packets, key=lambda p: p[0])
    out, i, now = [], 0, 0.0
    while i < len(packets):
        due = jb.next_due(now)
        arrival = packets[i][0]
        if due is None or arrival <= due:
            now = max(now, arrival)
            _, seq, ts, label = packets[i]
            jb.push(seq, ts, label, now)
            i += 1
        else:
            now = max(now, due)
        out.extend((now, slot) for slot in jb.pop(now))
        if watch is not None:
            watch(now)
    if flush:
        out.extend((now, slot) for slot in jb.flush())
    return out


def labels(out) -> list:
    """What played, slot by slot: the packet's label, "lost" or "inserted"."""
    return ["inserted" if s.inserted else "lost" if s.lost else s.payload for _, s in out]


def test_in_order_stream_plays_every_packet_once_at_the_start_depth():
    jb = JitterBuffer()
    out = drive(jb, stream(50))
    assert labels(out) == list(range(50))
    # the first packet waits START_DEPTH_MS; each slot then comes one ptime later (or a hair
    # earlier while the depth shrinks in calm)
    assert out[0][0] == pytest.approx(BASE + START_DEPTH_MS / 1000, abs=0.0005)
    timed = drive(JitterBuffer(), stream(50), flush=False)  # without the end's flush
    gaps = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    assert all(PTIME - 0.0002 <= g <= PTIME + 1e-9 for g in gaps)
    assert jb.stats.lost == jb.stats.late == jb.stats.duplicates == jb.stats.reordered == 0


def test_wraps_around_at_65535_in_order_and_reordered():
    jb = JitterBuffer()
    # 65530..65535, 0..9; and 65535 / 0 swapped on the wire
    swap = list(range(16))
    swap[5], swap[6] = 6, 5
    out = drive(jb, stream(16, first=65530, order=swap))
    assert labels(out) == list(range(16))
    extended = [s.sequence for _, s in out]
    assert extended == list(range(65530, 65546))  # extended numbers keep counting past 65535
    assert jb.stats.reordered == 1 and jb.stats.lost == 0
    # a packet from before the wrap that comes after it (still in time) is put back in place
    jb = JitterBuffer()
    packets = stream(8, first=65533)
    late_one = packets.pop(2)  # 65535 (k=2) arrives 25 ms late, after 0
    packets.append((late_one[0] + 0.025, *late_one[1:]))
    out = drive(jb, packets)
    assert labels(out) == list(range(8)) and jb.stats.reordered == 1


def test_swapped_pair_30_31_plays_30_then_31():
    jb = JitterBuffer()
    order = list(range(60))
    order[30], order[31] = 31, 30  # 31 is sent in 30's slot, 30 in 31's
    out = drive(jb, stream(60, order=order))
    assert labels(out) == list(range(60))
    assert jb.stats.reordered == 1 and jb.stats.late == 0 and jb.stats.lost == 0


def test_duplicates_play_once_and_are_counted():
    jb = JitterBuffer()
    packets = stream(40)
    packets.append((packets[10][0] + 0.001, *packets[10][1:]))  # a copy right behind (still held)
    packets.append((packets[20][0] + 0.200, *packets[20][1:]))  # a copy long after it played
    packets.append((packets[20][0] + 0.300, *packets[20][1:]))  # and another
    out = drive(jb, packets)
    assert labels(out) == list(range(40))
    assert jb.stats.duplicates == 3
    assert jb.push(*packets[30][1:3], "again", packets[-1][0] + 1.0) is Verdict.DUPLICATE
    assert jb.stats.late == 0  # a copy of a played packet is a duplicate, not late


def test_a_lost_packet_gives_a_lost_slot_in_its_place():
    jb = JitterBuffer()
    packets = [p for p in stream(40) if p[3] not in (12, 25, 26)]
    out = drive(jb, packets)
    got = labels(out)
    assert got == [("lost" if k in (12, 25, 26) else k) for k in range(40)]
    lost = [(t, s) for t, s in out if s.lost]
    assert [s.sequence for _, s in lost] == [12, 25, 26]
    # the lost slot comes at its due time, one ptime after the packet before it
    before = next(t for t, s in out if s.payload == 11)
    assert lost[0][0] == pytest.approx(before + PTIME, abs=0.0002)
    assert jb.stats.lost == 3 and jb.stats.concealed == 3 and jb.stats.played == 37


def test_a_late_packet_is_dropped_and_counted():
    jb = JitterBuffer(max_ms=60)
    # packet 10 comes 150 ms late: its slot is concealed long before
    out = drive(jb, stream(30, delay={10: 0.150}))
    got = labels(out)
    assert got.count(10) == 0 and jb.stats.late == 1
    assert "lost" in got[:12] or "inserted" in got[:12]
    assert [x for x in got if isinstance(x, int)] == [k for k in range(30) if k != 10]  # in order, once


def test_depth_grows_quickly_on_jitter_and_shrinks_slowly_in_calm():
    jb = JitterBuffer(max_ms=60)
    depth: list[tuple[float, float]] = []
    drive(jb, stream(500), watch=lambda now: depth.append((now, jb.stats.depth_ms)))
    calm_start = depth[0][1]
    assert calm_start == pytest.approx(START_DEPTH_MS)
    # calm: at most SHRINK_MS_PER_S per second...
    for (t0, d0), (t1, d1) in zip(depth, depth[1:]):
        assert d0 - d1 <= SHRINK_MS_PER_S * (t1 - t0) + 0.002  # (depth_ms is rounded to 1 us)
    after_1s = next(d for t, d in depth if t >= depth[0][0] + 1.0)
    assert START_DEPTH_MS - SHRINK_MS_PER_S - 0.5 <= after_1s < START_DEPTH_MS
    # ...down to the target: the margin (no jitter on this clockwork stream)
    assert depth[-1][1] == pytest.approx(MARGIN_MS, abs=0.5)

    # now one packet 30 ms late: the depth grows within a couple of slots, by inserting one
    jb = JitterBuffer(max_ms=60)
    depth.clear()
    slow = {k: 0.030 for k in range(400, 600, 50)}  # every second, one packet 30 ms late
    out = drive(jb, stream(600, delay=slow), watch=lambda now: depth.append((now, jb.stats.depth_ms)))
    before = [d for t, d in depth if t < 400 * PTIME + BASE]
    assert before[-1] < 15  # calm for 8 s: shrunk
    grown_at = next(t for t, d in depth if t >= 400 * PTIME + BASE and d > before[-1] + 15)
    assert grown_at - (400 * PTIME + BASE) < 3 * PTIME  # quickly
    assert jb.stats.inserted >= 1
    # the first late packet was concealed (the buffer was shallow); the later ones come in time
    assert jb.stats.late == 1
    assert [x for x in labels(out) if isinstance(x, int)] == [k for k in range(600) if k != 400]


def test_never_holds_more_than_max_ms():
    rng = random.Random(7)
    for max_ms in (20, 40, 60, 100):
        jb = JitterBuffer(max_ms=max_ms)
        packets = stream(1500, delay={k: rng.expovariate(1 / 0.030) for k in range(1500) if rng.random() < 0.3})
        arrived = {p[3]: p[0] for p in packets}
        depth_seen = []
        out = drive(jb, packets, watch=lambda now: depth_seen.append(jb.stats.depth_ms))
        assert max(depth_seen) <= max_ms + 1e-6
        waits = [t - arrived[s.payload] for t, s in out if not s.lost]
        assert max(waits) <= max_ms / 1000 + 1e-6  # no packet waited longer than max_ms
        assert min(waits) >= -1e-9  # nor played before it came
        played = [s.payload for _, s in out if not s.lost]
        assert played == sorted(played) and len(set(played)) == len(played)
        assert jb.stats.played + jb.stats.late == 1500
        assert jb.stats.jitter_ms > 1  # the RFC 3550 estimate saw it


def test_rfc3550_jitter_and_the_media_clock():
    # arrivals alternate 0 / 4 ms late: |D| is 4 ms for every pair, so J converges to 4 ms
    jb = JitterBuffer()
    drive(jb, stream(400, delay={k: 0.004 for k in range(1, 400, 2)}))
    assert jb.stats.jitter_ms == pytest.approx(4.0, abs=0.01)
    assert jb.stats.clock == "timestamp"  # 160 per packet: the RTP timestamps count samples
    # VoIPBIN slin: the timestamp grows by payload bytes (320 per packet): the sequence number
    # times 20 ms is the media clock, and a steady stream has no jitter
    jb = JitterBuffer()
    drive(jb, stream(100, ts_step=320))
    assert jb.stats.clock == "sequence" and jb.stats.jitter_ms == pytest.approx(0.0, abs=1e-6)


def test_a_sequence_restart_is_followed_and_a_stray_jump_is_not():
    jb = JitterBuffer()
    packets = stream(20)
    # the sender restarts at 40000 after packet 19 (two sequential packets confirm it)
    restart = [(t + 20 * PTIME, (40000 + k) % 65536, 0, 100 + k) for t, _, _, k in stream(20)]
    out = drive(jb, packets + restart)
    assert labels(out) == list(range(20)) + [100 + k for k in range(20)]
    assert jb.stats.restarts == 1
    # one stray packet with a wild number is held on probation, then discarded
    jb = JitterBuffer()
    packets = stream(30)
    packets.append((packets[15][0] + 0.005, 33333, 0, "stray"))
    out = drive(jb, packets)
    assert labels(out) == list(range(30)) and jb.stats.restarts == 0


def test_an_idle_stream_stops_and_the_next_packet_starts_it_again():
    jb = JitterBuffer()
    # 20 packets, then the sender pauses 1 s and goes on with the next number (no gap)
    packets = stream(20) + [(t + 1.0, seq, ts, 100 + k) for t, seq, ts, k in stream(20, first=20)]
    out = drive(jb, packets)
    got = labels(out)
    assert got[:20] == list(range(20))
    assert got[20 : 20 + IDLE_AFTER] == ["lost"] * IDLE_AFTER  # concealed, then idle
    assert got[20 + IDLE_AFTER :] == [100 + k for k in range(20)]  # every packet after the pause
    assert jb.stats.late == 0 and jb.stats.restarts == 1
    # while idle there is nothing to wake up for
    jb = JitterBuffer()
    drive(jb, stream(5), flush=False)
    assert labels([(0, s) for s in jb.pop(100.0)]) == [3, 4, *["lost"] * IDLE_AFTER]
    assert jb.idle and jb.next_due(100.0) is None


def test_late_packets_in_sequence_move_the_timeline():
    """A sender that stops for 100 ms and goes on with the next number (its timeline moved,
    less than the idle limit; or a stall): the slots of the pause are concealed, and the buffer
    follows the late packets from the first on (RESYNC_AFTER_LATE): none of them is lost."""
    jb = JitterBuffer()
    after = [(t + 20 * PTIME + 0.100, seq, ts + 3200, 100 + k) for t, seq, ts, k in stream(20, first=20)]
    out = drive(jb, stream(20) + after)
    got = labels(out)
    assert got[:20] == list(range(20))
    resumed = got.index(100)
    assert set(got[20:resumed]) <= {"lost", "inserted"} and resumed - 20 >= 3  # the pause (less the depth), concealed
    assert got[resumed:] == [100 + k for k in range(20)]  # in order, none dropped
    assert jb.stats.late == 0 and jb.stats.restarts == 1


def test_max_ms_0_is_arrival_order_without_duplicates():
    jb = JitterBuffer(max_ms=0)
    order = list(range(20))
    order[5], order[6] = 6, 5
    packets = [p for p in stream(20, order=order) if p[3] != 10]
    packets.append((packets[3][0] + 0.001, *packets[3][1:]))  # a duplicate
    out = drive(jb, packets)
    # arrival order as it came (6 before 5: the gap before 6 is a lost slot, as the adapter did
    # before it had a buffer), the gap at 10 a lost slot, the copy dropped
    assert labels(out) == [0, 1, 2, 3, 4, "lost", 6, 5, 7, 8, 9, "lost", 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert jb.stats.duplicates == 1 and jb.stats.reordered == 1 and jb.stats.depth_ms == 0
    # each slot is due the moment its packet arrives
    arrived = sorted(p[0] for p in packets[:-1])
    assert [t for t, s in out if not s.lost] == pytest.approx(arrived)


def test_next_due_and_flush():
    jb = JitterBuffer(max_ms=60)
    assert jb.next_due(0.0) is None  # nothing yet
    jb.push(7, 0, "a", 1.0)
    assert jb.next_due(1.0) == pytest.approx(1.0 + START_DEPTH_MS / 1000)
    assert jb.pop(1.01) == []
    jb.push(9, 320, "c", 1.015)
    # the stream ends: what is held comes out at once, the gap as a lost slot
    out = jb.flush()
    assert [(s.sequence, s.payload) for s in out] == [(7, "a"), (8, None), (9, "c")]
    assert jb.held == 0
    with pytest.raises(ValueError, match="out of range"):
        jb.push(65536, 0, "x", 2.0)
    with pytest.raises(ValueError, match="None"):
        jb.push(10, 0, None, 2.0)


@pytest.mark.parametrize("seed", range(6))
def test_random_impairments_never_break_order_or_bounds(seed):
    """Losses, delays, duplicates and pauses at random, across a wrap: whatever happens, the
    packets that play are in sequence order and each once, every packet is accounted for
    (played, late or duplicate), and no packet waits more than max_ms."""
    rng = random.Random(seed)
    max_ms = rng.choice([20, 40, 60, 100])
    jb = JitterBuffer(max_ms=max_ms)
    first = rng.randrange(65536 - 600, 65536)
    packets, shift = [], 0.0
    for k in range(1500):
        if rng.random() < 0.005:
            shift += rng.uniform(0.05, 0.6)  # the sender pauses (its numbers go on)
        if rng.random() < 0.05:
            continue  # lost
        arrival = k * PTIME + BASE + shift + (rng.expovariate(1 / 0.025) if rng.random() < 0.2 else 0.0)
        packets.append((arrival, (first + k) % 65536, k * 160, k))
        if rng.random() < 0.03:
            packets.append((arrival + rng.uniform(0, 0.2), (first + k) % 65536, k * 160, k))
    arrived: dict[int, float] = {}
    for p in sorted(packets, key=lambda p: p[0]):
        arrived.setdefault(p[3], p[0])
    depth = []
    out = drive(jb, packets, watch=lambda now: depth.append(jb.stats.depth_ms))
    played = [(t, s.payload) for t, s in out if not s.lost]
    labels_played = [label for _, label in played]
    assert labels_played == sorted(set(labels_played))
    assert jb.stats.played + jb.stats.late + jb.stats.duplicates == jb.stats.received == len(packets)
    assert max(depth) <= max_ms + 1e-6
    assert all(t - arrived[label] <= max_ms / 1000 + 1e-6 for t, label in played[:-20])  # (the end flushes)
