"""No caller speech is lost while the far side comes up: the issue's start-up case on the real
adapters, over real loopback sockets, in real time.

A VoIPBIN-compatible call (our voipbin listen role, playing 16.4 s of recorded telephone speech
with pauses: or105.wav then or109.wav) is bridged by the route under test (voipbin dial → argon
dial with `ready_wait_ms: 1000`) into an Argon-like ingress that never sends `ready` (as
tests/test_dial_edges.py's `silent_ingress`, here keeping each packet's arrival time). The
bridge's Argon side is up only after that second, so the caller's first second waits in the
route. Checked, as the issue's done-when says:

(a) no speech lost: the Opus packets the ingress got, decoded, hold every speech block of the
    source (each at its own lag: pauses got shorter), in order, from its very first block, and
    every frame the bridge took from the call went out but the skipped pause packets;
(b) the added latency (the Argon endpoint's `stats.latency`, counted from 10 s after the
    route came up to its end) is back under 20 ms p99, but for the packets of the 20 ms
    slices in which another process kept this one off the cores (`harness.Starvation`);
(c) the pacer won the second back by skipping pause packets and dropped nothing.

In real time the pacer's histogram is measured against the arrival of each packet's audio at
the pacer, so the loop's own scheduling noise (a loaded CI machine) counts only where it delays
a packet beyond its deadline.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from audio_checks import read_wav, write_wav
from conftest import ASSETS
from gateway.adapters.argon.dial import DEFAULT_COMPLEXITY, PUBLISH_MIN_PACKET
from gateway.codecs import OpusDecoder, plan
from gateway.codecs.formats import OPUS_48K, PCM16_8K, AudioFrame, EncodedFrame
from gateway.endpoint import LATENCY_BUCKETS
from gateway.server import HttpResponse, HttpServer, serve_http
from harness import Starvation, start
from test_route_startup import speech_blocks_found

# CPU-heavy and real time: run on one xdist worker, one such file after another (dev.sh --dist loadgroup)
pytestmark = pytest.mark.xdist_group("realtime")


RATE = 8000
READY_WAIT_S = 1.0
SNAPSHOT_AFTER_S = 10.0  # "latency back under 20 ms p99 within 10 s" of the route coming up

BRIDGE = """
routes:
  - name: phone                  # the VoIPBIN-compatible call: the caller speaks from the start
    endpoints:
      - voipbin: {role: listen, name: call, call_id: phone-1}
      - file: {name: caller, path: "$speech", rate: 8000}
  - name: bridge                 # under test
    endpoints:
      - voipbin: {call_id: phone-1, encapsulation: sln}
      - argon: {space_id: s, channel_id: c, api_url: "http://127.0.0.1:$token_port/api/bot", ready_wait_ms: 1000,
                opus_fec: false}
