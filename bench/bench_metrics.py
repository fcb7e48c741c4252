"""Cost of one Prometheus scrape (`gateway.metrics.render`) of a gateway with many routes.

Run:  .venv/bin/python bench/bench_metrics.py [--routes 100] [--scrapes 200] [--seconds 10]

Builds (does not run: no sockets) a gateway of N routes `bridge-i`, each with 3 endpoints:
voipbin dial (call i) → argon dial (channel i) and a WAV recorder, the shape of the bridge
routes in bench_routes.py plus a recording. Every endpoint's counters are filled with
plausible values (a few minutes of streaming, a latency histogram over every bucket), so the
numbers are formatted as in production. Then it times `render(gateway)`:

- **render**: the whole scrape in the calling thread (`metrics.render`): the gateway's
  collector, the process / platform / GC collectors, and `generate_latest` (the text);
- **collect only**: the gateway collector alone: snapshot and metric families, no text;
- **snapshot**: copying the counters (`metrics.snapshot`), the only part `render_async`
  runs in the trio thread;
- **text only**: `generate_latest` over families collected once (formatting and encoding).

Then what a scrape costs the routes: a trio task ticking on absolute 20 ms deadlines (as a
route's pacer does) records how late it wakes, for `--seconds` with no scrape, with
`render(gateway)` in the trio thread every 250 ms, and with `await render_async(gateway)`
every 250 ms (text in a worker thread; it competes for the GIL in 5 ms slices). A pacer that
wakes later than the route's jitter allowance (20 ms by default) can find its network sources'
audio still unread in the sockets, and conceals those slots with silence.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.endpoint import LATENCY_BUCKETS

CONFIG_HEAD = """\
services:
  voipbin: {api_url: "http://127.0.0.1:9", token: "bench-token"}
  argon: {api_url: "http://127.0.0.1:9/api/bot", bot_token: "bench-bot", jwt_secret: "bench-jwt-secret-0123456789abcdef"}
routes:
"""
ROUTE = """\
  - name: bridge-{i}
    endpoints:
      - voipbin: {{call_id: call-{i}}}
      - argon: {{space_id: space-{i}, channel_id: channel-{i}}}
      - record: {{path: /tmp/bench-metrics/bridge-{i}.wav, rate: 8000}}
"""


def build(routes: int) -> Gateway:
    text = CONFIG_HEAD + "".join(ROUTE.format(i=i) for i in range(routes))
    gateway = Gateway(GatewayConfig.from_text(text, "<bench>"))
    gateway.build()
    rng = random.Random(1)
    for state in gateway.routes.values():
        state.state = "up"
        state.route.stats.sessions = 1
        state.route.stats.events = rng.randrange(10)
        for endpoint in state.route.endpoints:
            s = endpoint.stats
            frames = rng.randrange(5_000, 15_000)  # a few minutes at 20 ms
            s.frames_in, s.bytes_in = frames, frames * 160
            s.frames_out, s.bytes_out = frames, frames * rng.randrange(60, 161)
            s.late, s.dropped = rng.randrange(50), rng.randrange(20)
            s.buffered_ms, s.connects = rng.choice((0, 20, 40)), rng.randrange(1, 3)
            s.level_dbfs = rng.uniform(-60, -10)
            for _ in range(len(LATENCY_BUCKETS) * 4):  # every bucket gets observations
                s.latency.observe(rng.expovariate(1 / 0.02))
            s.latency.count += frames  # the rest in the first buckets, as in a healthy route
            s.latency.counts[0] += frames
            s.latency.sum += frames * 0.0005
    return gateway


def timed(fn, scrapes: int) -> list[float]:
    fn()  # warm-up (the registry is created on the first render)
    times = []
    gc.collect()
    for _ in range(scrapes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def row(label: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{label:<14} {statistics.median(ms):8.2f} {statistics.fmean(ms):8.2f} {p99:8.2f} {ms[-1]:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each ticker run")
    args = parser.parse_args()

    gateway = build(args.routes)
    body, content_type = metrics.render(gateway)
    families = list(text_string_to_metric_families(body.decode()))
    samples = sum(len(f.samples) for f in families)
    endpoints = sum(len(s.route.endpoints) for s in gateway.routes.values())
    print(f"{args.routes} routes, {endpoints} endpoints: {len(families)} families, {samples} samples, "
          f"{len(body) / 1024:.0f} KiB per scrape ({content_type})")

    collector = metrics.GatewayCollector(gateway)
    collected = list(collector.collect())

    class Frozen:
        def collect(self):
            return collected

    print(f"{'ms per scrape':<14} {'median':>8} {'mean':>8} {'p99':>8} {'max':>8}")
    print(row("render", timed(lambda: metrics.render(gateway), args.scrapes)))
    print(row("collect only", timed(lambda: list(collector.collect()), args.scrapes)))
    print(row("snapshot", timed(lambda: metrics.snapshot(gateway), args.scrapes)))
    print(row("text only", timed(lambda: generate_latest(Frozen()), args.scrapes)))
    print()
    print(f"20 ms ticker, {args.seconds:.0f} s each   wake-up late ms: {'median':>6} {'p99':>6} {'max':>6}   scrapes")
    for mode in ("no scrape", "render", "render_async"):
        late, scrapes = trio.run(ticker, gateway, mode, args.seconds)
        ms = sorted(x * 1000 for x in late)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(f"  {mode:<32} {statistics.median(ms):6.2f} {p99:6.2f} {ms[-1]:6.2f}   {scrapes:7d}")


async def ticker(gateway: Gateway, mode: str, seconds: float) -> tuple[list[float], int]:
    """Wake on absolute 20 ms deadlines for `seconds` while scraping every 250 ms (`mode`);
    return how late each wake-up was and how many scrapes ran."""
    late: list[float] = []
    scrapes = 0

    async def scrape() -> None:
        nonlocal scrapes
        while True:
            await trio.sleep(0.25)
            if mode == "render":
                metrics.render(gateway)
            elif mode == "render_async":
                await metrics.render_async(gateway)
            scrapes += mode != "no scrape"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(scrape)
        t0 = trio.current_time()
        for k in range(1, int(seconds / 0.02) + 1):
            await trio.sleep_until(t0 + k * 0.02)
            late.append(trio.current_time() - (t0 + k * 0.02))
        nursery.cancel_scope.cancel()
    return late, scrapes


if __name__ == "__main__":
    main()
