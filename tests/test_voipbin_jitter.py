"""VoIPBIN rtp ingress through the jitter buffer and the concealer, end to end over loopback:
a VoIPBIN rtp client (the gateway's listen role) sends 2 s of recorded speech as RTP with
swapped pairs, duplicates and losses, across the 65535 → 0 sequence wrap; a `record`
endpoint on the same route writes what the route got. The recording is read packet by packet.

How a packet is found in the recording: the route passes the decoded u-law samples through
unchanged (one source, no resampling), so each packet's samples 80-130 (which neither
overlap-add of the concealer touches: the start of a loss changes at most the last 30 of the
packet before it, the join at most the first 80 of the packet after it) appear exactly once,
somewhere in the file; that is compared as bytes (a packet whose fingerprint is not unique in
the clip itself is not used). In order means the positions grow with the sequence number;
each once means one position; every frame is 20 ms means all positions lie on one 160-sample
grid; a concealed loss is the slot between its neighbours.

Timing on a loaded machine: the buffer's deadlines are relative to arrival, and the client
runs in the same process, so a stall of the whole process (tens of ms on a busy 2-core CI
box) can make a packet miss its slot: it is then late (dropped and counted `late_packets`,
its slot concealed) or, if it was one of a swapped pair, late instead of reordered. So the
checks that depend on timing allow for exactly what such a stall does and no more: a packet
may be missing from the recording only if `late_packets` counts it (up to 5 of 97), and
`reordered + late_packets` covers the swaps. Everything else is exact whatever the load: no
packet out of order, none twice, the duplicates counted, every frame on the grid, the losses
concealed (or silence with `concealment: false`).
"""

from __future__ import annotations

import audioop
import struct

import numpy as np
import pytest
import trio

from audio_checks import read_wav
from gateway.errors import ConfigError
from harness import VOIPBIN_TOKEN, start, ws_client

FRAME = 160  # samples, 20 ms at 8 kHz
PACKETS = 100  # the 2 s clip
FIRST_SEQ = 65480  # packet 56 wraps the sequence number to 0
SWAPS = (20, 45, 70)  # packets k and k+1 sent in each other's slot
DUPLICATES = {30: 0.001, 60: 0.150}  # packet k sent again this many seconds after it
SSRC = 0x5EED1234

ROUTES = """\
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, call_id: jb-call$extra}
      - record: {path: "$out/call.wav", rate: 8000}
"""


def rtp(seq: int, timestamp: int, payload: bytes) -> bytes:
    """An RTP v2 packet, PT 0 (PCMU), RFC 3550 §5.1."""
    return struct.pack("!BBHII", 0x80, 0, seq % 65536, timestamp % (1 << 32), SSRC) + payload


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def choose_losses(decoded: np.ndarray) -> tuple[int, ...]:
    """Three packets to lose, in loud speech (so concealment and silence differ), away from
    the swaps, the duplicates and each other, with loud neighbours."""
    level = [rms(decoded[k * FRAME : (k + 1) * FRAME]) for k in range(PACKETS)]
    busy = {k + d for k in (*SWAPS, *DUPLICATES) for d in range(-2, 4)}
    chosen: list[int] = []
    for k in sorted(range(10, PACKETS - 5), key=lambda k: -min(level[k - 1], level[k], level[k + 1])):
        if k not in busy and all(abs(k - c) > 5 for c in chosen):
            chosen.append(k)
        if len(chosen) == 3:
            return tuple(sorted(chosen))
    raise AssertionError("no loud packets to lose in the clip")