"""
# (opus_fec: false: with in-band FEC libopus moves between CELT and hybrid coding with the
# content, which shifts the 10 ms speech blocks near the pause threshold by tens of ms; the
# speech-duration check below is about the pacer's skipping, compared with the same chain)


class SilentIngress:
    """An Argon-like ingress that never sends {"status":"ready"}: it takes packets and keeps
    (trio time, packet) of each; StreamToken (on a stub HttpServer) points at it."""

    def __init__(self) -> None:
        self.packets: list[tuple[float, bytes]] = []
        self.paths: list[str] = []
        self.accepted_at: list[float] = []  # trio time of each WebSocket accept: the dial's ready wait starts after it
        self.ws_port = self.http_port = 0
        self.closed = trio.Event()

    async def serve(self, nursery: trio.Nursery) -> None:
        async def handler(request) -> None:
            self.paths.append(request.path)
            ws = await request.accept()
            self.accepted_at.append(trio.current_time())
            try:
                while True:
                    message = await ws.get_message()
                    self.packets.append((trio.current_time(), message))
            except ConnectionClosed:
                pass
            finally:
                self.closed.set()

        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        self.ws_port = server.port
        app = HttpServer()

        async def token(request):
            return HttpResponse.json(200, {"token": "tok", "ingressUrl": f"ws://127.0.0.1:{self.ws_port}", "roomName": "s/c"})

        app.add("POST", "/api/bot/IVoice/v1/StreamToken", token)
        self.http_port = await nursery.start(serve_http, app, "127.0.0.1", 0)


def speech_blocks(pcm: np.ndarray, rate: int, quiet_dbfs: float = -40.0) -> int:
    """How many 10 ms blocks are at `quiet_dbfs` or louder (a count: compared exactly)."""
    x = pcm.astype(np.float64)
    n = rate // 100
    blocks = x[: len(x) // n * n].reshape(-1, n)
    return int((10 * np.log10(np.mean(blocks**2, axis=1) / 32768.0**2 + 1e-20) >= quiet_dbfs).sum())


def through_opus(speech: np.ndarray) -> np.ndarray:
    """`speech` (8 kHz) through the chain the bridge uses for its Argon side (Opus at the
    endpoint's settings, fed at 8 kHz: opus_input_rate auto, the default; decoded), nothing
    skipped: what the ingress would get from a far side that was up at once."""
    encoder = plan(PCM16_8K, OPUS_48K, ptime_ms=20, opus_bitrate=None, opus_complexity=DEFAULT_COMPLEXITY,
                   opus_fec=False, opus_min_packet_bytes=PUBLISH_MIN_PACKET)  # as configured above
    assert encoder.stages[-1].input_rate == 8000
    decoder = OpusDecoder(1)
    out = []
    for k in range(0, len(speech), 160):
        chunk = np.zeros((160, 1), np.int16)
        piece = speech[k : k + 160]
        chunk[: len(piece), 0] = piece
        out += [decoder.process(packet)[0].pcm[:, 0] for packet in encoder.process(AudioFrame(chunk, RATE, k))]
    return np.concatenate(out)


async def test_no_speech_lost_while_argon_waits_for_ready_and_latency_comes_back(tmp_path):
    speech = np.concatenate([read_wav(ASSETS / name)[0][:, 0] for name in ("or105.wav", "or109.wav")])
    write_wav(tmp_path / "speech.wav", speech, RATE)
    ingress = SilentIngress()
    async with trio.open_nursery() as nursery:
        await ingress.serve(nursery)
        gateway = await start(nursery, BRIDGE, speech=str(tmp_path / "speech.wav"), token_port=ingress.http_port)
        bridge = gateway.routes["bridge"]
        call, argon = bridge.route.endpoints
        with trio.fail_after(15):
            await bridge.route.up.wait()
        up_at = bridge.route.stats.started_at
        await trio.sleep_until(up_at + SNAPSHOT_AFTER_S)
        before = list(argon.stats.latency.counts)
        late_bucket = LATENCY_BUCKETS.index(0.020) + 1  # the first bucket above 20 ms
        starvation = Starvation(lambda: sum(argon.stats.latency.counts[late_bucket:]))  # a loaded machine
        nursery.start_soon(starvation.run)
        with trio.fail_after(len(speech) / RATE + 15):
            await bridge.finished.wait()
            await ingress.closed.wait()
        nursery.cancel_scope.cancel()
    after = [a - b for a, b in zip(argon.stats.latency.counts, before)]
    stats = {"call": call.stats.as_dict(), "argon": argon.stats.as_dict(), "latency after 10 s": after,
             "starved 20 ms slices": starvation.slices, "excused": starvation.excused}
    assert bridge.route.stats.ended_by.startswith("voipbin: closed"), bridge.route.stats.ended_by
    assert ingress.paths[0].startswith("/audio/connect?token=tok&stereo=false&frame_duration_ms=20")
    times = [t for t, _ in ingress.packets]
    packets = [p for _, p in ingress.packets]
    assert all(isinstance(p, bytes) and len(p) > 2 for p in packets)

    # the bridge's Argon side came up ready_wait_ms after its WebSocket was accepted, and the
    # call, which spoke from the start, was up by then: its first second (but for how much
    # later the bridge's voipbin side connected than its argon side, both dialled at once:
    # up to tens of ms on a loaded machine) waited in the route; the first packet went out at
    # once, and every frame the call sent reached the bridge
    phone = gateway.routes["phone"].route
    phone_call = phone.endpoints[0]
    (accepted_at,) = ingress.accepted_at
    assert READY_WAIT_S - 0.001 <= up_at - accepted_at <= READY_WAIT_S + 0.5, (up_at - accepted_at)
    assert READY_WAIT_S - 0.5 <= up_at - phone.stats.started_at <= READY_WAIT_S + 0.5, (up_at - phone.stats.started_at)
    assert times[0] - up_at < 0.1, (times[0] - up_at, stats)
    assert call.stats.frames_in == phone_call.stats.frames_out, (phone_call.stats.as_dict(), stats)

    # (a) no speech lost: every 20 ms the bridge took from the call went out, but the pauses skipped
    # (and the silence of a slot concealed when audio was late; the last packet holds the
    # resampler's tail)
    expected = call.stats.frames_in - argon.stats.skipped + argon.stats.late
    assert expected <= len(packets) <= expected + 1, (len(packets), stats)
    decoder = OpusDecoder(1)
    received = np.concatenate([decoder.process(EncodedFrame(p, OPUS_48K, 960, 0))[0].pcm[:, 0] for p in packets])
    scores, positions = speech_blocks_found(speech, RATE, received, 48000)
    assert len(scores) >= 20 and min(scores) >= 0.9, (np.round(scores, 2), stats)
    assert positions == sorted(positions), positions
    # ...from its very first block (speech_blocks_found scores every speech block of the source,
    # the first included, each within 1.5 s before to 0.5 s after its own place), and the speech
    # lasts as long as it does through the same chain with nothing skipped (10 ms blocks of
    # speech): the pauses got shorter, the speech did not
    # (within 2 blocks, 20 ms; counted in blocks: 0.02 s as a difference of two sums / 100 read
    # 0.020000000000000462 in CI)
    assert abs(speech_blocks(received, 48000) - speech_blocks(through_opus(speech), 48000)) <= 2, stats

    # (c) the second was won back in pauses: packets of pause skipped, none dropped
    assert argon.stats.skipped > 0 and argon.stats.dropped == 0, stats
    # all of the start-up backlog (and of any late audio) but less than a packet or two, which
    # the clock shift takes
    owed = up_at - phone.stats.started_at + argon.stats.late * 0.02
    assert owed - 0.1 <= argon.stats.skipped * 0.02 <= owed + 0.02, (owed, stats)

    # (b) the added latency from 10 s after the route came up to its end: p99 <= 20 ms, but
    # for the packets sent over 20 ms late in a 20 ms slice in which this thread waited 5 ms
    # or more for a core, or in the slice after one (another process had it: 2 spinners
    # beside the suite, 3 packets in 20-40 ms of 274). Calm none is excused: p99 <= 20 ms
    assert sum(after) >= 200, stats
    over = sum(after[late_bucket:])
    assert over - starvation.excused <= 0.01 * sum(after), stats
