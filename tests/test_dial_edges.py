"""Dial-side edges: VoIPBIN's 1006 close is the call ending (no retry loop); conferences; an
Argon ingress that never says ready; the bare ingress URL of the seed document."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import trio
import wsproto
from wsproto.events import AcceptConnection, BytesMessage, Request

from audio_checks import read_wav
from gateway.logs import redact
from gateway.metrics import render
from harness import BOT_TOKEN, JWT_SECRET, VOIPBIN_TOKEN, start
from test_argon_errors import CHANNEL, SPACE


async def abrupt_voipbin_server(listener_port_box, frames: list[bytes], paths: list[str], *, task_status=trio.TASK_STATUS_IGNORED):
    """A media-stream server that sends `frames` then drops TCP without a close frame (what
    VoIPBIN does at hangup). Written on wsproto directly to control the exact bytes."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener_port_box.append(listeners[0].socket.getsockname()[1])
    task_status.started()
    stream = await listeners[0].accept()
    conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    while True:
        conn.receive_data(await stream.receive_some(65536))
        events = list(conn.events())
        if any(isinstance(e, Request) for e in events):
            paths.append(next(e for e in events if isinstance(e, Request)).target)
            await stream.send_all(conn.send(AcceptConnection()))
            break
    t0 = trio.current_time()
    for k, frame in enumerate(frames):
        await trio.sleep_until(t0 + k * 0.02)
        await stream.send_all(conn.send(BytesMessage(data=frame)))
    await stream.aclose()  # TCP close, no WebSocket close frame: 1006 on the other side
    await listeners[0].aclose()


def rtp(seq: int, payload: bytes) -> bytes:
    return struct.pack("!BBHII", 0x80, 96, seq, seq * 160, 0x1234) + payload


def tone_packets() -> list[bytes]:
    """1 s of a 440 Hz tone as 50 RTP packets of u-law (PT 96), 20 ms each."""
    import audioop

    tone = (np.sin(2 * np.pi * 440 * np.arange(8000) / 8000) * 8000).astype(np.int16)
    ulaw = audioop.lin2ulaw(tone.tobytes(), 2)
    return [rtp(k, ulaw[k * 160 : (k + 1) * 160]) for k in range(50)]


async def test_voipbin_1006_ends_the_call_without_retrying(tmp_path):
    frames = tone_packets()
    box, paths = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(abrupt_voipbin_server, box, frames, paths)
        gateway = await start(nursery, """\
routes:
  - name: call
    endpoints:
      - voipbin: {conference_id: conf-7, api_url: "http://127.0.0.1:%d"}
      - record: {path: "$out/call.wav", rate: 8000}
""" % box[0], out=tmp_path)
        state = gateway.routes["call"]
        with trio.fail_after(10):
            await state.finished.wait()
        nursery.cancel_scope.cancel()
    assert state.state == "ended" and state.restarts == 0
    assert state.route.stats.ended_by == "voipbin: closed without a close frame (1006)"
    assert paths == [f"/v1.0/conferences/conf-7/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}"]
    pcm, rate = read_wav(tmp_path / "call.wav")
    assert rate == 8000 and abs(len(pcm) / rate - 1.0) < 0.03
    spectrum = np.abs(np.fft.rfft(pcm[:, 0].astype(float)))
    assert abs(np.argmax(spectrum) * rate / len(pcm) - 440) < 5


async def silent_ingress(port_box, received: list, paths: list, *, task_status=trio.TASK_STATUS_IGNORED):
    """An Argon-like ingress that never sends {"status":"ready"}: just takes packets."""
    from trio_websocket import ConnectionClosed, serve_websocket

    async def handler(request):
        paths.append(request.path)
        ws = await request.accept()
        try:
            while True:
                received.append(await ws.get_message())
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        port_box.append(server.port)
        task_status.started()


