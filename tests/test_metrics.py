"""`GET /metrics`: what an operator reads from Prometheus about real routes.

Routes run for real: a file played into a recorder under trio's autojump clock (no sockets,
no real waiting), and a file played to a VoIPBIN-compatible client over loopback WebSockets.
The exposition text is parsed back with prometheus_client's own parser, and its numbers are
checked against what the peer received (the recording, the client's frames), not against the
counters the code under test exports.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed

from audio_checks import read_wav, write_wav
from gateway import __version__, metrics
from gateway.adapters.voipbin.wire import Audio, Encapsulation, MediaStreamProtocol
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.demo import DEFAULT_AUDIO
from gateway.endpoint import LATENCY_BUCKETS
from harness import SECRETS, VOIPBIN_TOKEN, start, ws_client

OR105 = DEFAULT_AUDIO  # 8 kHz mono speech, 8.4025 s: 421 frames of 20 ms
OR105_FRAMES = 421
FRAME_BYTES = 320  # 20 ms of PCM16 mono at 8 kHz
ENDPOINT_LABELS = {"route", "endpoint", "kind"}


def parse(body: bytes) -> dict[str, object]:
    """Metric families by name (prometheus_client's parser: counters lose `_total`)."""
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(families, name: str, sample: str | None = None, **labels) -> float:
    """The value of the one sample of family `name` (sample name `sample`, default the family's
    own, `_total` for counters) whose labels include `labels`."""
    family = families[name]
    wanted = sample or (name + "_total" if family.type == "counter" else name)
    found = [s.value for s in family.samples if s.name == wanted and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{wanted} {labels}: {len(found)} samples"
    return found[0]


def histogram(families, name: str, **labels) -> tuple[list[tuple[float, float]], float, float]:
    """(le, cumulative count) in exposition order, _count and _sum of one histogram series."""
    family = families[name]
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples
               if s.name == name + "_bucket" and labels.items() <= s.labels.items()]
    return buckets, value(families, name, name + "_count", **labels), value(families, name, name + "_sum", **labels)


def config(routes: str) -> GatewayConfig:
    return GatewayConfig.from_text(routes, "test.yaml")


FILE_TO_RECORD = """\
routes:
  - name: {name}
    endpoints:
      - file: {{path: "{audio}", rate: 8000}}
      - record: {{name: rec, path: "{out}", rate: 8000}}
"""


async def run_gateway(nursery: trio.Nursery, text: str) -> Gateway:
    gateway = Gateway(config(text))
    await nursery.start(gateway.run)
    return gateway


# -------------------------------------------------------------------------------- a file
async def test_file_to_recorder_counts_what_the_recording_holds(autojump_clock, tmp_path):
    out = tmp_path / "rec.wav"
    async with trio.open_nursery() as nursery:
        gateway = await run_gateway(nursery, FILE_TO_RECORD.format(name="prompt", audio=OR105, out=out))
        state = gateway.routes["prompt"]
        await trio.sleep(2.0)  # mid-file
        body, content_type = metrics.render(gateway)
        mid = parse(body)
        await state.finished.wait()
        end = parse(metrics.render(gateway)[0])
        nursery.cancel_scope.cancel()
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain")
    file_ = {"route": "prompt", "endpoint": "file", "kind": "file"}
    rec = {"route": "prompt", "endpoint": "rec", "kind": "record"}

    # while the file plays: up, and frames flowing both sides
    assert value(mid, "gateway_route_up", route="prompt") == 1
    assert value(mid, "gateway_route_state", route="prompt", state="up") == 1
    assert sum(s.value for s in mid["gateway_route_state"].samples) == 1
    assert value(mid, "gateway_route_sessions", route="prompt") == 1
    assert 90 <= value(mid, "gateway_frames_received", **file_) <= 110  # ~2 s of 20 ms frames
    assert 90 <= value(mid, "gateway_frames_sent", **rec) <= 110
    assert -60 < value(mid, "gateway_audio_level_dbfs", **rec) <= 0  # speech, not silence

    # after the end of file: down, and the counters match the recording sample for sample
    assert value(end, "gateway_route_up", route="prompt") == 0
    assert value(end, "gateway_route_state", route="prompt", state="ended") == 1
    pcm, rate = read_wav(out)
    assert rate == 8000
    sent = value(end, "gateway_frames_sent", **rec)
    assert sent * 160 == len(pcm)
    assert value(end, "gateway_bytes_sent", **rec) == len(pcm) * 2
    assert value(end, "gateway_frames_received", **file_) == OR105_FRAMES == sent
    assert value(end, "gateway_bytes_received", **file_) == OR105_FRAMES * FRAME_BYTES
    assert value(end, "gateway_frames_late", **rec) == 0
    assert value(end, "gateway_frames_dropped", **rec) == 0
    assert value(end, "gateway_buffer_depth_seconds", **rec) == 0

    # the added latency: one observation per packet played from the file, cumulative buckets
    buckets, count, total = histogram(end, "gateway_added_latency_seconds", **rec)
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS, math.inf]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == count == sent
    assert buckets[0][1] == sent  # no real waiting under the mock clock: all within 1 ms
    assert total == pytest.approx(0.0, abs=1e-6)

    # direction: a file only produces audio, a recorder only takes it
    assert {s.labels["endpoint"] for s in end["gateway_frames_sent"].samples} == {"rec"}
    assert {s.labels["endpoint"] for s in end["gateway_frames_received"].samples} == {"file"}
    assert {s.labels["endpoint"] for s in end["gateway_connects"].samples} == {"file", "rec"}
    assert value(end, "gateway_connects", **rec) == 0  # local endpoints never connect


