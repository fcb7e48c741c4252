"""A client that breaks a listen session is that client's failure, not the route's (issue 10.1).

One gateway on loopback with a call, a voice channel, an agent service and a video room, each
playing looped speech. For 20 s an attacker with valid credentials opens a session of each
once a second and breaks it: a malformed message, or a connection that vanishes right after
the upgrade (its socket is gone before the endpoint reads its address). Meanwhile an honest
client of each connects once a second at a seeded random moment (some right on top of an
attack) and must be served at once: the route never goes into restart backoff and no honest
client is turned away.

Timing is checked against the failure it guards: a route in backoff waits 1 s before it takes
the next client (then 2, 4, ... s), so the honest client's wait is bounded by 1 s every time and
by 100 ms at the median: with backoff, every client after an attack waits 1 s or more.
"""

from __future__ import annotations

import json
import random
import statistics

import pytest
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.argon.wire import IngressParams, build_ingress_url
from gateway.adapters.ws import dial
from gateway.daemon import BACKOFF_FIRST
from gateway.demo import DEFAULT_AUDIO
from gateway.errors import ServiceError
from harness import AGENT_API_KEY, BOT_TOKEN, SECRETS, VOIPBIN_TOKEN, start
from test_argon_errors import CHANNEL, SPACE
from test_argon_refusals import BOTS, OTHER_BOT_TOKEN
from test_videosdk_endpoint import create_session

# CPU-heavy and real time: run on one xdist worker, one such file after another (dev.sh --dist loadgroup)
pytestmark = pytest.mark.xdist_group("realtime")


ATTACK_S = 20
SEED = 10_1
ROUTES = """\
routes:
  - name: voipbin
    endpoints:
      - voipbin: {role: listen, call_id: call-b}
      - file: {path: "$audio", rate: 8000, loop: true}
  - name: argon
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - file: {path: "$audio", rate: 8000, loop: true}
  - name: agent
    endpoints:
      - agent: {role: listen}
      - file: {path: "$audio", rate: 8000, loop: true}
  - name: videosdk
    endpoints:
      - videosdk: {role: listen, room_id: r1}
      - file: {path: "$audio", rate: 8000, loop: true}
""" % (SPACE, CHANNEL)

MALFORMED = {  # one message each protocol refuses, and the close code it names
    "voipbin": (b"\x80\x00\x00", 1002),  # an RTP header cut at 3 bytes
    "argon": (b"\x03\x00", 1007),  # an Opus code-3 packet with no frames
    "agent": ("{nope", 1007),  # a control message that is not JSON
    "videosdk": ("{nope", 1007),  # a frame that is not JSON
}
ROLES = tuple(MALFORMED)


async def ws_client(nursery, url: str):
    """A WebSocket client; a refused upgrade raises ServiceError with its status."""
    return await dial(nursery, url, service="client")


async def open_session(nursery, gateway, role: str):
    """An upgraded, handshaken session of `role`, as that service's clients open one."""
    if role == "voipbin":
        port = gateway.runtime.media.port
        return await ws_client(nursery, f"ws://127.0.0.1:{port}/v1.0/calls/call-b/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}")
    if role.startswith("argon"):  # the attacker and the honest client are two bots
        token = OTHER_BOT_TOKEN if role == "argon-honest" else BOT_TOKEN
        response = await gateway.runtime.http_client().post(
            f"http://127.0.0.1:{gateway.runtime.http.port}/api/bot/IVoice/v1/StreamToken",
            headers={"Authorization": f"Bot {token}"}, json={"spaceId": SPACE, "channelId": CHANNEL})
        assert response.status_code == 200, response.text
        params = IngressParams(token=response.json()["token"], track_name="t")
        return await ws_client(nursery, build_ingress_url(response.json()["ingressUrl"], "/audio/connect", params))
    if role == "agent":
        response = await gateway.runtime.http_client().post(
            f"http://127.0.0.1:{gateway.runtime.http.port}/api/v1/sdk/token", headers={"authorization": f"Bearer {AGENT_API_KEY}"})
        assert response.status_code == 200, response.text
        ws = await ws_client(nursery, response.json()["ws_url"])
        await ws.send_message(json.dumps({"token": response.json()["token"]}))
        return ws
    response = await create_session(gateway, "r1")
    assert response.status_code == 200, response.text
    ws = await ws_client(nursery, response.json()["data"]["wsUrl"])
    await ws.send_message('{"event":"start"}')
    return ws