@pytest.mark.parametrize("ingress_path", ["/audio/connect", ""])
async def test_ingress_without_ready_message_still_streams(tmp_path, speech_clip, ingress_path):
    from gateway.server import HttpResponse, HttpServer, serve_http

    box, received, paths = [], [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(silent_ingress, box, received, paths)
        app = HttpServer()

        async def token(request):
            return HttpResponse.json(200, {"token": "tok", "ingressUrl": f"ws://127.0.0.1:{box[0]}", "roomName": "r"})

        app.add("POST", "/api/bot/IVoice/v1/StreamToken", token)
        http_port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        gateway = await start(nursery, """\
routes:
  - name: play
    endpoints:
      - file: {path: "$clip"}
      - argon: {space_id: s, channel_id: c, api_url: "http://127.0.0.1:%d/api/bot", ingress_path: "%s", ready_wait_ms: 200}
""" % (http_port, ingress_path), clip=speech_clip)
        with trio.fail_after(10):
            await gateway.routes["play"].finished.wait()
        nursery.cancel_scope.cancel()
    assert paths[0].startswith(f"{ingress_path or '/'}?token=tok&stereo=false&frame_duration_ms=20")
    assert len(received) == pytest.approx(100, abs=2)  # 2 s of 20 ms packets, none lost
    assert all(isinstance(p, bytes) and len(p) > 2 for p in received)


async def test_argon_listen_serves_the_bare_ingress_url(tmp_path, speech_clip):
    """ingress_path "" (the seed document's bare URL) against the gateway's own listen role."""
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, """\
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/channel.wav"}
  - name: play
    endpoints:
      - file: {path: "$clip"}
      - argon: {space_id: %s, channel_id: %s, ingress_path: ""}
""" % (SPACE, CHANNEL, SPACE, CHANNEL), clip=speech_clip, out=tmp_path)
        with trio.fail_after(10):
            await gateway.routes["play"].finished.wait()
            await gateway.routes["channel"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    channel = gateway.routes["channel"].route.endpoints[0]
    assert channel.stats.frames_in == pytest.approx(100, abs=2)


def test_redact_hides_tokens_jwts_and_authorization():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZw"
    line = (f"Connecting to ws://h:1/audio/connect?token={jwt}&stereo=false "
            f"wss://api/v1.0/calls/x/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN} "
            f"headers {{'Authorization': 'Bot {BOT_TOKEN}'}} secret={JWT_SECRET}")
    cleaned = redact(line)
    for secret in (jwt, VOIPBIN_TOKEN, BOT_TOKEN, JWT_SECRET):
        assert secret not in cleaned
    assert "stereo=false" in cleaned and "encapsulation=rtp" in cleaned


async def test_a_refused_upgrade_waits_for_its_retry_after_then_the_call_streams(autojump_clock, tmp_path, caplog):
    """A VoIPBIN media server at capacity answers the first two upgrades with 503 and
    Retry-After: 3 (as the gateway's own listen roles do when set-ups crowd). The route waits
    at least the 3 s it was asked (longer than its own 1 s, then 2 s, backoff), at most 25 %
    more, and streams once it is let in. On the virtual clock."""
    from trio_websocket import serve_websocket

    attempts: list[float] = []
    packets = tone_packets()

    async def media(request):
        attempts.append(trio.current_time())
        if len(attempts) <= 2:
            await request.reject(503, extra_headers=[(b"retry-after", b"3")], body=b'{"error": "at capacity"}')
            return
        ws = await request.accept()
        t0 = trio.current_time()
        for k, packet in enumerate(packets):  # 1 s of u-law, then the call ends
            await trio.sleep_until(t0 + k * 0.02)
            await ws.send_message(packet)
        await ws.aclose()

    caplog.set_level("INFO", logger="gateway")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, media, "127.0.0.1", 0, None)
        gateway = await start(nursery, """\
routes:
  - name: call
    endpoints:
      - voipbin: {call_id: c-1, api_url: "http://127.0.0.1:%d"}
      - record: {path: "$out/call.wav", rate: 8000}
""" % server.port, out=tmp_path)
        state = gateway.routes["call"]
        with trio.fail_after(30):
            await state.finished.wait()
        nursery.cancel_scope.cancel()
    waits = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) == 3 and state.restarts == 2
    assert all(3.0 <= wait <= 3.0 * 1.25 + 0.1 for wait in waits), waits
    asked = [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]
    assert len(asked) == 2 and all("the service asked for 3 s" in line for line in asked), asked
    assert caplog.text.count("refused the connection: upgrade refused with HTTP 503 (HTTP 503; at capacity)") == 2
    pcm, rate = read_wav(tmp_path / "call.wav")  # the third run of the route: the two refused recorded nothing
    assert not (tmp_path / "call-2.wav").exists() and not (tmp_path / "call-3.wav").exists()
    assert abs(len(pcm) / rate - 1.0) < 0.03  # the whole second, once let in


def test_a_restart_waits_the_longer_of_backoff_and_retry_after_spread_by_up_to_a_quarter():
    from gateway.daemon import restart_delay

    assert restart_delay(1.0, None, 0.0) == 1.0
    assert restart_delay(1.0, 3.0, 0.0) == 3.0  # never sooner than the service asked
    assert restart_delay(8.0, 3.0, 0.5) == pytest.approx(9.0)
    assert restart_delay(2.0, None, 0.999) == pytest.approx(2.4995)
    draws = [restart_delay(1.0, None, k / 100) for k in range(100)]  # a crowd refused at once
    assert min(draws) == 1.0 and max(draws) < 1.25 and len(set(draws)) == 100


async def test_a_crowd_of_dial_routes_starts_at_the_configured_rate(autojump_clock, tmp_path, speech_clip):
    """12 dial routes at boot with server.dial_starts_per_second 5 and a burst of 2: two start
    at once, then one every 0.2 s (each session start, on the virtual clock), and a route
    waiting its turn says so; every route still plays its file whole."""
    routes = "routes:\n" + "".join(
        f"""  - name: r{i}
    endpoints:
      - file: {{path: "$clip"}}
      - record: {{path: "$out/r{i}.wav", rate: 8000}}
""" for i in range(12))
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, clip=speech_clip, out=tmp_path,
                              server_extra=", dial_starts_per_second: 5, dial_start_burst: 2")
        boot = trio.current_time()
        last = gateway.routes["r11"]
        assert last.reason == "waiting its turn: dial routes start at 5 per second", last.reason
        with trio.fail_after(30):
            for state in gateway.routes.values():
                await state.finished.wait()
        assert "gateway_dial_starts_delayed_total 10.0" in render(gateway)[0].decode()
        nursery.cancel_scope.cancel()
    assert last.reason == ""
    starts = sorted(state.route.stats.started_at - boot for state in gateway.routes.values())
    assert starts[1] < 0.05  # the burst
    for k in range(2, 12):
        assert (k - 1) * 0.2 - 0.01 <= starts[k] <= (k - 1) * 0.2 + 0.05, starts
    for i in range(12):
        pcm, rate = read_wav(tmp_path / f"r{i}.wav")
        assert abs(len(pcm) / rate - 2.0) < 0.05
