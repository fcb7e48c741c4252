"""Hearing an Argon participant (`/audio/subscribe`, the hear half of `/audio/duplex`, and a
bot publishing into our listen role): the trio driver that plays received Opus packets out in
real time through an `OpusPlayout`.

The connection's reader task stamps each binary message with `trio.current_time()` and sends
`(packet, arrival)` on a memory channel; `play_out` pushes them into the playout buffer and
emits each frame at its playout deadline. Deadlines are absolute (`trio.move_on_at` /
`trio.sleep_until` on `OpusPlayout.next_deadline()`), so the output never drifts; while the
playout is idle the task just waits for the next packet, and a packet that arrives before a
deadline is pushed at once. All the rules (delay, concealment, FEC, idle) live in the pure
`OpusPlayout`; this loop only waits. With `stats`, what the playout concealed and rebuilt
from FEC is added to the endpoint's counters as it is emitted.
"""

from __future__ import annotations

from typing import Callable

import trio

from gateway.codecs.formats import AudioFrame
from gateway.codecs.playout import OpusPlayout
from gateway.endpoint import EndpointStats

__all__ = ["play_out"]


async def play_out(
    packets: trio.MemoryReceiveChannel[tuple[bytes, float]],
    emit: Callable[[AudioFrame], None],
    playout: OpusPlayout,
    stats: EndpointStats | None = None,
) -> None:
    """Push every `(packet, arrival time)` from `packets` into `playout` and call `emit` (which
    must not block: the route's `emit` is synchronous) for each frame as its deadline comes.

    `stats` (the endpoint's): `concealed` and `fec_recovered` grow by what this playout
    concealed and rebuilt from FEC (added, not assigned: they add up across sessions, each
    with a playout of its own), `jitter_ms` and `jitter_depth_ms` follow its jitter estimate
    and delay target. Returns when `packets` is closed and every packet buffered so far has
    been played (the concealment tail after the last packet is not waited for).
    """
    if stats is not None:
        emit = _counting(emit, playout, stats)
    closed = False
    while True:
        # Everything that already arrived goes in first: a deadline that has passed must not
        # conceal a packet that is waiting in the channel.
        while not closed:
            try:
                packet, arrival = packets.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                closed = True
            else:
                playout.push(packet, arrival)
        deadline = playout.next_deadline()
        if closed:
            if deadline is None or not playout.buffered:
                return
            await trio.sleep_until(deadline)
        elif deadline is None:  # idle: wait as long as it takes for the next packet
            try:
                packet, arrival = await packets.receive()
            except trio.EndOfChannel:
                return
            playout.push(packet, arrival)
            continue
        else:
            with trio.move_on_at(deadline):
                try:
                    packet, arrival = await packets.receive()
                except trio.EndOfChannel:
                    closed = True
                else:
                    playout.push(packet, arrival)
                continue
        for frame in playout.pull(trio.current_time()):
            emit(frame)


def _counting(emit: Callable[[AudioFrame], None], playout: OpusPlayout, stats: EndpointStats) -> Callable[[AudioFrame], None]:
    st = playout.stats
    counted = [st.concealed, st.fec]  # what of this playout's counts `stats` holds already

    def emit_counted(frame: AudioFrame) -> None:
        if st.concealed != counted[0] or st.fec != counted[1]:
            stats.concealed += st.concealed - counted[0]
            stats.fec_recovered += st.fec - counted[1]
            counted[0], counted[1] = st.concealed, st.fec
        stats.jitter_ms = st.jitter_ms
        stats.jitter_depth_ms = round(st.delay_ms)
        emit(frame)

    return emit_counted
