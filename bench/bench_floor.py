"""What a two-way phone <-> agent call costs at the least, against what the gateway spends.

Run: .venv/bin/python bench/bench_floor.py [--relays 1,10,50] [--seconds 6]

Two parts, both on one core, no network:

1. **Stages**: the pure CPU of each step a two-way call's 20 ms frame pair takes through the
   gateway's own code (codec chains as the planner builds them, the RTP jitter buffer, G.711
   PLC, RTP parse and build, one sink pacer), timed with `timeit`, no sockets, no trio.
2. **Relay floor**: N two-way relays in one trio process, each direction one task that waits
   for its socket (`trio.lowlevel.wait_readable`), reads a 320-byte message with a raw
   non-blocking `recv`, does a few numpy operations on it (`--work numpy`, the default) and
   writes it on with a raw `send`; a forked feeder sends one message per direction every
   20 ms. The CPU of the relay process per message is what trio and the kernel cost for one
   packet with the least Python around it.

Stages + 2 x relay per message is the floor of a two-way call in this design (Python, trio,
one task per direction); `bench_two_way.py --workers 1` gives what the gateway spends
(bench/README.md, "eighth measurement", has the comparison).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time
import timeit
from collections.abc import Callable

import numpy as np
import trio

from gateway.adapters.voipbin.wire import Codec, Encapsulation, MediaStreamProtocol
from gateway.codecs import AudioFrame, EncodedFrame, plan
from gateway.codecs.formats import PCM16_8K, PCM16_16K, PCMU_8K
from gateway.codecs.jitter import JitterBuffer
from gateway.codecs.plc import G711Plc
from gateway.endpoint import EndpointStats
from gateway.pacer import SinkClock, simulate

MESSAGE = 320  # bytes: 20 ms of PCM16 8 kHz


def _us(fn: Callable[[], object], number: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


class _Source:
    bursty = False
    burst_buffer_ms = 60_000


def stages() -> float:
    """Print each stage's µs per 20 ms frame; return their sum for one frame each way."""
    rng = np.random.default_rng(1)
    pcm8 = (rng.standard_normal((160, 1)) * 3000).astype(np.int16)
    pcm16 = (rng.standard_normal((320, 1)) * 3000).astype(np.int16)
    up, down, decode = plan(PCM16_8K, PCM16_16K), plan(PCM16_16K, PCMU_8K), plan(PCMU_8K, PCM16_8K)
    ulaw = down.process(AudioFrame(pcm16, 16000, 0))[0].payload
    plc = G711Plc()
    jitter = JitterBuffer(60, ptime_ms=20, rate=8000)
    tx = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW, ssrc=1, sequence=0, timestamp=0)
    rx = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW)
    k = [0]

    def jitter_step() -> None:
        k[0] += 1
        now = k[0] * 0.02
        jitter.push(k[0] % 65536, k[0] * 160 % 2**32, pcm8, now)
        jitter.pop(now + 0.06)

    frames = [(0.02 * i + 0.001, 0, AudioFrame(pcm8, 8000, 160 * i)) for i in range(50)]

    def pace_50() -> None:
        clock = SinkClock([_Source()], PCM16_8K, 20, stats=EndpointStats(), clocked=True)  # type: ignore[list-item]
        simulate(clock, [*frames, (1.0, 0, None)])

    rows = [
        ("call -> agent", "RTP parse (MediaStreamProtocol.receive)", _us(lambda: rx.receive(tx.send_audio(ulaw)), 20000)
         - _us(lambda: tx.send_audio(ulaw), 20000)),
        ("call -> agent", "G.711 decode (plan PCMU_8K -> PCM16_8K)",
         _us(lambda: decode.process(EncodedFrame(ulaw, PCMU_8K, 160, 0)), 20000)),
        ("call -> agent", "RTP jitter buffer push + pop", _us(jitter_step, 20000)),
        ("call -> agent", "G.711 PLC (good frame)", _us(lambda: plc.good(pcm8), 20000)),
        ("call -> agent", "resample 8 -> 16 kHz (plan)", _us(lambda: up.process(AudioFrame(pcm8, 8000, 0)), 20000)),
        ("both", "sink pacer, one clocked source (SinkClock, per frame) x 2", 2 * _us(pace_50, 200) / 50),
        ("agent -> call", "resample 16 -> 8 kHz + G.711 encode (plan)", _us(lambda: down.process(AudioFrame(pcm16, 16000, 0)), 20000)),
        ("agent -> call", "RTP build (MediaStreamProtocol.send_audio)", _us(lambda: tx.send_audio(ulaw), 20000)),
    ]
    print("stage costs, µs per 20 ms frame (best of 3):")
    for direction, name, cost in rows:
        print(f"  {cost:7.1f}  {direction:14s} {name}")
    total = sum(cost for _, _, cost in rows)
    print(f"  {total:7.1f}  sum: one frame each way")
    return total


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def relay_floor(relays: int, seconds: float, work: str) -> float:
    """Run the relays (module doc); print and return µs of CPU per relayed message."""
    pairs = []
    for _ in range(2 * relays):  # two directions per relay
        feed_w, feed_r = socket.socketpair()
        out_w, out_r = socket.socketpair()
        for s in (feed_w, feed_r, out_w, out_r):
            s.setblocking(False)
        pairs.append((feed_w, feed_r, out_w, out_r))
    pid = os.fork()
    if pid == 0:  # the feeder: one message per direction every 20 ms, on absolute deadlines
        message, start, k = bytes(MESSAGE), time.monotonic(), 0
        while time.monotonic() - start < seconds + 1:
            k += 1
            time.sleep(max(0.0, start + 0.02 * k - time.monotonic()))
            for feed_w, _, _, out_r in pairs:
                feed_w.send(message)
                try:
                    while out_r.recv(65536):
                        pass
                except BlockingIOError:
                    pass
        os._exit(0)

    def scale(data: bytes) -> bytes:
        pcm = np.frombuffer(data, np.int16).reshape(-1, 1)
        return (pcm.astype(np.float32) * 0.5).astype(np.int16).tobytes()

    process = scale if work == "numpy" else (lambda data: data)
    count = [0]
    result = [0.0]

    async def relay(source: socket.socket, sink: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(source)
            data = source.recv(65536)
            if not data:
                return
            sink.send(process(data))
            count[0] += 1

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for _, feed_r, out_w, _ in pairs:
                nursery.start_soon(relay, feed_r, out_w)
            await trio.sleep(1.0)
            cpu0, n0, t0 = _cpu(), count[0], time.monotonic()
            await trio.sleep(seconds - 1)
            cpu1, n1, t1 = _cpu(), count[0], time.monotonic()
            result[0] = 1e6 * (cpu1 - cpu0) / max(1, n1 - n0)
            print(f"  {relays:4d} relays ({2 * relays:4d} directions): {n1 - n0:6d} messages, {result[0]:6.1f} µs CPU per message, "
                  f"{100 * (cpu1 - cpu0) / (t1 - t0) / relays:5.2f} % of a core per two-way relay")
            nursery.cancel_scope.cancel()

    trio.run(run)
    os.waitpid(pid, 0)
    for group in pairs:
        for s in group:
            s.close()
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relays", default="1,10,50", help="comma-separated relay counts")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--work", choices=("numpy", "none"), default="numpy")
    args = parser.parse_args()
    total = stages()
    print(f"relay floor (trio task per direction, raw recv/send, work: {args.work}):")
    for relays in (int(n) for n in args.relays.split(",")):
        per_message = relay_floor(relays, args.seconds, args.work)
        floor = total + 2 * per_message
        print(f"       floor of a two-way call at {relays}: {floor:6.1f} µs per 20 ms = {floor / 200:.2f} % of a core")


if __name__ == "__main__":
    main()
