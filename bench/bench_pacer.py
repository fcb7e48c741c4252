"""CPU per frame of a route's pacer path, in one process under trio's MockClock (no sockets):
a source emitting 20 ms PCM frames on time into a sink that records them, 3,000 frames, best of
three; unclocked and clocked (`Endpoint.clocked`) sources.

Run:  .venv/bin/python bench/bench_pacer.py

What it measures: the route's emit → sink queue → pacer (`gateway.pacer.SinkClock` and its
trio driver) → sink.send path plus trio's scheduling of the two tasks and MockClock's jumps;
compare runs on the same machine, not with the network benchmarks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from gateway.route import Route  # noqa: E402
from test_route_pacing import Clocked, Sink, Source, ramp_frame  # noqa: E402

FRAMES = 3000


async def one_route(cls: type[Source], n: int) -> None:
    frames = [ramp_frame(k) for k in range(n)]
    source, sink = cls("src", [k * 0.02 for k in range(n)], frames), Sink("sink")
    route = Route("t", [source, sink])
    async with trio.open_nursery() as nursery:
        await nursery.start(route.run)


def main() -> None:
    for cls in (Source, Clocked):
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            trio.run(one_route, cls, FRAMES, clock=trio.testing.MockClock(autojump_threshold=0))
            best = min(best, time.process_time() - t)
        print(f"{cls.__name__.lower():8} {best / FRAMES * 1e6:7.1f} µs CPU per frame")


if __name__ == "__main__":
    main()