async def test_names_types_help_and_labels(autojump_clock, tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await run_gateway(nursery, FILE_TO_RECORD.format(name="prompt", audio=OR105, out=tmp_path / "r.wav"))
        await trio.sleep(0.5)
        body, _ = metrics.render(gateway)
        nursery.cancel_scope.cancel()
    families = parse(body)
    text = body.decode()
    expected = {
        "counter": ["gateway_frames_received", "gateway_frames_sent", "gateway_bytes_received", "gateway_bytes_sent",
                    "gateway_frames_dropped", "gateway_frames_late", "gateway_connects", "gateway_reconnects", "gateway_peer_errors",
                    "gateway_events_received", "gateway_events_sent", "gateway_route_restarts",
                    "gateway_route_sessions", "gateway_route_events", "gateway_reloads", "gateway_reload_failures"],
        "gauge": ["gateway_buffer_depth_seconds", "gateway_audio_level_dbfs", "gateway_route_up", "gateway_route_state",
                  "gateway_route_state_changed_timestamp_seconds", "gateway_route_info", "gateway_routes",
                  "gateway_start_time_seconds", "gateway_build_info"],
        "histogram": ["gateway_added_latency_seconds"],
    }
    for kind, names in expected.items():
        for name in names:
            exposed = name + "_total" if kind == "counter" else name
            assert families[name].type == kind, name
            assert families[name].documentation, name
            assert f"# HELP {exposed} " in text and f"# TYPE {exposed} {kind}\n" in text
    for name in ("gateway_frames_sent", "gateway_frames_late", "gateway_added_latency_seconds", "gateway_connects"):
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == ENDPOINT_LABELS
    assert "concealed" in families["gateway_frames_late"].documentation
    assert value(families, "gateway_build_info", version=__version__) == 1
    assert value(families, "gateway_routes") == 1
    assert value(families, "gateway_route_info", route="prompt", origin="file") == 1
    assert value(families, "gateway_start_time_seconds") == gateway.started_at
    assert value(families, "gateway_route_state_changed_timestamp_seconds", route="prompt") == gateway.routes["prompt"].since
    assert value(families, "gateway_reloads") == 0 and value(families, "gateway_reload_failures") == 0
    assert "process_cpu_seconds" in families and "python_info" in families
    assert all(name.startswith(("gateway_", "process_", "python_")) for name in families)


async def test_render_async_formats_the_same_instant_off_the_loop(autojump_clock, tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await run_gateway(nursery, FILE_TO_RECORD.format(name="prompt", audio=OR105, out=tmp_path / "r.wav"))
        await trio.sleep(1.0)
        here, _ = metrics.render(gateway)
        there, content_type = await metrics.render_async(gateway)  # the snapshot is taken at once
        nursery.cancel_scope.cancel()
    assert content_type == CONTENT_TYPE_LATEST

    def gateway_samples(body):
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(body.decode())
                if f.name.startswith("gateway_") for s in f.samples]

    assert gateway_samples(here) == gateway_samples(there)
    assert value(parse(there), "gateway_frames_sent", route="prompt", endpoint="rec") > 0


async def test_added_and_removed_routes_appear_and_go(autojump_clock, tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await run_gateway(nursery, FILE_TO_RECORD.format(name="first", audio=OR105, out=tmp_path / "a.wav"))
        extra = config(FILE_TO_RECORD.format(name="extra", audio=OR105, out=tmp_path / "b.wav")).routes[0]
        await gateway.add_route(extra)
        await trio.sleep(0.5)
        both = parse(metrics.render(gateway)[0])
        await gateway.remove_route("extra")
        after = parse(metrics.render(gateway)[0])
        nursery.cancel_scope.cancel()
    assert value(both, "gateway_routes") == 2
    assert value(both, "gateway_route_info", route="extra", origin="api") == 1
    assert value(both, "gateway_route_up", route="extra") == 1
    assert value(after, "gateway_routes") == 1
    assert {s.labels["route"] for f in after.values() for s in f.samples if "route" in s.labels} == {"first"}


# ------------------------------------------------------------------------------ isolation
async def test_two_gateways_in_one_process_keep_their_own_metrics(autojump_clock, tmp_path):
    short = tmp_path / "short.wav"
    pcm, rate = read_wav(OR105)
    write_wav(short, pcm[: rate], rate)  # 1 s: 50 frames
    async with trio.open_nursery() as nursery:
        one = await run_gateway(nursery, FILE_TO_RECORD.format(name="shared", audio=OR105, out=tmp_path / "1.wav"))
        two = await run_gateway(nursery, FILE_TO_RECORD.format(name="shared", audio=short, out=tmp_path / "2.wav")
                                + FILE_TO_RECORD.format(name="only-two", audio=short, out=tmp_path / "3.wav")
                                .replace("routes:\n", ""))
        await one.routes["shared"].finished.wait()
        await two.routes["shared"].finished.wait()
        a, b = parse(metrics.render(one)[0]), parse(metrics.render(two)[0])
        nursery.cancel_scope.cancel()
    assert metrics.registry_for(one) is metrics.registry_for(one) is not metrics.registry_for(two)
    assert value(a, "gateway_frames_sent", route="shared", endpoint="rec") == OR105_FRAMES
    assert value(b, "gateway_frames_sent", route="shared", endpoint="rec") == 50
    assert value(a, "gateway_routes") == 1 and value(b, "gateway_routes") == 2
    assert not [s for s in a["gateway_route_up"].samples if s.labels["route"] == "only-two"]
    # nothing leaks into the process' global registry
    assert b"gateway_" not in generate_latest(REGISTRY)


def test_the_registry_cache_does_not_keep_a_gateway_alive(tmp_path):
    gateway = Gateway(config(FILE_TO_RECORD.format(name="p", audio=OR105, out=tmp_path / "r.wav")))
    gateway.build()
    assert b'gateway_routes 1.0' in metrics.render(gateway)[0]
    ref = weakref.ref(gateway)
    del gateway
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------------ the export mapping
def test_histogram_buckets_are_cumulative_and_counters_derived(tmp_path):
    """Known observations on a built (not running) route: the exact exposition values."""
    gateway = Gateway(config(FILE_TO_RECORD.format(name="p", audio=OR105, out=tmp_path / "r.wav")))
    gateway.build()
    state = gateway.routes["p"]
    rec = state.route.endpoints[1].stats
    for seconds in (0.0005, 0.001, 0.003, 0.03, 0.03, 0.25, 2.0):
        rec.latency.observe(seconds)
    rec.connects, rec.buffered_ms, rec.level_dbfs, rec.late, rec.dropped = 3, 40, -23.5, 7, 2
    state.restarts, state.route.stats.events = 4, 5
    families = parse(metrics.render(gateway)[0])
    labels = {"route": "p", "endpoint": "rec"}
    buckets, count, total = histogram(families, "gateway_added_latency_seconds", **labels)
    assert dict(buckets) == {0.001: 2, 0.0025: 2, 0.005: 3, 0.01: 3, 0.02: 3, 0.04: 5, 0.06: 5, 0.08: 5, 0.1: 5,
                             0.15: 5, 0.2: 5, 0.3: 6, 0.5: 6, 1.0: 6, math.inf: 7}
    assert count == 7 and total == pytest.approx(2.3145)
    assert value(families, "gateway_connects", **labels) == 3
    assert value(families, "gateway_reconnects", **labels) == 2
    assert value(families, "gateway_buffer_depth_seconds", **labels) == 0.04
    assert value(families, "gateway_audio_level_dbfs", **labels) == -23.5
    assert value(families, "gateway_frames_late", **labels) == 7
    assert value(families, "gateway_frames_dropped", **labels) == 2
    assert value(families, "gateway_route_restarts", route="p") == 4
    assert value(families, "gateway_route_events", route="p") == 5
    assert value(families, "gateway_route_state", route="p", state="starting") == 1


# ------------------------------------------------------------------ a call, over WebSockets
CALL = """\
routes:
  - name: call
    endpoints:
      - file: {path: "$clip", rate: 8000}
      - voipbin: {role: listen, call_id: call-1}
  - name: broken-dial           # dials a closed port with its own token: fails, restarts
    endpoints:
      - voipbin: {call_id: call-2, api_url: "http://127.0.0.1:$closed", token: "$dial_token"}
      - record: {path: "$out/never.wav"}
"""
DIAL_TOKEN = "dial-SECRET-3c9e11aa"


async def closed_port() -> int:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    return port


async def test_a_call_counts_what_the_client_received_and_no_secret_shows(speech_clip, tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, clip=speech_clip, out=tmp_path, closed=await closed_port(),
                              dial_token=DIAL_TOKEN)
        call = gateway.routes["call"]
        before = parse(metrics.render(gateway)[0])
        url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/call-1/media_stream"
               f"?encapsulation=rtp&token={VOIPBIN_TOKEN}")
        ws = await ws_client(nursery, url)
        proto = MediaStreamProtocol(Encapsulation.RTP)
        frames = payload = 0
        during = None
        with trio.fail_after(10):
            try:
                while True:
                    for event in proto.receive(await ws.get_message()):
                        if isinstance(event, Audio):
                            frames += 1
                            payload += len(event.payload)
                            if frames == 25:
                                during = parse((await metrics.render_async(gateway))[0])
            except ConnectionClosed:
                pass
            await call.sessions_done.wait()
            while gateway.routes["broken-dial"].restarts < 1:
                await trio.sleep(0.05)
        body, _ = await metrics.render_async(gateway)
        plain, _ = metrics.render(gateway)
        last_error = gateway.routes["broken-dial"].last_error
        nursery.cancel_scope.cancel()
    after = parse(body)
    voipbin = {"route": "call", "endpoint": "voipbin", "kind": "voipbin"}

    assert value(before, "gateway_route_state", route="call", state="waiting") == 1
    assert value(before, "gateway_route_up", route="call") == 0
    assert value(during, "gateway_route_up", route="call") == 1
    assert value(during, "gateway_connects", **voipbin) == 1
    # the session is over: the listen route waits for its next client
    assert value(after, "gateway_route_up", route="call") == 0
    assert value(after, "gateway_route_state", route="call", state="waiting") == 1
    assert value(after, "gateway_route_sessions", route="call") == 1
    # what the client received, frame for frame and byte for byte (u-law: 160 bytes a frame)
    assert value(after, "gateway_frames_sent", **voipbin) == frames
    assert value(after, "gateway_bytes_sent", **voipbin) == payload == frames * 160
    assert value(after, "gateway_frames_received", route="call", endpoint="file") == 100  # 2 s of 20 ms
    late, dropped = value(after, "gateway_frames_late", **voipbin), value(after, "gateway_frames_dropped", **voipbin)
    assert 100 - dropped <= frames <= 100 + late  # all of it, unless a loaded machine made the route drop some
    assert late + dropped <= 5
    assert value(after, "gateway_connects", **voipbin) == 1
    assert value(after, "gateway_reconnects", **voipbin) == 0
    # one latency observation per packet of the file's audio sent (a concealed slot has none)
    buckets, count, total = histogram(after, "gateway_added_latency_seconds", **voipbin)
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == count == frames - late
    assert 0 <= total < count * 0.02

    # the failing dial route: restarting, counted, and its token nowhere in the output
    assert value(after, "gateway_route_restarts", route="broken-dial") >= 1
    assert value(after, "gateway_route_up", route="broken-dial") == 0
    assert value(after, "gateway_connects", route="broken-dial", endpoint="voipbin") == 0
    for text in (body, plain):
        for secret in (*SECRETS, DIAL_TOKEN):
            assert secret.encode() not in text
        assert b"127.0.0.1" not in text and b"token" not in text
    assert last_error  # an error message exists; it is never exported


async def test_rtp_sequence_gaps_are_concealed_and_counted(tmp_path):
    """A VoIPBIN client's real-time RTP stream with 3 packets missing: the gateway conceals them
    (G.711 Appendix I: the tone goes on, fading, instead of 60 ms of silence; the recording keeps
    its length), and `gateway_frames_concealed_total` counts them (a packet that a loaded loop
    delivered after its slot would be concealed too, and counted late as well)."""
    from aiortc.rtp import RtpPacket

    routes = """\
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, call_id: gappy}
      - record: {path: "$out/gappy.wav", rate: 8000}
"""
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, out=tmp_path)
        url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/gappy/media_stream"
               f"?encapsulation=rtp&token={VOIPBIN_TOKEN}")
        ws = await ws_client(nursery, url)
        tone = bytes([0x10, 0x90] * 80)  # loud u-law: not silence
        start_at = trio.current_time()
        for seq in [*range(0, 20), *range(23, 40)]:  # 20, 21, 22 lost
            packet = RtpPacket(payload_type=0, sequence_number=seq, timestamp=seq * 160, ssrc=7, payload=tone)
            await trio.sleep_until(start_at + seq * 0.02)
            await ws.send_message(packet.serialize())
        await trio.sleep(0.01)  # the last packet is in; its slot is not due yet
        families = parse((await metrics.render_async(gateway))[0])
        concealed = value(families, "gateway_frames_concealed", route="call", endpoint="voipbin")
        late = value(families, "gateway_packets_late", route="call", endpoint="voipbin")
        assert 3 <= concealed <= 3 + late, (concealed, late)
        assert value(families, "gateway_frames_received", route="call", endpoint="voipbin") == 37
        await ws.aclose()
        with trio.fail_after(5):
            await gateway.routes["call"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    pcm, rate = read_wav(tmp_path / "gappy.wav")
    level = [float(abs(pcm[i:i + 160].astype(int)).mean()) for i in range(0, len(pcm) - 159, 160)]
    assert len(pcm) / rate >= 0.78, len(pcm) / rate  # 40 frames of 20 ms: the gap kept its time
    first = next(i for i, x in enumerate(level) if x > 1000)  # the recording starts a little before the tone
    tone_level = level[first + 5]
    # the tone; where the 3 packets were lost, the tone concealed: it goes on, fading (not
    # silence); then the tone again, at its own level
    assert all(x > 0.8 * tone_level for x in level[first + 1 : first + 19]), level
    assert level[first + 20] > 0.5 * tone_level and 0 < level[first + 22] < 0.8 * tone_level, level
    assert all(x > 0.8 * tone_level for x in level[first + 24 : first + 39]), level