def served_by(role: str, message: str | bytes) -> bool:
    """The message that shows the session is served: audio of the route (a channel: ready)."""
    if role == "argon":
        return isinstance(message, str) and json.loads(message).get("status") == "ready"
    if role == "videosdk":
        return isinstance(message, str) and json.loads(message).get("event") == "media"
    return isinstance(message, bytes)


async def attack(nursery, gateway, role: str, t0: float, report: dict) -> None:
    for i in range(ATTACK_S):
        await trio.sleep_until(t0 + i)
        try:
            ws = await open_session(nursery, gateway, role)
        except ServiceError as refused:  # an honest client holds the one slot
            report["refused"].append(refused.status)
            continue
        if i % 2:  # vanish right after the upgrade: no close frame, no more bytes
            await ws._stream.aclose()
            report["vanished"] += 1
            continue
        message, code = MALFORMED[role]
        try:
            await ws.send_message(message)
            with trio.fail_after(5):
                while True:
                    await ws.get_message()
        except ConnectionClosed as closed:
            report["closed"].append(closed.reason.code)
        assert report["closed"] and report["closed"][-1] == code, (role, report)


async def honest(nursery, gateway, role: str, t0: float, rng: random.Random, report: dict) -> None:
    offsets = [0.0, 0.01, 0.03] + [rng.random() * 0.8 for _ in range(ATTACK_S - 3)]
    for i, offset in enumerate(offsets):
        await trio.sleep_until(t0 + i + offset)
        began = trio.current_time()
        try:
            ws = await open_session(nursery, gateway, role + "-honest" if role == "argon" else role)
        except ServiceError as refused:
            report["honest_refused"].append(str(refused))
            continue
        with trio.move_on_after(10):
            while not served_by(role, await ws.get_message()):
                pass
            report["waits"].append(trio.current_time() - began)
        await trio.sleep(0.1)
        with trio.move_on_after(2):
            if role == "videosdk":
                await ws.send_message('{"event":"stop"}')
            await ws.aclose()


async def test_broken_sessions_never_put_a_listen_route_in_backoff(tmp_path, caplog):
    entered: list[tuple[str, str]] = []  # (route, state) as seen every 10 ms
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, argon_extra=BOTS + ", stream_token_per_minute: 1000")

        async def watch_states() -> None:  # a restart backoff lasts >= 1 s: polling sees it
            while True:
                entered.extend((name, state.state) for name, state in gateway.routes.items())
                await trio.sleep(0.01)

        nursery.start_soon(watch_states)
        reports = {role: {"closed": [], "refused": [], "vanished": 0, "waits": [], "honest_refused": []} for role in ROLES}
        rng = random.Random(SEED)
        t0 = trio.current_time() + 0.2
        async with trio.open_nursery() as clients:
            for role in ROLES:
                clients.start_soon(attack, clients, gateway, role, t0, reports[role])
                clients.start_soon(honest, clients, gateway, role, t0, random.Random(rng.random()), reports[role])
        peer_errors = {name: sum(e.stats.peer_errors for e in state.route.endpoints) for name, state in gateway.routes.items()}
        restarts = {name: state.restarts for name, state in gateway.routes.items()}
        nursery.cancel_scope.cancel()

    for role, report in reports.items():
        waits = report["waits"]
        summary = f"{role}: waits {[round(w, 3) for w in waits]}, {report}"
        assert not report["honest_refused"] and len(waits) == ATTACK_S, summary  # every honest client served
        assert max(waits) < BACKOFF_FIRST and statistics.median(waits) < 0.1, summary
        assert len(report["closed"]) + report["vanished"] + len(report["refused"]) == ATTACK_S, summary
        assert len(report["closed"]) >= ATTACK_S // 2 - 3, summary  # the attacks reached the parser
        assert set(report["refused"]) <= {409}, summary
        seen = {s for name, s in entered if name == role}
        assert "restarting" not in seen and "failed" not in seen and restarts[role] == 0, (role, seen)
        # every broken session is counted (gateway_peer_errors_total)
        assert peer_errors[role] >= len(report["closed"]), (role, peer_errors, report)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text[-3000:]
    for secret in (*SECRETS, OTHER_BOT_TOKEN):
        assert secret not in caplog.text