async def call(tmp_path, clip, extra: str = ""):
    """Run the gateway, play the clip as impaired RTP from a client; returns (decoded clip,
    losses, recording, the voipbin endpoint's stats, the record endpoint's stats)."""
    pcm, rate = read_wav(clip)
    assert rate == 8000
    ulaw = audioop.lin2ulaw(pcm[: PACKETS * FRAME, 0].tobytes(), 2)
    decoded = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype=np.int16)
    losses = choose_losses(decoded)
    order = list(range(PACKETS))
    for k in SWAPS:
        order[k], order[k + 1] = order[k + 1], order[k]
    packet = {k: rtp(FIRST_SEQ + k, k * FRAME, ulaw[k * FRAME : (k + 1) * FRAME]) for k in range(PACKETS)}
    schedule = [(slot * 0.02, k) for slot, k in enumerate(order) if k not in losses]
    schedule += [(order.index(k) * 0.02 + delay, k) for k, delay in DUPLICATES.items()]
    schedule.sort()
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, out=tmp_path, extra=extra)
        state = gateway.routes["call"]
        url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/jb-call/media_stream"
               f"?encapsulation=rtp&token={VOIPBIN_TOKEN}")
        ws = await ws_client(nursery, url)
        t0 = trio.current_time() + 0.05
        for at, k in schedule:  # absolute deadlines: no drift
            await trio.sleep_until(t0 + at)
            await ws.send_message(packet[k])
        await trio.sleep(0.1)
        await ws.aclose()  # the call ends: what the buffer holds plays out, the route ends
        with trio.fail_after(10):
            await state.sessions_done.wait()
        endpoints = state.route.endpoints
        nursery.cancel_scope.cancel()
    recording, rate = read_wav(tmp_path / "call.wav")
    assert rate == 8000
    return decoded, losses, recording[:, 0].copy(), endpoints[0].stats, endpoints[1].stats


