"""bench/impair.py: the impairment schedule does what was asked (loss rates, burst lengths,
swap fraction, jitter spread, duplicates), repeatably; the proxy applies it on loopback.

The statistical checks are seeded (the same draws on every run, so they cannot flake) and
their bounds are at least 4 standard errors wide for the sample sizes used, so they hold for
any seed: a wrong model (bursts of the wrong length, a swap rate off by p^2) fails them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url, serve_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from impair import (  # noqa: E402
    GilbertElliott,
    Impairment,
    ImpairmentSchedule,
    ImpairProxy,
    ReleaseQueue,
    require_loopback,
)

N = 200_000  # packets per statistical check (~1 h of 20 ms packets)
PTIME = 0.020  # s between offered packets


def run(impairment: Impairment, n: int = N) -> tuple[ImpairmentSchedule, ReleaseQueue, list, list[bool]]:
    """Offer packets 0..n-1 every 20 ms; return the schedule, the queue, the deliveries in
    order (Release objects) and, per packet, whether it was lost."""
    schedule, queue = ImpairmentSchedule(impairment), ReleaseQueue()
    delivered = []
    for i in range(n):
        queue.add(schedule.push(i, i * PTIME))
        delivered += queue.pop_due(i * PTIME)
    queue.add(schedule.flush(n * PTIME))
    delivered += queue.pop_due(float("inf"))
    seen = {r.index for r in delivered}
    return schedule, queue, delivered, [i not in seen for i in range(n)]


def bursts(lost: list[bool]) -> list[int]:
    """Lengths of the runs of consecutive lost packets."""
    out, run_length = [], 0
    for x in lost:
        if x:
            run_length += 1
        elif run_length:
            out.append(run_length)
            run_length = 0
    if run_length:
        out.append(run_length)
    return out


def test_random_loss_rate_and_no_bursts():
    schedule, queue, delivered, lost = run(Impairment(loss_pct=5.0, seed=1))
    rate = sum(lost) / N
    # sd of the rate: sqrt(0.05 x 0.95 / N) = 0.00049; bound 0.0025 = 5 sd
    assert 0.0475 < rate < 0.0525
    assert schedule.dropped == sum(lost) and len(delivered) == N - sum(lost)
    # independent losses: mean run length 1 / (1 - p) = 1.053 (sd of the mean ~0.0024)
    mean_burst = sum(lost) / len(bursts(lost))
    assert 1.03 < mean_burst < 1.08
    assert schedule.dropped / schedule.bursts == pytest.approx(mean_burst)
    assert [r.index for r in delivered] == sorted(r.index for r in delivered)  # no reordering
    assert queue.out_of_order == 0


def test_gilbert_elliott_mean_loss_and_mean_burst():
    imp = Impairment(burst_loss_pct=15.0, mean_burst=3.0, seed=2)
    schedule, queue, delivered, lost = run(imp)
    rate = sum(lost) / N
    runs = bursts(lost)
    # Correlated losses: sd of the rate ~ sqrt(L(1-L)/N x (1+rho)/(1-rho)), rho = 1-p-r = 0.61:
    # 0.0016; bound 0.01 = 6 sd. ~10 000 bursts of geometric length, sd 2.45: sd of the mean
    # 0.025; bound 0.15 = 6 sd.
    assert 0.14 < rate < 0.16
    assert 2.85 < sum(runs) / len(runs) < 3.15
    # geometric burst lengths: P(length 1) = r = 1/3 (sd 0.005)
    assert 0.31 < sum(1 for b in runs if b == 1) / len(runs) < 0.36
    assert schedule.bursts == len(runs)
    # the same loss rate without bursts gives runs of ~1.18 (1 / (1 - 0.15)): the model matters
    _, _, _, lost_random = run(Impairment(loss_pct=15.0, seed=2), 50_000)
    random_runs = bursts(lost_random)
    assert sum(random_runs) / len(random_runs) < 1.3


def test_gilbert_elliott_parameters():
    chain = GilbertElliott.from_mean(0.15, 3.0)
    assert chain.r == pytest.approx(1 / 3)
    assert chain.p == pytest.approx((1 / 3) * 0.15 / 0.85)
    assert chain.mean_loss == pytest.approx(0.15)
    with pytest.raises(ValueError, match="mean burst length must be >= 1 packet"):
        GilbertElliott.from_mean(0.5, 0.99)
    with pytest.raises(ValueError, match="no Gilbert chain has 60% loss in bursts of 1: the mean burst must be >= 1.50"):
        GilbertElliott.from_mean(0.6, 1.0)
    with pytest.raises(ValueError, match="burst_loss_pct"):
        Impairment(burst_loss_pct=100.0)


def test_reordering_swaps_adjacent_packets_at_the_asked_fraction():
    schedule, queue, delivered, lost = run(Impairment(reorder_pct=1.0, seed=3))
    order = [r.index for r in delivered]
    assert sorted(order) == list(range(N)) and not any(lost)  # nothing lost, nothing doubled
    late = [k for k in range(1, N) if order[k] < order[k - 1]]
    # every out-of-order packet is i delivered right after i + 1: an adjacent swap
    assert all(order[k - 1] == order[k] + 1 for k in late)
    assert len(late) == schedule.swapped == queue.out_of_order
    # sd of the fraction: sqrt(0.01 x 0.99 / N) = 0.00022; bound 0.001 = 4.5 sd
    assert 0.009 < schedule.swapped / N < 0.011
    # a swap takes one packet out of place, never a run: no two consecutive packets are late
    assert all(b - a > 1 for a, b in zip(late, late[1:]))


def test_jitter_uniform_spread_and_out_of_order_share():
    schedule, queue, delivered, lost = run(Impairment(jitter_ms=30.0, jitter="uniform", seed=4), 100_000)
    delays = [r.at - r.index * PTIME for r in delivered]
    assert min(delays) >= 0.0 and max(delays) <= 0.060 + 1e-9  # 30 ms +- 30 ms
    assert 0.0295 < sum(delays) / len(delays) < 0.0305  # mean 30 ms (sd of the mean 0.055 ms)
    assert min(delays) < 0.001 and max(delays) > 0.059  # the whole range is used
    # A packet arrives after a later one when its delay exceeds that one's by the spacing:
    # for uniform [0, 60] ms at 20 ms spacing, P = 1 - 45.19/60 = 0.2469 (module doc).
    assert 0.240 < queue.out_of_order / 100_000 < 0.254
    assert sorted(r.index for r in delivered) == list(range(100_000))


def test_jitter_normal_is_clipped_to_the_range():
    schedule, queue, delivered, _ = run(Impairment(jitter_ms=30.0, jitter="normal", seed=5), 50_000)
    delays = [r.at - r.index * PTIME for r in delivered]
    assert min(delays) >= 0.0 and max(delays) <= 0.060 + 1e-9
    spread = sum((d - 0.030) ** 2 for d in delays) / len(delays)
    assert 0.012 < spread**0.5 < 0.015  # sigma J/2 = 15 ms, a little less once clipped at 2 sigma
    assert queue.out_of_order < 0.2 * 50_000  # narrower than uniform: fewer overtakes


def test_duplicates_follow_their_original():
    schedule, queue, delivered, lost = run(Impairment(duplicate_pct=2.0, seed=6), 100_000)
    order = [r.index for r in delivered]
    copies = len(order) - len(set(order))
    assert copies == schedule.duplicated
    assert 0.018 < copies / 100_000 < 0.022  # sd 0.00044
    for k in range(1, len(order)):
        assert order[k] >= order[k - 1]  # a copy right after its original: nothing out of order
    assert queue.out_of_order == 0


def test_seeded_and_independent_streams():
    def lost_of(imp: Impairment) -> list[bool]:
        return run(imp, 5_000)[3]

    a = lost_of(Impairment(loss_pct=5.0, seed=7))
    assert a == lost_of(Impairment(loss_pct=5.0, seed=7))  # repeatable
    assert a != lost_of(Impairment(loss_pct=5.0, seed=8))
    # adding jitter, swaps or duplicates does not move the losses (one random stream each)
    assert a == lost_of(Impairment(loss_pct=5.0, jitter_ms=30.0, reorder_pct=1.0, duplicate_pct=1.0, seed=7))


def test_a_held_packet_whose_successor_is_lost_still_arrives():
    imp = Impairment(loss_pct=30.0, reorder_pct=20.0, seed=9)
    schedule, queue, delivered, lost = run(imp, 20_000)
    assert schedule.swapped > 0
    assert len(delivered) == 20_000 - schedule.dropped  # every packet not dropped is delivered once


def test_only_loopback():
    require_loopback("127.0.0.1", "x")
    require_loopback("::1", "x")
    require_loopback("localhost", "x")
    with pytest.raises(ValueError, match="must be a loopback address"):
        require_loopback("10.0.0.1", "the upstream")
    with pytest.raises(ValueError, match="loopback"):
        ImpairProxy("ws://192.168.1.1:9000", Impairment())


async def test_proxy_applies_the_schedule_on_loopback():
    """An upstream sends 400 numbered messages through the proxy (loss and swaps); the client
    receives exactly what the same schedule decides, in its order; the client's messages reach
    the upstream untouched, and the query string reaches the upstream too."""
    imp = Impairment(loss_pct=10.0, reorder_pct=5.0, seed=11)
    got_up: list[bytes] = []
    paths: list[str] = []

    async def upstream(request):
        paths.append(request.path)
        if "token=bad" in request.path:
            await request.reject(401, body=b"token rejected")
            return
        ws = await request.accept()
        for i in range(400):
            await ws.send_message(i.to_bytes(2, "big"))
        got_up.append(await ws.get_message())
        await ws.aclose(1000)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, upstream, "127.0.0.1", 0, None)
            proxy = ImpairProxy(f"ws://127.0.0.1:{server.port}", imp)
            port = await nursery.start(proxy.serve)
            received = []
            async with open_websocket_url(f"ws://127.0.0.1:{port}/v1.0/calls/x/media_stream?token=ok") as ws:
                await ws.send_message(b"hello")
                try:
                    while True:
                        received.append(int.from_bytes(await ws.get_message(), "big"))
                except ConnectionClosed as closed:
                    assert closed.reason.code == 1000
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/v1.0/calls/x/media_stream?token=bad"):
                    pass
            nursery.cancel_scope.cancel()
    _, _, expected, _ = run(imp, 400)
    assert received == [r.index for r in expected]
    assert len(received) < 400 and received != sorted(received)  # some lost, some swapped
    assert got_up == [b"hello"]
    assert paths[0] == "/v1.0/calls/x/media_stream?token=ok"
    assert refused.value.status_code == 401 and refused.value.body == b"token rejected"
    assert proxy.links[0].path == "/v1.0/calls/x/media_stream"  # no query (tokens) kept
