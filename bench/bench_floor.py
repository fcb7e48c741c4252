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

`--passes 1,10,50` times the steps of `_Call` (one two-way frame pair, no pacer) for N calls
in one pass every 20 ms, against the same passes back to back: on this host code that runs
once per wake costs several times what `timeit`'s hot loop shows (bench/README.md, "ninth
measurement").

`--mode batched` measures the other design, one pass over many calls: a single trio task owns
an epoll of its own with every source socket registered; every `--tick-ms` it asks that epoll
which sockets are readable (one syscall), reads each, runs the work once over all the
messages of the tick (one numpy pass over the concatenation), and writes each on. Added
latency: up to one tick. `--phases spread` (default) has the feeder send direction i at
i/N of each 20 ms, as independent calls do; `together` sends them all at once (the eighth
measurement's figures), which lets trio serve every task from one epoll wake.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
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


class _Call:
    """One two-way call's per-frame steps, without the pacers: RTP parse, G.711 decode, the
    jitter buffer, PLC, 8 -> 16 kHz one way; 16 -> 8 kHz + G.711 encode, RTP build the other."""

    def __init__(self, pcm8: np.ndarray, pcm16: np.ndarray) -> None:
        self.pcm8, self.pcm16 = pcm8, pcm16
        self.up, self.down, self.decode = plan(PCM16_8K, PCM16_16K), plan(PCM16_16K, PCMU_8K), plan(PCMU_8K, PCM16_8K)
        self.ulaw = self.down.process(AudioFrame(pcm16, 16000, 0))[0].payload
        self.plc = G711Plc()
        self.jitter = JitterBuffer(60, ptime_ms=20, rate=8000)
        self.tx = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW, ssrc=1, sequence=0, timestamp=0)
        self.rx = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW)
        self.k = 0

    def frame_pair(self) -> None:
        self.k += 1
        k, now = self.k, self.k * 0.02
        self.rx.receive(self.tx.send_audio(self.ulaw))
        self.decode.process(EncodedFrame(self.ulaw, PCMU_8K, 160, 0))
        self.jitter.push(k % 65536, k * 160 % 2**32, self.pcm8, now)
        self.jitter.pop(now + 0.06)
        self.plc.good(self.pcm8)
        self.up.process(AudioFrame(self.pcm8, 8000, 0))
        self.down.process(AudioFrame(self.pcm16, 16000, 0))
        self.tx.send_audio(self.ulaw)


def stages() -> float:
    """Print each stage's µs per 20 ms frame; return their sum for one frame each way."""
    rng = np.random.default_rng(1)
    pcm8 = (rng.standard_normal((160, 1)) * 3000).astype(np.int16)
    pcm16 = (rng.standard_normal((320, 1)) * 3000).astype(np.int16)
    call = _Call(pcm8, pcm16)  # the steps' objects, each step timed alone here
    up, down, decode, ulaw = call.up, call.down, call.decode, call.ulaw
    plc, jitter, tx, rx = call.plc, call.jitter, call.tx, call.rx
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


def passes(counts: list[int], rounds: int = 150) -> None:
    """The same steps (`_Call`) for N calls in one pass every 20 ms (a sleep between passes,
    as a process that is woken for its work), CPU per call and frame pair, against the same
    passes back to back (a hot loop, as `timeit` measures the stages)."""
    rng = np.random.default_rng(2)
    pcm8 = (rng.standard_normal((160, 1)) * 3000).astype(np.int16)
    pcm16 = (rng.standard_normal((320, 1)) * 3000).astype(np.int16)
    print("the steps of a two-way frame pair (no pacer), N calls per pass:")
    for n in counts:
        calls = [_Call(pcm8, pcm16) for _ in range(n)]
        for _ in range(50):
            for call in calls:
                call.frame_pair()
        paced = 0.0
        for _ in range(rounds):
            time.sleep(0.02)
            t0 = time.thread_time()
            for call in calls:
                call.frame_pair()
            paced += time.thread_time() - t0
        t0 = time.thread_time()
        for _ in range(rounds):
            for call in calls:
                call.frame_pair()
        hot = time.thread_time() - t0
        print(f"  {n:4d} calls per pass: {1e6 * paced / rounds / n:6.1f} µs per call, one pass every 20 ms; "
              f"{1e6 * hot / rounds / n:6.1f} µs back to back")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def relay_floor(relays: int, seconds: float, work: str, mode: str = "tasks", tick_ms: float = 5.0,
                phases: str = "spread") -> float:
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
        groups = [pairs] if phases == "together" else [[pair] for pair in pairs]
        while time.monotonic() - start < seconds + 1:
            k += 1
            for g, group in enumerate(groups):  # group g at g/len(groups) of the 20 ms
                time.sleep(max(0.0, start + 0.02 * (k + g / len(groups)) - time.monotonic()))
                for feed_w, _, _, out_r in group:
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

    def scale_all(datas: list[bytes]) -> list[bytes]:
        pcm = np.frombuffer(b"".join(datas), np.int16)
        out = (pcm.astype(np.float32) * 0.5).astype(np.int16).tobytes()
        chunks, at = [], 0
        for data in datas:
            chunks.append(out[at : at + len(data)])
            at += len(data)
        return chunks

    process_all = scale_all if work == "numpy" else (lambda datas: datas)

    async def batched() -> None:
        poller = select.epoll()
        route = {}
        for _, feed_r, out_w, _ in pairs:
            poller.register(feed_r.fileno(), select.EPOLLIN)
            route[feed_r.fileno()] = (feed_r, out_w)
        tick, deadline = tick_ms / 1000, trio.current_time()
        try:
            while True:
                deadline += tick
                await trio.sleep_until(deadline)
                ready = poller.poll(0)
                if not ready:
                    continue
                sinks, datas = [], []
                for fd, _ in ready:
                    source, sink = route[fd]
                    datas.append(source.recv(65536))
                    sinks.append(sink)
                for sink, data in zip(sinks, process_all(datas)):
                    sink.send(data)
                count[0] += len(datas)
        finally:
            poller.close()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            if mode == "batched":
                nursery.start_soon(batched)
            else:
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
    parser.add_argument("--mode", choices=("tasks", "batched"), default="tasks",
                        help="tasks: one trio task per direction; batched: one task, one epoll, one pass per tick")
    parser.add_argument("--tick-ms", type=float, default=5.0, help="batched: the pass period (ms)")
    parser.add_argument("--phases", choices=("spread", "together"), default="spread",
                        help="when the feeder sends each direction's message within the 20 ms")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage costs (relay figures only)")
    parser.add_argument("--passes", default="", metavar="N,N,...",
                        help="also time the steps for N calls in one pass every 20 ms (e.g. 1,10,50)")
    args = parser.parse_args()
    if args.passes:
        passes([int(n) for n in args.passes.split(",")])
    total = 0.0 if args.no_stages else stages()
    what = ("trio task per direction" if args.mode == "tasks"
            else f"one task, own epoll, one pass every {args.tick_ms:g} ms")
    print(f"relay floor ({what}, raw recv/send, work: {args.work}, phases: {args.phases}):")
    for relays in (int(n) for n in args.relays.split(",")):
        per_message = relay_floor(relays, args.seconds, args.work, args.mode, args.tick_ms, args.phases)
        floor = total + 2 * per_message
        print(f"       floor of a two-way call at {relays}: {floor:6.1f} µs per 20 ms = {floor / 200:.2f} % of a core")


if __name__ == "__main__":
    main()