def locate(decoded: np.ndarray, recording: np.ndarray) -> tuple[dict[int, list[int]], set[int]]:
    """Where each packet's fingerprint (its samples 80-130) is in the recording (sample
    positions of the packet's start), and which packets have a fingerprint unique in the clip."""
    found, unique = {}, set()
    clip, data = decoded.tobytes(), recording.tobytes()

    def positions(haystack: bytes, needle: bytes) -> list[int]:
        out, at = [], haystack.find(needle)
        while at >= 0:
            if at % 2 == 0:
                out.append(at // 2 - 80)
            at = haystack.find(needle, at + 1)
        return out

    for k in range(PACKETS):
        fingerprint = decoded[k * FRAME + 80 : k * FRAME + 130]
        if rms(fingerprint) < 30:  # near digital silence: not telling
            continue
        needle = fingerprint.tobytes()
        if len(positions(clip, needle)) == 1:
            unique.add(k)
            found[k] = positions(data, needle)
    return found, unique


def check_played_once_in_order(decoded, losses, recording, stats, *, arrival_order: bool = False):
    """The checks that hold whatever the load (module docstring); returns {packet: start}.

    Every frame is 20 ms, so every packet that played starts on one 160-sample grid. Off the
    grid a fingerprint may appear once more inside a concealed slot: waveform repeat copies the
    last pitch period exactly during the first 10 ms of a loss (and attenuates after, so a copy
    never reaches samples 80-130 of a slot, where a packet on the grid would be)."""
    found, unique = locate(decoded, recording)
    sent = unique - set(losses)
    assert len(sent) >= 80, "the clip has too few telling packets"
    residues = [p % FRAME for k in sent for p in found[k]]
    grid = max(set(residues), key=residues.count)
    plays = {k: [p for p in found[k] if p % FRAME == grid] for k in unique}
    assert all(not plays[k] for k in unique & set(losses)), "a packet that was never sent is in the recording"
    off_grid = {k: found[k] for k in sent if found[k] and not plays[k]}
    assert not off_grid, f"frames off the 20 ms grid: {off_grid} (grid {grid})"
    twice = {k: plays[k] for k in sent if len(plays[k]) > 1}
    assert not twice, f"played more than once: {twice}"
    start = {k: plays[k][0] for k in sorted(sent) if plays[k]}
    if not arrival_order:
        starts = list(start.values())
        assert starts == sorted(starts), f"out of order: {start}"
    missing = sorted(sent - set(start))
    assert len(missing) <= min(5, stats.late_packets), f"missing {missing}, late_packets {stats.late_packets}"
    assert stats.frames_in == PACKETS - len(losses) + len(DUPLICATES)
    assert stats.duplicates == len(DUPLICATES)
    return start


def lost_slots(losses, start, recording):
    """For each loss whose neighbours both played, one slot apart: the samples of its slot."""
    slots = {}
    for k in losses:
        if k - 1 in start and k + 1 in start and start[k + 1] - start[k - 1] == 2 * FRAME:
            slots[k] = recording[start[k - 1] + FRAME : start[k - 1] + 2 * FRAME].astype(np.float64)
    return slots


async def test_swaps_duplicates_and_losses_play_in_order_once_and_concealed(tmp_path, speech_clip):
    decoded, losses, recording, stats, record = await call(tmp_path, speech_clip)
    start = check_played_once_in_order(decoded, losses, recording, stats)
    # the swapped pairs were put back in order (or, after a stall, the first one was late)
    assert stats.reordered <= len(SWAPS) and stats.reordered + stats.late_packets >= len(SWAPS), stats
    # each loss: a slot of concealment at about the speech's level (not silence)
    slots = lost_slots(losses, start, recording)
    assert slots, f"no loss with both neighbours played: {losses}, {stats}"
    for k, slot in slots.items():
        lost = decoded[k * FRAME : (k + 1) * FRAME]
        assert rms(slot) > 0.2 * rms(lost), f"packet {k}: concealed at {rms(slot):.0f}, the speech was {rms(lost):.0f}"
    assert stats.concealed >= len(losses)
    assert 0 < stats.jitter_ms < 60 and 0 <= stats.jitter_depth_ms <= 60
    assert record.frames_out * FRAME >= len(recording) - FRAME  # the recorder got it all from the route


async def test_concealment_false_fills_losses_with_silence(tmp_path, speech_clip):
    """`concealment: false` (the bench's baseline): the same order and dedupe, plain silence
    in the lost slots, and received packets untouched (no concealer, so no delay either)."""
    decoded, losses, recording, stats, _ = await call(tmp_path, speech_clip, extra=", concealment: false")
    start = check_played_once_in_order(decoded, losses, recording, stats)
    slots = lost_slots(losses, start, recording)
    assert slots
    for slot in slots.values():
        assert not slot.any()
    for k, at in start.items():  # whole packets, bit-exact
        assert np.array_equal(recording[at : at + FRAME], decoded[k * FRAME : (k + 1) * FRAME])
    assert stats.concealed >= len(losses)


async def test_jitter_buffer_ms_0_plays_in_arrival_order_without_duplicates(tmp_path, speech_clip):
    """`jitter_buffer_ms: 0`: no buffer. Packets play as they arrive (each swapped pair in the
    order sent, the gap before the first of it concealed as before), duplicates still once.
    Nothing here depends on timing: the counts are exact."""
    decoded, losses, recording, stats, _ = await call(tmp_path, speech_clip, extra=", jitter_buffer_ms: 0")
    start = check_played_once_in_order(decoded, losses, recording, stats, arrival_order=True)
    for k in SWAPS:
        if k in start and k + 1 in start:
            assert start[k + 1] < start[k]  # arrival order
    assert stats.reordered == len(SWAPS) and stats.late_packets == 0
    assert stats.concealed == len(losses) + len(SWAPS) and stats.jitter_depth_ms == 0


@pytest.mark.parametrize("extra, error", [
    (", jitter_buffer_ms: -1", "jitter_buffer_ms: expected at least 0"),
    (", jitter_buffer_ms: 5000", "jitter_buffer_ms: expected at most 1000"),
    (", concealment: perhaps", "concealment: expected true or false"),
])
async def test_options_are_checked(tmp_path, extra, error):
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigError, match=error):
            await start(nursery, ROUTES, out=tmp_path, extra=extra)
        nursery.cancel_scope.cancel()


async def test_options_reach_the_endpoint(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, out=tmp_path, extra=", jitter_buffer_ms: 100, concealment: false")
        endpoint = gateway.routes["call"].route.endpoints[0]
        assert endpoint.jitter_buffer_ms == 100 and endpoint.concealment is False
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, out=tmp_path, extra="")
        endpoint = gateway.routes["call"].route.endpoints[0]
        assert endpoint.jitter_buffer_ms == 60 and endpoint.concealment is True
        nursery.cancel_scope.cancel()