CALL = """\
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, call_id: c1}
      - file: {path: "$audio", rate: 8000, loop: true}
"""
UPGRADE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


async def read_until_closed(stream, limit_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the TCP connection, and how long it took."""
    began, data = trio.current_time(), b""
    with trio.fail_after(limit_s):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
    return data, trio.current_time() - began


async def served(nursery, gateway) -> bool:
    """An honest VoIPBIN client of the call gets audio."""
    url = f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/c1/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}"
    ws = await ws_client(nursery, url)
    with trio.fail_after(5):
        message = await ws.get_message()
    await ws.aclose()
    return isinstance(message, bytes) and len(message) == 172  # RTP header + 160 B of u-law


async def test_requests_the_websocket_layer_cannot_parse_end_only_that_connection(caplog):
    """A request target urlsplit refuses, a Host header that is not ASCII, and a message over
    the size limit right after a frame that made the gateway close: each used to escape
    trio-websocket and end the whole media server (the process)."""
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, audio=DEFAULT_AUDIO)
        port = gateway.runtime.media.port
        for target, host in ((b"http://[::1/x", b"127.0.0.1"), (b"/v1.0/calls/c1/media_stream", b"\xec\x80")):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + UPGRADE)
            data, _ = await read_until_closed(stream)
            assert data == b"" or data.startswith(b"HTTP/1.1 400 "), data
        url = f"ws://127.0.0.1:{port}/v1.0/calls/c1/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}"
        ws = await ws_client(nursery, url)
        await ws.send_message(b"\x80\x00\x00")  # truncated RTP: the gateway closes with 1002...
        try:
            await ws.send_message(b"\x00" * (2**16 + 1))  # ...and one message over the 64 KiB limit
        except ConnectionClosed:
            pass
        with trio.move_on_after(5):
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed:
                pass
        assert await served(nursery, gateway)  # the media server is still there
        nursery.cancel_scope.cancel()
    assert "Traceback" not in caplog.text


async def test_a_refused_upgrade_closes_its_tcp_connection_at_once():
    """Before: the answer was sent, then the socket stayed open until the client closed it."""
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, audio=DEFAULT_AUDIO)
        for target, status in ((b"/v1.0/calls/c1/media_stream?token=wrong", b"401"), (b"/nowhere", b"404")):
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.runtime.media.port)
            await stream.send_all(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + UPGRADE)
            data, took = await read_until_closed(stream)
            assert data.startswith(b"HTTP/1.1 " + status + b" "), data
            assert took < 2.0, took  # closed right after the answer, not when the client gives up
        assert await served(nursery, gateway)
        nursery.cancel_scope.cancel()


def test_a_file_path_with_a_nul_byte_is_a_config_error():
    """Before: accepted, then the route crashed on os.stat and looped in restart backoff."""
    from gateway.config import GatewayConfig
    from gateway.errors import ConfigError

    text = 'routes:\n  - name: nul\n    endpoints:\n      - file: {path: "/tmp/a\\0b.wav"}\n      - record: {path: /tmp/x.wav}\n'
    try:
        from gateway.daemon import Gateway

        Gateway(GatewayConfig.from_text(text, "nul.yaml")).build()
    except ConfigError as err:
        assert "NUL byte" in str(err) and "path" in str(err)
    else:
        raise AssertionError("a path with a NUL byte was accepted")
