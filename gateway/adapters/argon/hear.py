"""Hearing an Argon participant (`/audio/subscribe`, the hear half of `/audio/duplex`): the
trio driver that plays received Opus packets out in real time through an `OpusPlayout`.

The connection's reader task stamps each binary message with `trio.current_time()` and sends
`(packet, arrival)` on a memory channel; `play_out` pushes them into the playout buffer and
emits each frame at its playout deadline. Deadlines are absolute (`trio.move_on_at` /
`trio.sleep_until` on `OpusPlayout.next_deadline()`), so the output never drifts; while the
playout is idle the task just waits for the next packet, and a packet that arrives before a
deadline is pushed at once. All the rules (delay, concealment, FEC, idle) live in the pure
`OpusPlayout`; this loop only waits.
"""

from __future__ import annotations

from typing import Callable

import trio

from gateway.codecs.formats import AudioFrame
from gateway.codecs.playout import OpusPlayout

__all__ = ["play_out"]


async def play_out(
    packets: trio.MemoryReceiveChannel[tuple[bytes, float]],
    emit: Callable[[AudioFrame], None],
    playout: OpusPlayout,
) -> None:
    """Push every `(packet, arrival time)` from `packets` into `playout` and call `emit` (which
    must not block: the route's `emit` is synchronous) for each frame as its deadline comes.

    Returns when `packets` is closed and every packet buffered so far has been played (the
    concealment tail after the last packet is not waited for).
    """
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
